"""The PostgreSQL backend: the `Backend` interface over an asyncpg pool, for one store that
several proxy instances share."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Final, cast, overload

# asyncpg ships no type information; the `unused-ignore` keeps this line clean once the
# project's mypy configuration says so itself (`ignore_missing_imports` for asyncpg).
import asyncpg  # type: ignore[import-untyped, unused-ignore]

from ..errors import DatabaseNotFoundError, SchemaVersionError, StoreError
from ..migrations import (
    METADATA_DDL,
    MIGRATIONS,
    SCHEMA_VERSION_KEY,
    Migration,
    latest_version,
)
from ..models import (
    SESSION_ORDERS,
    Exchange,
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

__all__ = ("PostgresBackend",)

# A schema name goes into DDL and `search_path` as a quoted identifier, which parameters
# cannot express; this pattern (no quotes, at most 63 bytes, PostgreSQL's identifier limit)
# is what makes interpolating it safe.
_SCHEMA_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Key of the transaction-scoped advisory lock that serialises migrators: two instances
# starting together against an empty database must not both run CREATE TABLE. A constant
# of this package's own ("aiohss" in ASCII), so other programs' advisory locks don't collide.
_MIGRATION_LOCK_KEY: Final = 0x61696F687373

# A batch that loses a deadlock or serialization race against another instance is rolled
# back whole by PostgreSQL, and replaying a batch is harmless, so it is simply retried.
_WRITE_ATTEMPTS: Final = 3

# Text comparisons in ORDER BY use the C collation so ties break by code point, the way
# SQLite's BINARY collation does, whatever collation the database was created with.
_ID_ASC: Final = 'id COLLATE "C" ASC'
_ID_DESC: Final = 'id COLLATE "C" DESC'

# The only ORDER BY clauses `list_sessions` ever sends, keyed by `SESSION_ORDERS`.
_SESSION_ORDER_SQL: Final[dict[SessionOrder, str]] = {
    # seq (migration 2): sessions created in the same millisecond keep creation order.
    "created_at_desc": "created_at DESC, seq DESC",
    "created_at_asc": "created_at ASC, seq ASC",
    "last_accessed_desc": f"last_accessed DESC, {_ID_DESC}",
    "last_accessed_asc": f"last_accessed ASC, {_ID_ASC}",
    "expires_at_desc": f"expires_at DESC, {_ID_DESC}",
    "expires_at_asc": f"expires_at ASC, {_ID_ASC}",
    "message_count_desc": f"message_count DESC, created_at DESC, {_ID_DESC}",
}
if set(_SESSION_ORDER_SQL) != set(SESSION_ORDERS):  # pragma: no cover - caught on import
    raise RuntimeError("PostgresBackend's session orders drifted from models.SESSION_ORDERS")

_S_COLS: Final = ", ".join(_SESSION_COLUMNS)
_S_PARAMS: Final = ", ".join(f"${i}" for i in range(1, len(_SESSION_COLUMNS) + 1))
_S_EXCLUDED: Final = ", ".join(f"{c} = EXCLUDED.{c}" for c in _SESSION_COLUMNS[1:])

# A live row (not expired by the newcomer's clock) wins and nothing is returned; an expired
# one is replaced whole, as if it had been swept first. Row locking on the conflict makes two
# instances creating one id at once end with one row and exactly one RETURNING.
_INSERT_SESSION: Final = (
    f"INSERT INTO sessions ({_S_COLS}) VALUES ({_S_PARAMS}) "
    f"ON CONFLICT (id) DO UPDATE SET {_S_EXCLUDED} "
    f"WHERE sessions.expires_at <= EXCLUDED.created_at RETURNING {_S_COLS}"
)
# Write-behind snapshots from the writer: last state wins.
_UPSERT_SESSION: Final = (
    f"INSERT INTO sessions ({_S_COLS}) VALUES ({_S_PARAMS}) "
    f"ON CONFLICT (id) DO UPDATE SET {_S_EXCLUDED}"
)
_INSERT_REQUEST: Final = (
    f"INSERT INTO requests ({', '.join(_REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_REQUEST_COLUMNS) + 1))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
_INSERT_RESPONSE: Final = (
    f"INSERT INTO responses ({', '.join(_RESPONSE_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_RESPONSE_COLUMNS) + 1))}) "
    # An upsert: sync durability records a stream's reply before its end is sent, then
    # again, under the same response_id, with what the handler did after it.
    "ON CONFLICT (response_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _MUTABLE_RESPONSE_COLUMNS)
)

# Exchanges: the request's columns as they are, the response's prefixed, so one row carries
# both without name clashes. A request normally has one response; the lateral join takes the
# first one written so a duplicate could never duplicate the request in a listing.
_EXCHANGE_SELECT: Final = (
    "SELECT "
    + ", ".join(f"r.{c}" for c in _REQUEST_COLUMNS)
    + ", "
    + ", ".join(f"p.{c} AS p_{c}" for c in _RESPONSE_COLUMNS)
    + " FROM requests r LEFT JOIN LATERAL ("
    "SELECT * FROM responses WHERE responses.request_id = r.request_id ORDER BY id LIMIT 1"
    ") p ON TRUE"
)


@overload
def _text(value: str) -> str: ...
@overload
def _text(value: str | None) -> str | None: ...
def _text(value: str | None) -> str | None:
    """Make a text value storable: PostgreSQL TEXT cannot hold U+0000.

    Each NUL becomes the six characters `\\u0000`. In a JSON body a raw NUL can only stand
    inside a string (anywhere else the body was not JSON to begin with), where `\\u0000` is
    its escape, so a stored JSON body still parses to the same value. The price: a literal
    `\\u0000` and a raw NUL in non-JSON text read back the same. SQLite stores NUL as is.
    """
    if value is None:
        return None
    value = cast(str, storable(value))
    if "\x00" not in value:
        return value
    return value.replace("\x00", "\\u0000")


def _count(status: str) -> int:
    """Rows affected, from a command status such as "DELETE 3"."""
    return int(status.rsplit(" ", 1)[-1])


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _session(row: Mapping[str, Any], *, is_new: bool = False) -> Session:
    return Session(
        id=str(row["id"]),
        chat_id=row["chat_id"],
        parent_id=row["parent_id"],
        first_user_message=str(row["first_user_message"]),
        message_count=int(row["message_count"]),
        created_at=int(row["created_at"]),
        last_accessed=int(row["last_accessed"]),
        expires_at=int(row["expires_at"]),
        is_new=is_new,
    )


def _session_args(s: Session) -> tuple[object, ...]:
    return (
        _text(s.id),
        _text(s.chat_id),
        _text(s.parent_id),
        _text(s.first_user_message),
        s.message_count,
        s.created_at,
        s.last_accessed,
        s.expires_at,
    )


def _request(row: Mapping[str, Any]) -> RequestRecord:
    return RequestRecord(
        request_id=str(row["request_id"]),
        session_id=row["session_id"],
        timestamp=int(row["timestamp"]),
        method=str(row["method"]),
        path=str(row["path"]),
        model=row["model"],
        # Stored as INTEGER 0/1, like SQLite, so both schemas stay column-for-column alike.
        stream=bool(row["stream"]),
        openai_request=row["openai_request"],
        upstream_request=row["upstream_request"],
        headers=row["headers"],
        created_at=int(row["created_at"]),
    )


def _request_args(r: RequestRecord) -> tuple[object, ...]:
    return (
        _text(r.request_id),
        _text(r.session_id),
        r.timestamp,
        _text(r.method),
        _text(r.path),
        _text(r.model),
        1 if r.stream else 0,
        _text(r.openai_request),
        _text(r.upstream_request),
        _text(r.headers),
        r.created_at,
    )


def _response(row: Mapping[str, Any], prefix: str = "") -> ResponseRecord:
    def col(name: str) -> Any:
        return row[prefix + name]

    return ResponseRecord(
        response_id=str(col("response_id")),
        request_id=str(col("request_id")),
        session_id=col("session_id"),
        timestamp=int(col("timestamp")),
        status_code=_opt_int(col("status_code")),
        outcome=col("outcome"),
        openai_response=col("openai_response"),
        upstream_response=col("upstream_response"),
        parent_id=col("parent_id"),
        prompt_tokens=_opt_int(col("prompt_tokens")),
        completion_tokens=_opt_int(col("completion_tokens")),
        total_tokens=_opt_int(col("total_tokens")),
        finish_reason=col("finish_reason"),
        error=col("error"),
        duration_ms=int(col("duration_ms")),
        first_byte_ms=_opt_int(col("first_byte_ms")),
        created_at=int(col("created_at")),
    )


def _response_args(r: ResponseRecord) -> tuple[object, ...]:
    return (
        _text(r.response_id),
        _text(r.request_id),
        _text(r.session_id),
        r.timestamp,
        r.status_code,
        _text(r.outcome),
        _text(r.openai_response),
        _text(r.upstream_response),
        _text(r.parent_id),
        r.prompt_tokens,
        r.completion_tokens,
        r.total_tokens,
        _text(r.finish_reason),
        _text(r.error),
        r.duration_ms,
        r.first_byte_ms,
        r.created_at,
    )


def _exchange(row: Mapping[str, Any]) -> Exchange:
    response = None if row["p_response_id"] is None else _response(row, "p_")
    return Exchange(request=_request(row), response=response)


def _request_where(query: RequestQuery, args: list[object]) -> str:
    """The WHERE clause (or "") of `query` over `requests r`, appending its parameters.

    Only fixed fragments and `$n` placeholders go into the SQL; every value is a parameter.
    """
    clauses: list[str] = []

    def add(fragment: str, value: object) -> None:
        args.append(value)
        clauses.append(fragment.format(f"${len(args)}"))

    if query.session_id is not None:
        add("r.session_id = {}", _text(query.session_id))
    if query.model is not None:
        add("r.model = {}", _text(query.model))
    if query.stream is not None:
        add("r.stream = {}", 1 if query.stream else 0)
    if query.since is not None:
        add("r.timestamp >= {}", query.since)
    if query.until is not None:
        add("r.timestamp < {}", query.until)
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _page(limit: int | None, offset: int, args: list[object]) -> str:
    """LIMIT/OFFSET as parameters; no limit when None."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    sql = ""
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 or None, not {limit}")
        args.append(limit)
        sql += f" LIMIT ${len(args)}"
    if offset:
        args.append(offset)
        sql += f" OFFSET ${len(args)}"
    return sql


class PostgresBackend(Backend):
    """Sessions and records in PostgreSQL, shared by every proxy instance pointing at it."""

    shared: ClassVar[bool] = True
    name: ClassVar[str] = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        read_only: bool = False,
        migrations: tuple[Migration, ...] = MIGRATIONS,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
    ) -> None:
        if schema is not None and not _SCHEMA_RE.fullmatch(schema):
            raise ValueError(
                f"invalid PostgreSQL schema name {schema!r}: 1 to 63 characters of"
                " [A-Za-z0-9_], not starting with a digit"
            )
        versions = [m.version for m in migrations]
        if len(set(versions)) != len(versions) or any(v <= 0 for v in versions):
            raise ValueError(f"migration versions must be unique and positive, got {versions}")
        self._dsn = dsn
        self._read_only = read_only
        self._migrations = tuple(sorted(migrations, key=lambda m: m.version))
        self._schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        # The DSN may carry a password: never show it.
        return f"<PostgresBackend schema={self._schema!r} read_only={self._read_only}>"

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def schema(self) -> str | None:
        return self._schema

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise StoreError(f"{self!r} is not open: await backend.open() first")
        return self._pool

    def _writable(self) -> Any:
        """The pool, for a write; refused up front in read-only mode.

        The server would refuse too (default_transaction_read_only), but with an asyncpg
        error type; this gives callers the same `StoreError` as the SQLite backend.
        """
        pool = self._require_pool()
        if self._read_only:
            raise StoreError(f"{self!r} is open read-only")
        return pool

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        # Two concurrent opens must not both build a pool (the loser's would leak).
        async with self._opening:
            if self._pool is None:
                await self._open()

    async def _open(self) -> None:
        # Settings sent in the startup packet are each connection's session defaults, so
        # they survive the `RESET ALL` asyncpg runs when a connection returns to the pool
        # (a SET in an init callback would not).
        server_settings: dict[str, str] = {}
        if self._schema is not None:
            server_settings["search_path"] = f'"{self._schema}"'
        if self._read_only:
            # The server itself then refuses every write, whatever a caller tries.
            server_settings["default_transaction_read_only"] = "on"
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout,
                server_settings=server_settings,
            )
        except asyncpg.InvalidCatalogNameError as exc:
            if self._read_only:
                raise DatabaseNotFoundError(f"no such PostgreSQL database: {exc}") from exc
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        except (
            OSError,
            asyncio.TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            # One error type for "the store is not reachable" (the CLI prints it as one line);
            # asyncpg's messages name the host, never the password of the DSN.
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        self._pool = pool
        try:
            if self._read_only:
                await self._check_read_only()
            else:
                await self.migrate()
        except BaseException:
            self._pool = None
            await self._close_pool(pool)
            raise

    async def _check_read_only(self) -> None:
        async with self._require_pool().acquire() as conn:
            if not await self._has_metadata(conn):
                where = f"schema {self._schema!r}" if self._schema else "the database"
                raise DatabaseNotFoundError(f"no session store in {where}")
            current = await self._read_version(conn)
        latest = latest_version(self._migrations)
        if current > latest:
            raise self._newer_error(current, latest)
        if current < latest:
            raise SchemaVersionError(
                f"the store's schema is at version {current}, this package needs {latest}:"
                " run migrate",
                found=current,
                supported=latest,
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._close_pool(pool)

    async def _close_pool(self, pool: Any) -> None:
        # A graceful close waits for connections in use; a stuck one must not hang shutdown.
        try:
            await asyncio.wait_for(pool.close(), timeout=self._command_timeout)
        except asyncio.TimeoutError:
            pool.terminate()

    async def schema_version(self) -> int:
        async with self._require_pool().acquire() as conn:
            if not await self._has_metadata(conn):
                return 0
            return await self._read_version(conn)

    async def pending_migrations(self) -> list[tuple[int, str]]:
        current = await self.schema_version()
        return [(m.version, m.name) for m in self._migrations if m.version > current]

    async def migrate(self) -> list[tuple[int, str]]:
        pool = self._writable()
        latest = latest_version(self._migrations)
        applied: list[tuple[int, str]] = []
        async with pool.acquire() as conn:
            while True:
                # One transaction per migration: the lock, a fresh look at the version (another
                # instance may have migrated while we waited), the DDL and the version bump
                # commit together or not at all.
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
                    await self._ensure_bookkeeping(conn)
                    current = await self._read_version(conn)
                    if current > latest:
                        # Raising rolls back; the checks above create nothing that exists.
                        raise self._newer_error(current, latest)
                    step = next((m for m in self._migrations if m.version > current), None)
                    if step is None:
                        break
                    for statement in step.postgres:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO metadata (key, value, updated_at) VALUES ($1, $2, $3)"
                        " ON CONFLICT (key) DO UPDATE"
                        " SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at",
                        SCHEMA_VERSION_KEY,
                        str(step.version),
                        now_ms(),
                    )
                applied.append((step.version, step.name))
        return applied

    async def _ensure_bookkeeping(self, conn: Any) -> None:
        """Create the schema and `metadata` when missing (under the migration lock).

        Existence is checked first because CREATE ... IF NOT EXISTS still demands the CREATE
        privilege, which a role given a ready-made schema may not have.
        """
        if self._schema is not None and not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", self._schema
        ):
            # Safe to interpolate: validated against _SCHEMA_RE in __init__.
            await conn.execute(f'CREATE SCHEMA "{self._schema}"')
        if not await self._has_metadata(conn):
            await conn.execute(METADATA_DDL["postgres"])

    @staticmethod
    async def _has_metadata(conn: Any) -> bool:
        # Resolved through search_path, exactly as every unqualified query of this backend.
        return bool(await conn.fetchval("SELECT to_regclass('metadata') IS NOT NULL"))

    @staticmethod
    async def _read_version(conn: Any) -> int:
        value = await conn.fetchval("SELECT value FROM metadata WHERE key = $1", SCHEMA_VERSION_KEY)
        if value is None:
            return 0
        try:
            return int(value)
        except ValueError:
            raise SchemaVersionError(f"unreadable schema version {value!r}") from None

    def _newer_error(self, current: int, latest: int) -> SchemaVersionError:
        return SchemaVersionError(
            f"the store's schema is at version {current}, newer than this package's {latest}:"
            " upgrade aiohttp_session_store (the database was left untouched)",
            found=current,
            supported=latest,
        )

    # -- sessions ----------------------------------------------------------------------

    async def get_session(self, session_id: str) -> Session | None:
        row = await self._require_pool().fetchrow(
            f"SELECT {_S_COLS} FROM sessions WHERE id = $1", _text(session_id)
        )
        return None if row is None else _session(row)

    async def insert_session(self, session: Session) -> Session:
        pool = self._writable()
        args = _session_args(session)
        # The conflicting row could be deleted (swept, deleted by another instance) between
        # the INSERT that lost and the SELECT; then inserting again is right. Bounded only
        # against a pathological loop.
        for _ in range(10):
            row = await pool.fetchrow(_INSERT_SESSION, *args)
            if row is not None:
                return _session(row, is_new=True)
            row = await pool.fetchrow(f"SELECT {_S_COLS} FROM sessions WHERE id = $1", args[0])
            if row is not None:
                return _session(row)
        raise StoreError(f"session {session.id!r} kept vanishing while being created")

    async def touch_session(self, session_id: str, *, now: int, expires_at: int) -> Session | None:
        row = await self._writable().fetchrow(
            "UPDATE sessions SET last_accessed = $2, expires_at = $3"
            f" WHERE id = $1 AND expires_at > $2 RETURNING {_S_COLS}",
            _text(session_id),
            now,
            expires_at,
        )
        return None if row is None else _session(row)

    async def advance_session(
        self, session_id: str, parent_id: str | None, *, now: int, expires_at: int
    ) -> Session | None:
        # One statement: the row lock makes concurrent turns from several instances queue,
        # and each sees the count the previous one committed, so no increment is lost. An
        # expired row is left alone (the caller treats it as gone).
        row = await self._writable().fetchrow(
            "UPDATE sessions SET parent_id = $2, last_accessed = $3, expires_at = $4,"
            " message_count = message_count + 1"
            f" WHERE id = $1 AND expires_at > $3 RETURNING {_S_COLS}",
            _text(session_id),
            _text(parent_id),
            now,
            expires_at,
        )
        return None if row is None else _session(row)

    async def set_chat_id(self, session_id: str, chat_id: str | None, *, now: int) -> bool:
        status = await self._writable().execute(
            "UPDATE sessions SET chat_id = $2, last_accessed = $3"
            " WHERE id = $1 AND expires_at > $3",
            _text(session_id),
            _text(chat_id),
            now,
        )
        return _count(status) > 0

    async def delete_session(self, session_id: str) -> bool:
        status = await self._writable().execute(
            "DELETE FROM sessions WHERE id = $1", _text(session_id)
        )
        return _count(status) > 0

    async def delete_session_if_expired(self, session_id: str, now: int) -> bool:
        status = await self._writable().execute(
            "DELETE FROM sessions WHERE id = $1 AND expires_at <= $2", _text(session_id), now
        )
        return _count(status) > 0

    async def delete_expired_sessions(self, now: int, limit: int) -> list[str]:
        if limit <= 0:
            return []
        # SKIP LOCKED: sweeps from several instances at once each take rows no other sweep
        # holds, so they neither wait on nor error over one another, and no id is reported
        # twice. Returned in expiry order for a deterministic answer.
        rows = await self._writable().fetch(
            "WITH gone AS (DELETE FROM sessions WHERE id IN ("
            "SELECT id FROM sessions WHERE expires_at <= $1"
            f" ORDER BY expires_at, {_ID_ASC} LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " RETURNING id, expires_at)"
            f" SELECT id FROM gone ORDER BY expires_at, {_ID_ASC}",
            now,
            limit,
        )
        return [str(row["id"]) for row in rows]

    async def clear_sessions(self) -> int:
        return _count(await self._writable().execute("DELETE FROM sessions"))

    async def count_sessions(self, *, active_at: int | None = None) -> int:
        pool = self._require_pool()
        if active_at is None:
            value = await pool.fetchval("SELECT count(*) FROM sessions")
        else:
            value = await pool.fetchval(
                "SELECT count(*) FROM sessions WHERE expires_at > $1", active_at
            )
        return int(value)

    async def list_sessions(self, query: SessionQuery) -> list[Session]:
        order = _SESSION_ORDER_SQL.get(query.order)
        if order is None:
            raise ValueError(f"unknown session order {query.order!r}: one of {SESSION_ORDERS}")
        args: list[object] = []
        if query.state == "all":
            where = ""
        elif query.state == "active":
            args.append(query.now)
            where = " WHERE expires_at > $1"
        elif query.state == "expired":
            args.append(query.now)
            where = " WHERE expires_at <= $1"
        else:
            raise ValueError(f"unknown session state {query.state!r}: all, active or expired")
        page = _page(query.limit, query.offset, args)
        rows = await self._require_pool().fetch(
            f"SELECT {_S_COLS} FROM sessions{where} ORDER BY {order}{page}", *args
        )
        return [_session(row) for row in rows]

    # -- records -----------------------------------------------------------------------

    async def write_batch(self, batch: WriteBatch) -> None:
        if not len(batch):
            return
        # Last snapshot of an id wins; sorting by id makes every instance lock session rows
        # in one order, so two batches touching the same sessions cannot deadlock.
        snapshots = {s.id: s for s in batch.sessions}
        sessions = [_session_args(snapshots[k]) for k in sorted(snapshots)]
        deleted = sorted({_text(i) for i in batch.deleted_sessions})
        requests = [_request_args(r) for r in batch.requests]
        upstream = [(_text(rid), _text(body)) for rid, body in batch.upstream_requests]
        responses = [_response_args(r) for r in batch.responses]
        pool = self._writable()
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    if sessions:
                        await conn.executemany(_UPSERT_SESSION, sessions)
                    if deleted:
                        await conn.execute(
                            "DELETE FROM sessions WHERE id = ANY($1::text[])", deleted
                        )
                    # Requests before the upstream bodies and the responses that refer to them.
                    if requests:
                        await conn.executemany(_INSERT_REQUEST, requests)
                    if upstream:
                        await conn.executemany(
                            "UPDATE requests SET upstream_request = $2 WHERE request_id = $1",
                            upstream,
                        )
                    if responses:
                        await conn.executemany(_INSERT_RESPONSE, responses)
                return
            except asyncpg.TransactionRollbackError:
                if attempt == _WRITE_ATTEMPTS:
                    raise

    def is_permanent_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError))

    async def delete_records_before(self, cutoff: int, limit: int) -> int:
        if limit <= 0:
            return 0
        async with self._writable().acquire() as conn, conn.transaction():
            # SKIP LOCKED: concurrent retention sweeps from several instances split the work
            # instead of queueing on (or double-counting) the same rows.
            # Only ended calls (a response exists), so an in-flight call's response never
            # loses its request; orphans a day past the cutoff (a crash lost their
            # response) go too.
            rows = await conn.fetch(
                "SELECT request_id FROM requests WHERE timestamp < $1 AND (timestamp < $2"
                " OR EXISTS (SELECT 1 FROM responses p WHERE p.request_id = requests.request_id))"
                " ORDER BY timestamp, id LIMIT $3 FOR UPDATE SKIP LOCKED",
                cutoff,
                cutoff - _ORPHAN,
                limit,
            )
            if not rows:
                return 0
            ids = [row["request_id"] for row in rows]
            # Responses first: they reference their request.
            await conn.execute("DELETE FROM responses WHERE request_id = ANY($1::text[])", ids)
            status = await conn.execute(
                "DELETE FROM requests WHERE request_id = ANY($1::text[])", ids
            )
            return _count(status)

    # -- queries -----------------------------------------------------------------------

    async def list_exchanges(self, query: RequestQuery) -> list[Exchange]:
        args: list[object] = []
        where = _request_where(query, args)
        direction = "ASC" if query.oldest_first else "DESC"
        page = _page(query.limit, query.offset, args)
        rows = await self._require_pool().fetch(
            f"{_EXCHANGE_SELECT}{where} ORDER BY r.timestamp {direction}, r.id {direction}{page}",
            *args,
        )
        return [_exchange(row) for row in rows]

    async def get_exchange(self, request_id: str) -> Exchange | None:
        row = await self._require_pool().fetchrow(
            f"{_EXCHANGE_SELECT} WHERE r.request_id = $1", _text(request_id)
        )
        return None if row is None else _exchange(row)

    async def count_requests(self, query: RequestQuery) -> int:
        args: list[object] = []
        where = _request_where(query, args)
        value = await self._require_pool().fetchval(
            f"SELECT count(*) FROM requests r{where}", *args
        )
        return int(value)

    async def response_facts(self, query: RequestQuery) -> list[ResponseFact]:
        args: list[object] = []
        where = _request_where(query, args)
        rows = await self._require_pool().fetch(
            "SELECT p.session_id, r.model, p.outcome, p.prompt_tokens, p.completion_tokens,"
            " p.total_tokens, p.duration_ms, p.first_byte_ms"
            f" FROM responses p JOIN requests r ON r.request_id = p.request_id{where}"
            " ORDER BY p.timestamp, p.id",
            *args,
        )
        return [
            ResponseFact(
                session_id=row["session_id"],
                model=row["model"],
                outcome=str(row["outcome"]),
                prompt_tokens=_opt_int(row["prompt_tokens"]),
                completion_tokens=_opt_int(row["completion_tokens"]),
                total_tokens=_opt_int(row["total_tokens"]),
                duration_ms=int(row["duration_ms"]),
                first_byte_ms=_opt_int(row["first_byte_ms"]),
            )
            for row in rows
        ]
