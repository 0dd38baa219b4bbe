"""The SQLite backend: the `Backend` interface over one aiosqlite connection to a local file."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final, cast

import aiosqlite

from ..errors import DatabaseNotFoundError, SchemaVersionError, StoreError
from ..migrations import METADATA_DDL, MIGRATIONS, SCHEMA_VERSION_KEY, Migration, latest_version
from ..models import (
    SESSION_ORDERS,
    Exchange,
    LineageNode,
    Outcome,
    RequestQuery,
    RequestRecord,
    ResponseFact,
    ResponseRecord,
    Session,
    SessionOrder,
    SessionQuery,
    WriteBatch,
    now_ms,
    storable,
)
from .base import Backend
from .columns import MUTABLE_RESPONSE_COLUMNS as _MUTABLE_RESPONSE_COLUMNS
from .columns import ORPHAN_GRACE_MS as _ORPHAN
from .columns import REQUEST_COLUMNS as _REQUEST_COLUMNS
from .columns import RESPONSE_COLUMNS as _RESPONSE_COLUMNS
from .columns import SESSION_COLUMNS as _SESSION_COLUMNS

__all__ = ("SQLiteBackend",)

# RETURNING arrived in SQLite 3.35 (2021); Python builds linked against an older library
# take the fallback paths, which do the same work with one more statement inside the same
# IMMEDIATE transaction (so they are just as atomic).
_HAS_RETURNING: Final = sqlite3.sqlite_version_info >= (3, 35, 0)

_S_COLS: Final = ", ".join(_SESSION_COLUMNS)
_S_PARAMS: Final = ", ".join("?" for _ in _SESSION_COLUMNS)
_S_EXCLUDED: Final = ", ".join(f"{c} = excluded.{c}" for c in _SESSION_COLUMNS[1:])

_GET_SESSION: Final = f"SELECT {_S_COLS} FROM sessions WHERE id = ?"

# One statement decides "new or existing": a live row wins untouched (the WHERE fails, so
# nothing is returned), an expired one is replaced whole, as if it had been swept first.
_INSERT_SESSION: Final = (
    f"INSERT INTO sessions ({_S_COLS}) VALUES ({_S_PARAMS}) "
    f"ON CONFLICT(id) DO UPDATE SET {_S_EXCLUDED} "
    "WHERE sessions.expires_at <= excluded.created_at"
)
_INSERT_SESSION_RETURNING: Final = f"{_INSERT_SESSION} RETURNING {_S_COLS}"

# The increment happens in SQL, so concurrent turns cannot lose one to a read-modify-write.
_ADVANCE_SESSION: Final = (
    "UPDATE sessions SET parent_id = ?, last_accessed = ?, expires_at = ?,"
    " message_count = message_count + 1 WHERE id = ? AND expires_at > ?"
)
_TOUCH_SESSION: Final = (
    "UPDATE sessions SET last_accessed = ?, expires_at = ? WHERE id = ? AND expires_at > ?"
)

# Sweeps are bounded so one sweep never holds the write lock for long; the index on
# expires_at makes the inner SELECT a range scan.
_EXPIRED_IDS: Final = (
    "SELECT id FROM sessions WHERE expires_at <= ? ORDER BY expires_at, id LIMIT ?"
)
_DELETE_EXPIRED_RETURNING: Final = (
    f"DELETE FROM sessions WHERE id IN ({_EXPIRED_IDS}) RETURNING id, expires_at"
)

# Write-behind snapshots from the writer: last state wins.
_UPSERT_SESSION: Final = (
    f"INSERT INTO sessions ({_S_COLS}) VALUES ({_S_PARAMS}) "
    f"ON CONFLICT(id) DO UPDATE SET {_S_EXCLUDED}"
)
# ON CONFLICT(key) DO NOTHING rather than INSERT OR IGNORE: both make a replayed batch
# harmless, but OR IGNORE would also silently drop a row breaking NOT NULL, hiding a bug.
_INSERT_REQUEST: Final = (
    f"INSERT INTO requests ({', '.join(_REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _REQUEST_COLUMNS)}) "
    "ON CONFLICT(request_id) DO NOTHING"
)
_INSERT_RESPONSE: Final = (
    f"INSERT INTO responses ({', '.join(_RESPONSE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _RESPONSE_COLUMNS)}) "
    # An upsert: sync durability records a stream's reply before its end is sent, then
    # again, under the same response_id, with what the handler did after it.
    "ON CONFLICT(response_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _MUTABLE_RESPONSE_COLUMNS)
)
_UPDATE_UPSTREAM: Final = "UPDATE requests SET upstream_request = ? WHERE request_id = ?"
_DELETE_SESSIONS: Final = "DELETE FROM sessions WHERE id IN (?)"

# Retention: the oldest `limit` requests before the cutoff. Evaluated twice in one IMMEDIATE
# transaction (responses first, they reference their request); nothing can change in
# between and the order is total, so both statements see the same ids.
# Only requests whose call has ended (a response row exists) qualify: deleting the request
# of a call still in flight would leave its response nothing to reference. A request with
# no response a day past the cutoff is an orphan (a crash lost its response) and goes too.
_OLD_REQUEST_IDS: Final = (
    "SELECT request_id FROM requests WHERE timestamp < ? AND (timestamp < ? OR EXISTS"
    " (SELECT 1 FROM responses r WHERE r.request_id = requests.request_id))"
    " ORDER BY timestamp, id LIMIT ?"
)

# Exchanges: a request's columns, then its response's. A request normally has one response;
# joining on the first one written (as the PostgreSQL backend does) means a duplicate could
# never list the request twice.
_EXCHANGE_SELECT: Final = (
    "SELECT "
    + ", ".join(f"q.{c}" for c in _REQUEST_COLUMNS)
    + ", "
    + ", ".join(f"r.{c}" for c in _RESPONSE_COLUMNS)
    + " FROM requests q LEFT JOIN responses r ON r.id ="
    " (SELECT min(id) FROM responses WHERE responses.request_id = q.request_id)"
)
_FACT_SELECT: Final = (
    "SELECT r.session_id, q.model, r.outcome, r.prompt_tokens, r.completion_tokens,"
    " r.total_tokens, r.duration_ms, r.first_byte_ms"
    " FROM responses r JOIN requests q ON q.request_id = r.request_id"
)

# The only ORDER BY clauses `list_sessions` ever sends, keyed by `SESSION_ORDERS`; `id`
# breaks ties so pages are stable.
_SESSION_ORDER_SQL: Final[dict[SessionOrder, str]] = {
    # Sessions created in the same millisecond keep their creation order: the rowid (an
    # upsert keeps it) is the order the writer inserted them in.
    "created_at_desc": "created_at DESC, rowid DESC",
    "created_at_asc": "created_at ASC, rowid ASC",
    "last_accessed_desc": "last_accessed DESC, id DESC",
    "last_accessed_asc": "last_accessed ASC, id ASC",
    "expires_at_desc": "expires_at DESC, id DESC",
    "expires_at_asc": "expires_at ASC, id ASC",
    "message_count_desc": "message_count DESC, created_at DESC, id DESC",
}
if set(_SESSION_ORDER_SQL) != set(SESSION_ORDERS):  # pragma: no cover - caught on import
    raise RuntimeError("SQLiteBackend's session orders drifted from models.SESSION_ORDERS")

_SESSION_STATE_SQL: Final[dict[str, str]] = {
    "all": "",
    "active": " WHERE expires_at > ?",
    "expired": " WHERE expires_at <= ?",
}

_UPSERT_VERSION: Final = (
    "INSERT INTO metadata (key, value, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)

_Row = Sequence[Any]


def _session(row: _Row, *, is_new: bool = False) -> Session:
    return Session(
        id=row[0],
        chat_id=row[1],
        parent_id=row[2],
        first_user_message=row[3],
        message_count=row[4],
        created_at=row[5],
        last_accessed=row[6],
        expires_at=row[7],
        is_new=is_new,
    )


def _session_args(s: Session) -> tuple[object, ...]:
    return tuple(
        map(
            storable,
            (
                s.id,
                s.chat_id,
                s.parent_id,
                s.first_user_message,
                s.message_count,
                s.created_at,
                s.last_accessed,
                s.expires_at,
            ),
        )
    )


def _request(row: _Row) -> RequestRecord:
    return RequestRecord(
        request_id=row[0],
        session_id=row[1],
        timestamp=row[2],
        method=row[3],
        path=row[4],
        model=row[5],
        stream=bool(row[6]),
        openai_request=row[7],
        upstream_request=row[8],
        headers=row[9],
        created_at=row[10],
    )


def _request_args(r: RequestRecord) -> tuple[object, ...]:
    return tuple(
        map(
            storable,
            (
                r.request_id,
                r.session_id,
                r.timestamp,
                r.method,
                r.path,
                r.model,
                1 if r.stream else 0,
                r.openai_request,
                r.upstream_request,
                r.headers,
                r.created_at,
            ),
        )
    )


def _response(row: _Row) -> ResponseRecord:
    return ResponseRecord(
        response_id=row[0],
        request_id=row[1],
        session_id=row[2],
        timestamp=row[3],
        status_code=row[4],
        outcome=cast(Outcome, row[5]),
        openai_response=row[6],
        upstream_response=row[7],
        parent_id=row[8],
        prompt_tokens=row[9],
        completion_tokens=row[10],
        total_tokens=row[11],
        finish_reason=row[12],
        error=row[13],
        duration_ms=row[14],
        first_byte_ms=row[15],
        created_at=row[16],
    )


def _response_args(r: ResponseRecord) -> tuple[object, ...]:
    return tuple(
        map(
            storable,
            (
                r.response_id,
                r.request_id,
                r.session_id,
                r.timestamp,
                r.status_code,
                r.outcome,
                r.openai_response,
                r.upstream_response,
                r.parent_id,
                r.prompt_tokens,
                r.completion_tokens,
                r.total_tokens,
                r.finish_reason,
                r.error,
                r.duration_ms,
                r.first_byte_ms,
                r.created_at,
            ),
        )
    )


def _exchange(row: _Row) -> Exchange:
    n = len(_REQUEST_COLUMNS)
    response = None if row[n] is None else _response(row[n:])
    return Exchange(request=_request(row[:n]), response=response)


def _request_where(query: RequestQuery, params: list[object]) -> str:
    """The WHERE clause (or "") of `query` over `requests q`, appending its parameters.

    Only the fixed fragments below go into the SQL; every value is a bound parameter.
    `since` is inclusive and `until` exclusive, so adjacent windows never overlap.
    """
    clauses: list[str] = []
    if query.session_id is not None:
        clauses.append("q.session_id = ?")
        params.append(query.session_id)
    if query.model is not None:
        clauses.append("q.model = ?")
        params.append(query.model)
    if query.stream is not None:
        clauses.append("q.stream = ?")
        params.append(1 if query.stream else 0)
    if query.since is not None:
        clauses.append("q.timestamp >= ?")
        params.append(query.since)
    if query.until is not None:
        clauses.append("q.timestamp < ?")
        params.append(query.until)
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _page(limit: int | None, offset: int, params: list[object]) -> str:
    """LIMIT/OFFSET as bound parameters (SQLite's LIMIT -1 means no limit)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, not {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    params.extend((-1 if limit is None else limit, offset))
    return " LIMIT ? OFFSET ?"


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


async def _run_rows(db: aiosqlite.Connection, sql: str, rows: list[tuple[object, ...]]) -> None:
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


async def _fetchall(
    db: aiosqlite.Connection, sql: str, params: Iterable[object] = ()
) -> list[sqlite3.Row]:
    # execute + fetchall in one hop to the connection's thread; a RETURNING statement is
    # also only complete once all its rows are stepped through.
    return list(await db.execute_fetchall(sql, params))


async def _rowcount(db: aiosqlite.Connection, sql: str, params: Iterable[object] = ()) -> int:
    cursor = await db.execute(sql, params)
    return cursor.rowcount


class SQLiteBackend(Backend):
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

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        migrations: tuple[Migration, ...] = MIGRATIONS,
        busy_timeout: float = 5.0,
    ) -> None:
        self._path = os.fspath(path)
        if not self._path:
            raise ValueError("database path is empty")
        versions = [m.version for m in migrations]
        if len(set(versions)) != len(versions) or any(v <= 0 for v in versions):
            raise ValueError(f"migration versions must be unique and positive, got {versions}")
        self._read_only = read_only
        self._migrations = tuple(sorted(migrations, key=lambda m: m.version))
        self._latest = latest_version(self._migrations)
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
    def read_only(self) -> bool:
        return self._read_only

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:
            if self._db is None:
                await self._open()

    async def _open(self) -> None:
        db = await self._connect()
        try:
            async with self._lock:
                version = await self._probe(db)
                self._refuse_newer(version)
                if self._read_only:
                    if version < self._latest:
                        raise SchemaVersionError(
                            f"database {self._path} is at schema version {version}, this"
                            f" version of aiohttp_session_store needs {self._latest}: run"
                            f" `python -m aiohttp_session_store --db {self._path} migrate`",
                            found=version,
                            supported=self._latest,
                        )
                else:
                    # Only after the version check: switching a rollback-journal file to
                    # WAL rewrites its header, and a newer database must stay untouched.
                    await self._enable_wal(db)
                    # WAL + NORMAL: a commit survives a process crash; only a power cut
                    # can lose the last transactions, never corrupt the file.
                    await db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
            if not self._read_only:
                await self.migrate()
        except BaseException:
            self._db = None
            await db.close()
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
            if self._path == ":memory:" or not os.path.isfile(self._path):
                raise DatabaseNotFoundError(f"no database at {self._path}")
            # mode=ro: SQLite itself refuses to create or write the file.
            uri = Path(self._path).resolve().as_uri() + "?mode=ro"
            if not os.path.exists(f"{self._path}-wal"):
                # No -wal file: no connection has the database open for writing. Even a
                # read-only WAL open would create -wal/-shm files here; immutable reads
                # the file as it is and creates nothing.
                uri += "&immutable=1"
            return uri, True
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
            raise StoreError(f"cannot open database {self._path}: {exc}") from exc
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
            return await self._read_version(db)
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

    @contextlib.asynccontextmanager
    async def _transaction(self, db: aiosqlite.Connection) -> AsyncIterator[None]:
        """`BEGIN IMMEDIATE ... COMMIT`; rolled back on any error. Caller holds the lock.

        IMMEDIATE takes SQLite's write lock at the start, so a transaction that reads then
        writes can never fail halfway with SQLITE_BUSY because another process wrote first.
        """
        try:
            # Inside the try: a task cancelled while waiting for BEGIN leaves the BEGIN
            # queued on the connection's thread, and its transaction must be undone too.
            await db.execute("BEGIN IMMEDIATE")
            yield
            await db.execute("COMMIT")
        except BaseException:
            # Statements run in submission order on the connection's thread, so even if
            # this task is cancelled while waiting, the ROLLBACK is queued before the lock
            # is released and anyone else's BEGIN.
            # OperationalError means nothing was left to undo: BEGIN failed (busy), SQLite
            # already rolled back (some errors do), or a cancelled COMMIT went through.
            with contextlib.suppress(sqlite3.OperationalError):
                await db.execute("ROLLBACK")
            raise

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the connection inside one IMMEDIATE transaction."""
        db = self._writable()
        async with self._lock, self._transaction(db):
            yield db

    async def _read(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        db = self._conn()
        async with self._lock:
            return await _fetchall(db, sql, params)

    # -- migrations --------------------------------------------------------------------

    async def _read_version(self, db: aiosqlite.Connection) -> int:
        # Checking sqlite_master first keeps this read-only: no CREATE on a read-only open.
        rows = await _fetchall(
            db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'metadata'"
        )
        if not rows:
            return 0
        rows = await _fetchall(
            db, "SELECT value FROM metadata WHERE key = ?", (SCHEMA_VERSION_KEY,)
        )
        if not rows:
            return 0
        value = rows[0][0]
        try:
            return int(value)
        except (TypeError, ValueError):
            raise StoreError(
                f"database {self._path} has an unreadable schema version {value!r}"
            ) from None

    def _refuse_newer(self, version: int) -> None:
        if version > self._latest:
            raise SchemaVersionError(
                f"database {self._path} is at schema version {version}, newer than this"
                f" version of aiohttp_session_store supports ({self._latest}): upgrade the"
                " package",
                found=version,
                supported=self._latest,
            )

    async def schema_version(self) -> int:
        db = self._conn()
        async with self._lock:
            return await self._read_version(db)

    async def pending_migrations(self) -> list[tuple[int, str]]:
        version = await self.schema_version()
        return [(m.version, m.name) for m in self._migrations if m.version > version]

    async def migrate(self) -> list[tuple[int, str]]:
        db = self._writable()
        applied: list[tuple[int, str]] = []
        # The lock is held across every migration, so a concurrent migrate() in this
        # process waits and then finds nothing pending.
        async with self._lock:
            version = await self._read_version(db)
            self._refuse_newer(version)
            for migration in self._migrations:
                if migration.version <= version:
                    continue
                async with self._transaction(db):
                    # Re-read under SQLite's write lock: another process may have migrated
                    # while this one waited for it.
                    version = await self._read_version(db)
                    self._refuse_newer(version)
                    if migration.version <= version:
                        continue
                    await db.execute(METADATA_DDL["sqlite"])
                    for statement in migration.sqlite:
                        await db.execute(statement)
                    await db.execute(
                        _UPSERT_VERSION, (SCHEMA_VERSION_KEY, str(migration.version), now_ms())
                    )
                version = migration.version
                applied.append((migration.version, migration.name))
        return applied

    # -- sessions ----------------------------------------------------------------------

    async def get_session(self, session_id: str) -> Session | None:
        rows = await self._read(_GET_SESSION, (session_id,))
        return _session(rows[0]) if rows else None

    async def insert_session(self, session: Session) -> Session:
        params = _session_args(session)
        async with self._write() as db:
            if self._returning:
                rows = await _fetchall(db, _INSERT_SESSION_RETURNING, params)
                if rows:
                    return _session(rows[0], is_new=True)
            elif await _rowcount(db, _INSERT_SESSION, params) == 1:
                # Inserted or replaced: the row holds exactly the values given.
                return _session(params, is_new=True)
            # A live row won; the transaction holds the write lock, so it is still there.
            rows = await _fetchall(db, _GET_SESSION, (session.id,))
            return _session(rows[0])

    async def _update_returning(
        self, sql: str, params: tuple[object, ...], session_id: str
    ) -> Session | None:
        """Run an UPDATE of one session row and return the row as updated, or None."""
        async with self._write() as db:
            if self._returning:
                rows = await _fetchall(db, f"{sql} RETURNING {_S_COLS}", params)
                return _session(rows[0]) if rows else None
            if await _rowcount(db, sql, params) == 0:
                return None
            rows = await _fetchall(db, _GET_SESSION, (session_id,))
            return _session(rows[0])

    async def touch_session(self, session_id: str, *, now: int, expires_at: int) -> Session | None:
        return await self._update_returning(
            _TOUCH_SESSION, (now, expires_at, session_id, now), session_id
        )

    async def advance_session(
        self, session_id: str, parent_id: str | None, *, now: int, expires_at: int
    ) -> Session | None:
        return await self._update_returning(
            _ADVANCE_SESSION, (parent_id, now, expires_at, session_id, now), session_id
        )

    async def set_chat_id(self, session_id: str, chat_id: str | None, *, now: int) -> bool:
        async with self._write() as db:
            n = await _rowcount(
                db,
                "UPDATE sessions SET chat_id = ?, last_accessed = ?"
                " WHERE id = ? AND expires_at > ?",
                (chat_id, now, session_id, now),
            )
        return n > 0

    async def delete_session(self, session_id: str) -> bool:
        async with self._write() as db:
            n = await _rowcount(db, "DELETE FROM sessions WHERE id = ?", (session_id,))
        return n > 0

    async def delete_session_if_expired(self, session_id: str, now: int) -> bool:
        async with self._write() as db:
            n = await _rowcount(
                db, "DELETE FROM sessions WHERE id = ? AND expires_at <= ?", (session_id, now)
            )
        return n > 0

    async def delete_expired_sessions(self, now: int, limit: int) -> list[str]:
        # SQLite reads a negative LIMIT as "no limit": never let one through.
        if limit <= 0:
            return []
        async with self._write() as db:
            if self._returning:
                rows = await _fetchall(db, _DELETE_EXPIRED_RETURNING, (now, limit))
                # RETURNING's order is unspecified; report in expiry order, like PostgreSQL.
                return [row[0] for row in sorted(rows, key=lambda r: (r[1], r[0]))]
            ids = [row[0] for row in await _fetchall(db, _EXPIRED_IDS, (now, limit))]
            await db.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in ids])
            return ids

    async def clear_sessions(self) -> int:
        async with self._write() as db:
            return await _rowcount(db, "DELETE FROM sessions")

    async def count_sessions(self, *, active_at: int | None = None) -> int:
        if active_at is None:
            rows = await self._read("SELECT count(*) FROM sessions")
        else:
            rows = await self._read(
                "SELECT count(*) FROM sessions WHERE expires_at > ?", (active_at,)
            )
        return int(rows[0][0])

    async def list_sessions(self, query: SessionQuery) -> list[Session]:
        order = _SESSION_ORDER_SQL.get(query.order)
        if order is None:
            raise ValueError(f"unknown session order {query.order!r}: one of {SESSION_ORDERS}")
        where = _SESSION_STATE_SQL.get(query.state)
        if where is None:
            raise ValueError(f"unknown session state {query.state!r}: all, active or expired")
        params: list[object] = [query.now] if where else []
        page = _page(query.limit, query.offset, params)
        rows = await self._read(
            f"SELECT {_S_COLS} FROM sessions{where} ORDER BY {order}{page}", params
        )
        return [_session(row) for row in rows]

    # -- records -----------------------------------------------------------------------

    async def write_batch(self, batch: WriteBatch) -> None:
        if not len(batch):
            return
        async with self._write() as db:
            if batch.sessions:
                await _run_rows(db, _UPSERT_SESSION, [_session_args(s) for s in batch.sessions])
            if batch.deleted_sessions:
                await _run_rows(db, _DELETE_SESSIONS, [(i,) for i in batch.deleted_sessions])
            # Requests before the upstream bodies and the responses that refer to them.
            if batch.requests:
                await _run_rows(db, _INSERT_REQUEST, [_request_args(r) for r in batch.requests])
            if batch.upstream_requests:
                await db.executemany(
                    _UPDATE_UPSTREAM, [(body, rid) for rid, body in batch.upstream_requests]
                )
            if batch.responses:
                await _run_rows(db, _INSERT_RESPONSE, [_response_args(r) for r in batch.responses])
            if batch.nodes:
                await db.executemany(
                    "INSERT INTO lineage (hash, scope, session_id, chat_id, node_id, response_id,"
                    " depth, parent_hash, created_at) VALUES (?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (hash) DO NOTHING",
                    [
                        (
                            n.hash,
                            n.scope,
                            n.session_id,
                            n.chat_id,
                            n.node_id,
                            n.response_id,
                            n.depth,
                            n.parent_hash,
                            n.created_at,
                        )
                        for n in batch.nodes
                    ],
                )

    async def delete_records_before(self, cutoff: int, limit: int) -> int:
        if limit <= 0:
            return 0
        async with self._write() as db:
            # The ids are chosen once: deleting the responses changes which requests the
            # selection would match a second time.
            rows = await _fetchall(db, _OLD_REQUEST_IDS, (cutoff, cutoff - _ORPHAN, limit))
            if not rows:
                return 0
            chosen = json.dumps([row[0] for row in rows])
            await db.execute(
                "DELETE FROM responses WHERE request_id IN (SELECT value FROM json_each(?))",
                (chosen,),
            )
            return await _rowcount(
                db,
                "DELETE FROM requests WHERE request_id IN (SELECT value FROM json_each(?))",
                (chosen,),
            )

    # -- lineage (TEMPORARY: replaced by the shared SQL core) ---------------------------

    async def get_lineage_nodes(self, hashes: Sequence[str]) -> list[LineageNode]:
        rows = await self._read(
            "SELECT hash, scope, session_id, chat_id, node_id, response_id, depth, parent_hash,"
            " created_at FROM lineage WHERE hash IN (SELECT value FROM json_each(?))",
            (json.dumps(list(hashes)),),
        )
        return [LineageNode(*row) for row in rows]

    async def delete_lineage_before(self, cutoff: int, limit: int) -> int:
        async with self._write() as db:
            return await _rowcount(
                db,
                "DELETE FROM lineage WHERE hash IN"
                " (SELECT hash FROM lineage WHERE created_at < ? LIMIT ?)",
                (cutoff, limit),
            )

    async def list_lineage_nodes(self, session_id: str) -> list[LineageNode]:
        rows = await self._read(
            "SELECT hash, scope, session_id, chat_id, node_id, response_id, depth, parent_hash,"
            " created_at FROM lineage WHERE session_id = ? ORDER BY created_at, rowid",
            (session_id,),
        )
        return [LineageNode(*row) for row in rows]

    # -- queries -----------------------------------------------------------------------

    async def list_exchanges(self, query: RequestQuery) -> list[Exchange]:
        params: list[object] = []
        where = _request_where(query, params)
        order = "q.timestamp ASC, q.id ASC" if query.oldest_first else "q.timestamp DESC, q.id DESC"
        page = _page(query.limit, query.offset, params)
        rows = await self._read(f"{_EXCHANGE_SELECT}{where} ORDER BY {order}{page}", params)
        return [_exchange(row) for row in rows]

    async def get_exchange(self, request_id: str) -> Exchange | None:
        rows = await self._read(f"{_EXCHANGE_SELECT} WHERE q.request_id = ?", (request_id,))
        return _exchange(rows[0]) if rows else None

    async def count_requests(self, query: RequestQuery) -> int:
        params: list[object] = []
        where = _request_where(query, params)
        rows = await self._read(f"SELECT count(*) FROM requests q{where}", params)
        return int(rows[0][0])

    async def response_facts(self, query: RequestQuery) -> list[ResponseFact]:
        # Statistics cover every match: like count_requests, limit/offset do not apply.
        params: list[object] = []
        where = _request_where(query, params)
        rows = await self._read(f"{_FACT_SELECT}{where} ORDER BY r.timestamp, r.id", params)
        return [
            ResponseFact(
                session_id=row[0],
                model=row[1],
                outcome=row[2],
                prompt_tokens=row[3],
                completion_tokens=row[4],
                total_tokens=row[5],
                duration_ms=row[6],
                first_byte_ms=row[7],
            )
            for row in rows
        ]


def _new_file(destination: str) -> Path:
    """The path of a file about to be created; refuses to overwrite (a stat, no thread hop)."""
    path = Path(destination)
    if path.exists():
        raise StoreError(f"{destination} already exists; choose a new path for the backup")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
