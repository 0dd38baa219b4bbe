"""The SQLite backend: the SQL core over one aiosqlite connection to a local file."""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar, Final, TypeVar

import aiosqlite

from ..errors import StoreError, StoreUnavailableError
from ..migrations import MIGRATIONS, Migration
from ..models import WriteBatch
from .core import Conn
from .dialect import SQLITE, Dialect
from .sql import SQLBackend
from .sqlite_files import StoreFiles
from .sqlite_thread import ConnNow, complete, in_transaction, run_rows

__all__ = ("SQLiteBackend",)


R = TypeVar("R")

# RETURNING arrived in SQLite 3.35 (2021); Python builds linked against an older library
# take the fallback paths, which do the same work with one more statement inside the same
# IMMEDIATE transaction (so they are just as atomic).
_HAS_RETURNING: Final = sqlite3.sqlite_version_info >= (3, 35, 0)

# OperationalErrors that mean "the file cannot be used right now", not "this statement is
# wrong": a read failing so raises StoreUnavailableError.
_UNAVAILABLE: Final = ("disk i/o error", "unable to open", "is locked", "database is full")


class SQLiteBackend(SQLBackend):
    """Sessions and records in one SQLite file (WAL mode), for a single proxy process.

    One aiosqlite connection runs every statement on its own thread. An asyncio lock makes
    each operation (a read, or a whole `BEGIN IMMEDIATE ... COMMIT`) exclusive on that
    connection: statements from concurrent coroutines would otherwise interleave inside one
    another's transactions, and a read could see writes that are then rolled back.
    Other processes reading the file (the CLI) are kept consistent by SQLite's own locking.
    One proxy process owns a file: its SessionManager caches sessions and writes them
    behind, so a second proxy on the same file would overwrite its turns. Several proxy
    instances share a PostgreSQL store instead.
    """

    name: ClassVar[str] = "sqlite"
    shared: ClassVar[bool] = False
    dialect: ClassVar[Dialect] = SQLITE

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        migrations: tuple[Migration, ...] = MIGRATIONS,
        busy_timeout: float = 5.0,
        adopt: bool = False,
    ) -> None:
        self._path = os.fspath(path)
        self._files = StoreFiles(self._path)
        if not self._path:
            raise ValueError("database path is empty")
        super().__init__(read_only=read_only, migrations=migrations, adopt=adopt)
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0, not {busy_timeout}")
        self._busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        # Separate from `_lock` (open() takes that one too): two concurrent open() calls
        # must not each connect and leak one of the connections.
        self._opening = asyncio.Lock()
        # Per instance so a test can exercise the pre-3.35 paths on a modern library.
        self._returning = _HAS_RETURNING

    def __repr__(self) -> str:
        mode = "read-only" if self._read_only else "read-write"
        return f"<SQLiteBackend {self._path!r} {mode}>"

    @property
    def path(self) -> str:
        return self._path

    @property
    def _where(self) -> str:
        return f"database {self._path}"

    @property
    def _migrate_command(self) -> str:
        return f"python -m aiohttp_session_store --db {self._path} migrate"

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:
            if self._db is None:
                await self._open()

    async def _open(self) -> None:
        db = await self._connect()
        try:
            async with self._lock:
                # Newer and foreign databases are refused here, before anything is written.
                version = await self._probe(db)
                if self._read_only:
                    self._refuse_older(version)
                else:
                    # Only after the version check: switching a rollback-journal file to
                    # WAL rewrites its header, and a newer database must stay untouched.
                    await self._enable_wal(db)
                    # WAL + NORMAL: a commit survives a process crash; only a power cut
                    # can lose the last transactions, never corrupt the file.
                    await db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
            if not self._read_only:
                self._files.claim_writer()
                await self.migrate()
        except BaseException:
            self._db = None
            await db.close()
            self._files.release()
            raise

    async def _enable_wal(self, db: aiosqlite.Connection) -> None:
        # Switching the journal mode needs the file to itself and SQLite answers "locked"
        # at once, without its busy handler, while another process opens it too: retry
        # for as long as the busy timeout would have waited.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout
        while True:
            try:
                await db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.01)

    def _target(self) -> tuple[str, bool]:
        """What to hand sqlite3.connect, and whether it is a URI.

        Synchronous on purpose: a stat and a mkdir are quicker than a hop to a thread.
        """
        if self._read_only:
            return self._files.read_only_target(), True
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        return self._path, False

    async def _connect(self) -> aiosqlite.Connection:
        target, uri = self._target()
        try:
            db = await aiosqlite.connect(
                target, uri=uri, isolation_level=None, timeout=self._busy_timeout
            )
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open database {self._path}: {exc}") from exc
        try:
            # foreign_keys is per connection and off by default; busy_timeout makes a
            # writer wait for another process's lock instead of failing at once.
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        except BaseException:
            await db.close()
            raise
        return db

    async def _probe(self, db: aiosqlite.Connection) -> int:
        """The schema version, read before anything is written; a non-database file fails here."""
        try:
            return await _on_thread(db, self._check_store)
        except sqlite3.DatabaseError as exc:
            if "file is not a database" in str(exc):
                raise StoreError(f"{self._path} is not a SQLite database") from exc
            raise StoreError(f"cannot read database {self._path}: {exc}") from exc

    async def close(self) -> None:
        db = self._db
        if db is None:
            return
        # Wait for the operation in progress, so it is not cut off mid-transaction.
        async with self._lock:
            if self._db is not db:
                return
            self._db = None
            await db.close()
            self._files.release()

    def is_permanent_error(self, exc: BaseException) -> bool:
        # OperationalError (locked, disk full, read-only) is transient; these are not.
        return isinstance(
            exc,
            (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError, UnicodeError),
        )

    async def backup(self, destination: str) -> None:
        """A consistent copy via SQLite's online backup API, safe while others write."""
        target_path = _new_file(destination)
        db = self._conn()
        try:
            async with self._lock, aiosqlite.connect(target_path) as target:
                await db.backup(target)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot back up {self._path} to {destination}: {exc}") from exc

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"SQLiteBackend({self._path!r}) is not open")
        return self._db

    def _writable(self) -> aiosqlite.Connection:
        db = self._conn()
        if self._read_only:
            raise StoreError(f"database {self._path} is open read-only")
        return db

    async def write_batch(self, batch: WriteBatch) -> None:
        """The whole batch in one hop to the connection's thread: rows built and written there.

        Statement by statement it took eight hops (BEGIN, one per table, COMMIT), each a
        wake-up of the event loop, and the rows were built on the loop. Measured with
        benchmarks/bench_callgrind.py: fewer instructions on the loop per call (see the
        README). The transaction is the same `BEGIN IMMEDIATE ... COMMIT`, rolled back on
        any error; a task cancelled while waiting leaves a batch that commits or rolls
        back whole, as a queued COMMIT/ROLLBACK did before.
        """
        if not len(batch):
            return
        db = self._writable()
        async with self._lock:
            # aiosqlite runs `fn` on its thread after everything queued before it.
            await db._execute(self._write_now, db._conn, batch)  # type: ignore[no-untyped-call]

    def _write_now(self, con: sqlite3.Connection, batch: WriteBatch) -> None:
        steps = self.batch_steps(batch)

        def write() -> None:
            for kind, sql, rows in steps:
                if kind == "rows":
                    run_rows(con, sql, rows)
                elif kind == "many":
                    con.executemany(sql, rows)
                else:
                    con.execute(sql, rows[0])

        in_transaction(con, write)

    async def _run(
        self,
        op: Callable[[Conn], Awaitable[R]],
        *,
        write: bool,
        retry: bool,
        transaction: bool = True,
    ) -> R:
        # Every write is one IMMEDIATE transaction (it costs nothing extra on one
        # connection); the busy timeout already waits out other processes' locks, so
        # nothing is retried here, and a write's own error stays as it is for the writer's
        # `is_permanent_error`. The lock keeps operations whole against each other; each
        # runs in one hop to the connection's thread (sqlite_thread.py).
        if write:
            db = self._writable()
            async with self._lock:
                return await _on_thread(db, op, transaction=True)
        db = self._conn()
        async with self._lock:
            try:
                return await _on_thread(db, op)
            except sqlite3.OperationalError as exc:
                if any(s in str(exc).lower() for s in _UNAVAILABLE):
                    raise StoreUnavailableError(
                        f"cannot read database {self._path}: {exc}"
                    ) from exc
                raise


async def _on_thread(
    db: aiosqlite.Connection, op: Callable[[Conn], Awaitable[R]], *, transaction: bool = False
) -> R:
    """`op` run whole on the connection's thread, in one IMMEDIATE transaction if asked."""
    con: sqlite3.Connection = db._conn

    def run() -> R:
        return complete(op(ConnNow(con)))

    # aiosqlite runs `fn` on its thread after everything queued before it.
    work = functools.partial(in_transaction, con, run) if transaction else run
    result: R = await db._execute(work)  # type: ignore[no-untyped-call]
    return result


def _new_file(destination: str) -> Path:
    """The path of a file about to be created; refuses to overwrite (a stat, no thread hop)."""
    path = Path(destination)
    if path.exists():
        raise StoreError(f"{destination} already exists; choose a new path for the backup")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
