"""The package's exception types, so callers can catch the store's failures by type."""

from __future__ import annotations

__all__ = (
    "BackendUnavailableError",
    "DatabaseNotFoundError",
    "ForeignDatabaseError",
    "InvalidSessionIdError",
    "SchemaVersionError",
    "StoreError",
    "StoreUnavailableError",
    "StoreWriteError",
)


class StoreError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidSessionIdError(StoreError, ValueError):
    """A session id (derived or client-chosen) is empty, too long or has forbidden characters."""


class SchemaVersionError(StoreError):
    """The database was written by a newer version of this package, or needs migrating first.

    `found` is the schema version of the database and `supported` the newest this package
    knows, when the backend could read them (None otherwise).
    """

    def __init__(
        self, message: str, *, found: int | None = None, supported: int | None = None
    ) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class DatabaseNotFoundError(StoreError):
    """A read-only open found no database at the given location."""


class BackendUnavailableError(StoreError):
    """The backend's driver is not installed (install the matching extra)."""


class StoreWriteError(StoreError):
    """Records could not be committed (storage failing) and were dropped."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or is failing (server down, restarting, disk I/O).

    Transient: retrying later can succeed. A proxy answers 503 with `Retry-After`.
    """


class ForeignDatabaseError(StoreError):
    """The file or schema holds someone else's tables and no schema version of ours.

    The store refuses to add its tables there unless told to (`adopt=True`).
    """
