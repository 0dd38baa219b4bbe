"""The files of a SQLite store: how to open them without touching them, and who writes them.

A reading command must never create or change a file, not even after a crash left a WAL
behind; a writing store warns when another store already writes the same file (a SQLite
store's sessions are cached in one process's memory).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from ..errors import DatabaseNotFoundError

__all__ = ("StoreFiles",)

log: Final = logging.getLogger("aiohttp_session_store.sqlite")


class StoreFiles:
    """What one open of a store holds besides its connection: a private copy, a claim."""

    __slots__ = ("_copy_dir", "_path", "_writer_lock")

    def __init__(self, path: str) -> None:
        self._path = path
        self._copy_dir: str | None = None
        self._writer_lock: int | None = None

    def read_only_target(self) -> str:
        """The URI a read-only connection opens: one that creates and changes nothing."""
        path = self._path
        if path == ":memory:" or not os.path.isfile(path):
            raise DatabaseNotFoundError(f"no database at {path}")
        # mode=ro: SQLite itself refuses to create or write the file.
        if not os.path.exists(f"{path}-wal"):
            # No -wal file: no connection has the database open for writing. Even a
            # read-only WAL open would create -wal/-shm files here; immutable reads the
            # file as it is and creates nothing.
            return Path(path).resolve().as_uri() + "?mode=ro&immutable=1"
        if not os.path.exists(f"{path}-shm"):
            # A crash left a -wal but no -shm: reading the log needs a wal-index, which
            # SQLite would create beside the file. Read a private copy instead (its own
            # -shm is made in the private directory).
            return Path(self._private_copy()).as_uri() + "?mode=ro"
        # readonly_shm: never write the -shm either (after a crash SQLite rebuilds the
        # wal-index in memory instead of in the file).
        return Path(path).resolve().as_uri() + "?mode=ro&readonly_shm=1"

    def _private_copy(self) -> str:
        self._copy_dir = tempfile.mkdtemp(prefix="aiohttp_session_store-")
        copy = os.path.join(self._copy_dir, "store.db")
        shutil.copyfile(self._path, copy)
        shutil.copyfile(f"{self._path}-wal", f"{copy}-wal")
        return copy

    def claim_writer(self) -> None:
        """Warn when another store already writes this file (flock: readers never claim)."""
        if self._path == ":memory:":
            return
        try:
            fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning(
                "%s is already open for writing by another store: a SQLite store belongs to"
                " one proxy process (its sessions are cached in memory); several instances"
                " need PostgreSQL",
                self._path,
            )
            return
        self._writer_lock = fd

    def release(self) -> None:
        """Drop the private copy and the writer's claim (idempotent)."""
        if self._copy_dir is not None:
            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None
        if self._writer_lock is not None:
            os.close(self._writer_lock)  # closing the descriptor releases its flock
            self._writer_lock = None
