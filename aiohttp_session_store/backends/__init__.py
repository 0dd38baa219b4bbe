"""Choosing a backend from a `database` argument. The SQL both backends send lives once in
the core (dialect, codecs, queries, core, sql); sqlite and postgres hold connections."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import BackendUnavailableError
from .base import Backend

if TYPE_CHECKING:
    from .postgres import PostgresBackend
    from .sqlite import SQLiteBackend

__all__ = ("Backend", "backend_from_url", "load_postgres_backend", "load_sqlite_backend")


def load_sqlite_backend() -> type[SQLiteBackend]:
    from .sqlite import SQLiteBackend

    return SQLiteBackend


def load_postgres_backend() -> type[PostgresBackend]:
    """The PostgreSQL backend class; asyncpg is only imported here, on demand."""
    try:
        import asyncpg  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised in an env without asyncpg
        raise BackendUnavailableError(
            "the PostgreSQL backend needs asyncpg: pip install 'aiohttp-session-store[postgres]'"
        ) from exc
    from .postgres import PostgresBackend

    return PostgresBackend


def backend_from_url(
    database: str | os.PathLike[str] | Backend, *, read_only: bool = False, adopt: bool = False
) -> Backend:
    """A backend for a path, `sqlite:///path`, `postgresql://...`, or a Backend as is.

    `adopt`: add the store's tables to a database that holds other tables (refused with
    `ForeignDatabaseError` otherwise).
    """
    if isinstance(database, Backend):
        return database
    url = os.fspath(database)
    if url.startswith(("postgresql://", "postgres://")):
        return load_postgres_backend()(url, read_only=read_only, adopt=adopt)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") :]
    elif url.startswith("sqlite://"):
        raise ValueError(f"a SQLite URL is sqlite:///path (three slashes), not {url!r}")
    elif "://" in url:
        raise ValueError(
            f"unsupported database {url!r}: give a path, sqlite:///path or postgresql://..."
        )
    if not url:
        raise ValueError("database path is empty")
    return load_sqlite_backend()(url, read_only=read_only, adopt=adopt)
