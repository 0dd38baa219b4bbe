"""The SQLite backend: the SQL core over one aiosqlite connection to a local file."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import ClassVar, Final, TypeVar

import aiosqlite

from ..errors import StoreError, StoreUnavailableError
from ..migrations import MIGRATIONS, Migration
from ..models import WriteBatch
from .core import Conn, Row
from .dialect import SQLITE, Dialect
from .sql import SQLBackend
from .sqlite_files import StoreFiles

__all__ = ("SQLiteBackend",)


R = TypeVar("R")

# RETURNING arrived in SQLite 3.35 (2021); Python builds linked against an older library
# take the fallback paths, which do the same work with one more statement inside the same
# IMMEDIATE transaction (so they are just as atomic).
_HAS_RETURNING: Final = sqlite3.sqlite_version_info >= (3, 35, 0)

# OperationalErrors that mean "the file cannot be used right now", not "this statement is
# wrong": a read failing so raises StoreUnavailableError.
_UNAVAILABLE: Final = ("disk i/o error", "unable to open", "is locked", "database is full")


# Host parameters per statement: SQLite's lowest default limit (999 before 3.32), so the
# multi-row statements below run on every library version.
_MAX_PARAMS: Final = 999


@functools.lru_cache(maxsize=256)
def _multi_row(sql: str, rows: int) -> str:
    """`sql`, whose one `VALUES (?, ...)` or `IN (?)` group is repeated for `rows` rows.

    Cached: a batch only ever uses the full-chunk size and one remainder size, so the
    connection's statement cache keeps them prepared.
    """
    for opener in (" VALUES (", " IN ("):
        head, found, tail = sql.partition(opener)
        if found:
            group, _, rest = tail.partition(")")
            if opener == " IN (":
                return f"{head} IN ({', '.join([group] * rows)}){rest}"
            return f"{head} VALUES {', '.join([f'({group})'] * rows)}{rest}"
    raise ValueError(f"no parameter group to repeat in {sql!r}")


async def _run_rows(db: aiosqlite.Connection, sql: str, rows: Sequence[Sequence[object]]) -> None:
    """Apply `sql` to every row, as many rows per statement as the parameter limit allows.

    Not `executemany` row by row: sqlite3 releases and re-takes the GIL around every
    execution, and while the event loop keeps the GIL busy (a proxy under load) each re-take
    can wait for the interpreter's switch interval. Row by row, a loaded proxy's writer
    committed a few thousand records a second and dropped records past
    `max_pending_records`; in chunks it keeps up.
    """
    per = max(1, _MAX_PARAMS // len(rows[0]))
    full = len(rows) // per
    if full:
        await db.executemany(
            _multi_row(sql, per),
            [[v for row in rows[i * per : (i + 1) * per] for v in row] for i in range(full)],
        )
    rest = rows[full * per :]
    if rest:
        await db.execute(_multi_row(sql, len(rest)), [v for row in rest for v in row])


def _run_rows_now(con: sqlite3.Connection, sql: str, rows: Sequence[Sequence[object]]) -> None:
    """`_run_rows` on the connection's own thread (see `SQLiteBackend.write_batch`)."""
    per = max(1, _MAX_PARAMS // len(rows[0]))
    full = len(rows) // per
    if full:
        con.executemany(
            _multi_row(sql, per),
            [[v for row in rows[i * per : (i + 1) * per] for v in row] for i in range(full)],
        )
    rest = rows[full * per :]
    if rest:
        con.execute(_multi_row(sql, len(rest)), [v for row in rest for v in row])


class _Conn:
    """The core's `Conn` over an aiosqlite connection."""

    __slots__ = ("_db",)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        # execute + fetchall in one hop to the connection's thread; a RETURNING statement
        # is also only complete once all its rows are stepped through.
        return list(await self._db.execute_fetchall(sql, params))

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        cursor = await self._db.execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        await self._db.executemany(sql, rows)

    async def insert_rows(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        await _run_rows(self._db, sql, rows)


class _ConnNow:
    """The core's `Conn` on the connection's own thread: every call is done when it returns."""

    __slots__ = ("_con",)

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(self._con.execute(sql, params).fetchall())

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._con.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._con.executemany(sql, rows)

    async def insert_rows(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        _run_rows_now(self._con, sql, rows)


def _complete(awaitable: Awaitable[R]) -> R:
    """Run an operation over `_ConnNow` to its end, synchronously.

    Such an operation never suspends (each of its awaits is already done), so one step of
    its coroutine finishes it. One that did suspend awaits something else, which has no
    place on the connection's thread: refused rather than left half done.
    """
    steps = awaitable.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        result: R = done.value
        return result
    steps.close()
    raise RuntimeError("a write operation awaited something other than its connection")


def _in_transaction(con: sqlite3.Connection, work: Callable[[], R]) -> R:
    """`BEGIN IMMEDIATE`, `work()`, `COMMIT`; rolled back on any error (connection's thread)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        con.execute("COMMIT")
    except BaseException:
        # Nothing is left to undo when SQLite already rolled back (some errors do).
        with contextlib.suppress(sqlite3.OperationalError):
            con.execute("ROLLBACK")
        raise
    return result


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
            return await self._check_store(_Conn(db))
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
                    _run_rows_now(con, sql, rows)
                elif kind == "many":
                    con.executemany(sql, rows)
                else:
                    con.execute(sql, rows[0])

        _in_transaction(con, write)

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
        # `is_permanent_error`.
        if write:
            # The whole operation in one hop to the connection's thread, as `write_batch`:
            # statement by statement each was a hop (BEGIN, each statement, COMMIT), and
            # opening a new store (every migration's statements) took ~40 of them.
            db = self._writable()
            async with self._lock:
                return await db._execute(  # type: ignore[no-untyped-call, no-any-return]
                    _in_transaction, db._conn, lambda: _complete(op(_ConnNow(db._conn)))
                )
        db = self._conn()
        async with self._lock:
            try:
                return await op(_Conn(db))
            except sqlite3.OperationalError as exc:
                if any(s in str(exc).lower() for s in _UNAVAILABLE):
                    raise StoreUnavailableError(
                        f"cannot read database {self._path}: {exc}"
                    ) from exc
                raise


def _new_file(destination: str) -> Path:
    """The path of a file about to be created; refuses to overwrite (a stat, no thread hop)."""
    path = Path(destination)
    if path.exists():
        raise StoreError(f"{destination} already exists; choose a new path for the backup")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
