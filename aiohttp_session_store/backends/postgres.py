"""The PostgreSQL backend: the SQL core over an asyncpg pool, for one store that several
proxy instances share."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar, Final, TypeVar

# asyncpg ships no type information; the `unused-ignore` keeps this line clean once the
# project's mypy configuration says so itself (`ignore_missing_imports` for asyncpg).
import asyncpg  # type: ignore[import-untyped, unused-ignore]

from ..errors import DatabaseNotFoundError, StoreError, StoreUnavailableError
from ..migrations import MIGRATIONS, Migration
from ..models import Session, WriteBatch
from .codecs import SESSIONS
from .core import Conn, Row
from .dialect import POSTGRES, Dialect
from .sql import SQLBackend

__all__ = ("PostgresBackend",)

R = TypeVar("R")

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

# True inside the task that is opening (migrating) a store: only it may use the new pool
# before the schema is ready; every other caller is told the store is unavailable.
_IN_OPEN: Final[ContextVar[bool]] = ContextVar("aiohttp_session_store.pg_opening", default=False)

# Failures of the connection rather than of the statement: the server is down, restarting,
# refusing connections, or the network between is gone. Retrying later can succeed.
_CONNECTION_ERRORS: Final = (
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    # The connection was closed under a call (server gone mid-query, pool terminated);
    # other InterfaceErrors are misuse and stay as they are.
    return isinstance(exc, asyncpg.InterfaceError) and "clos" in str(exc)


# Parameter types of the sessions columns, spelled out where INSERT ... SELECT cannot infer them.
_SESSION_TYPES: Final = {
    "message_count": "integer",
    "created_at": "bigint",
    "last_accessed": "bigint",
    "expires_at": "bigint",
}


def _resolve_sql(synchronous: bool) -> str:
    """Slide a live session or store a fresh one: one statement, one round trip.

    `slid` slides a live row (as `touch_session`); only when it found none does `made`
    insert the fresh row, replacing an expired one (as `insert_session`). A live row that
    another instance inserted after this statement's snapshot makes both return nothing:
    the caller runs it again, and then slides that row. So `is_new` is exact: true only for
    the statement that wrote the row. `xmax` is 0 on a plain insert, set on a replacement.

    Not `synchronous`: a last branch that returns no row sets `synchronous_commit` off for
    this statement's own (implicit) transaction, which commits right after it, so the
    reply does not wait for the WAL flush. A server crash can then lose the last slides
    and creations it acknowledged (as a proxy crash loses the writer's queue), never leave
    a row half-written: the WAL still orders every commit.
    """
    cols = SESSIONS.columns
    at = {c: f"${i}" for i, c in enumerate(cols, 1)}
    names = SESSIONS.names
    typed = ", ".join(f"{at[c]}::{_SESSION_TYPES.get(c, 'text')}" for c in cols)
    excluded = ", ".join(f"{c} = excluded.{c}" for c in cols[1:])
    now, expires, key = at["last_accessed"], at["expires_at"], at["id"]
    sql = (
        f"WITH slid AS (UPDATE sessions SET last_accessed = {now}, expires_at = {expires}"
        f" WHERE id = {key} AND expires_at > {now} RETURNING {names}),"
        f" made AS (INSERT INTO sessions ({names}) SELECT {typed}"
        " WHERE NOT EXISTS (SELECT 1 FROM slid)"
        f" ON CONFLICT (id) DO UPDATE SET {excluded}"
        " WHERE sessions.expires_at <= excluded.created_at"
        f" RETURNING {names}, xmax <> 0 AS replaced)"
        f" SELECT {names}, false, false FROM slid"
        f" UNION ALL SELECT {names}, true, replaced FROM made"
    )
    if not synchronous:
        nulls = ", ".join(f"NULL::{_SESSION_TYPES.get(c, 'text')}" for c in cols)
        sql += (
            f" UNION ALL SELECT {nulls}, false, false"
            " WHERE set_config('synchronous_commit', 'off', true) IS NULL"
        )
    return sql


_RESOLVE_SQL: Final = {flag: _resolve_sql(flag) for flag in (True, False)}


async def _no_reset(conn: Any) -> None:
    """The pool's reset on release, skipped: this backend leaves no session state behind.

    asyncpg's default reset is a round trip per release (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL). Nothing here takes session-level locks, opens cursors outside a
    transaction, listens or runs SET (settings go in the startup packet); an open
    transaction is still rolled back by asyncpg before this is called.
    """


def _count(status: str) -> int:
    """Rows affected, from a command status such as "DELETE 3" (0 for DDL)."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _Conn:
    """The core's `Conn` over an asyncpg connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(await self._conn.fetch(sql, *params))

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return _count(await self._conn.execute(sql, *params))

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        await self._conn.executemany(sql, rows)

    async def insert_rows(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        # One prepared statement, pipelined: a multi-row ON CONFLICT DO UPDATE would fail
        # on an id twice in one batch, and asyncpg's executemany is fast already.
        await self._conn.executemany(sql, rows)


class PostgresBackend(SQLBackend):
    """Sessions and records in PostgreSQL, shared by every proxy instance pointing at it."""

    shared: ClassVar[bool] = True
    name: ClassVar[str] = "postgresql"
    dialect: ClassVar[Dialect] = POSTGRES

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
        adopt: bool = False,
    ) -> None:
        if schema is not None and not _SCHEMA_RE.fullmatch(schema):
            raise ValueError(
                f"invalid PostgreSQL schema name {schema!r}: 1 to 63 characters of"
                " [A-Za-z0-9_], not starting with a digit"
            )
        super().__init__(read_only=read_only, migrations=migrations, adopt=adopt)
        self._dsn = dsn
        self._schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._migrating = False
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        # The DSN may carry a password: never show it.
        return f"<PostgresBackend schema={self._schema!r} read_only={self._read_only}>"

    @property
    def _where(self) -> str:
        return f"PostgreSQL schema {self._schema!r}" if self._schema else "the PostgreSQL database"

    @property
    def _migrate_command(self) -> str:
        return "python -m aiohttp_session_store --db postgresql://... migrate"

    @property
    def schema(self) -> str | None:
        return self._schema

    def _require_pool(self) -> Any:
        if self._migrating and not _IN_OPEN.get():
            # Another task is opening (migrating) this store: its tables may not exist yet.
            raise StoreUnavailableError(f"{self!r} is still opening")
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
        # they would survive even a `RESET ALL` on release (a SET in an init callback would
        # not); the pool runs no reset query at all (see `_no_reset`).
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
                reset=_no_reset,
            )
        except asyncpg.InvalidCatalogNameError as exc:
            if self._read_only:
                raise DatabaseNotFoundError(f"no such PostgreSQL database: {exc}") from exc
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        except Exception as exc:
            # "Not reachable" is transient: open() can be called again later. asyncpg's
            # messages name the host, never the password of the DSN.
            if _unavailable(exc):
                raise StoreUnavailableError(f"cannot connect to PostgreSQL: {exc}") from exc
            if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
                raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
            raise
        self._pool = pool
        self._migrating = True
        token = _IN_OPEN.set(True)
        try:
            if self._read_only:
                await self._check_read_only()
            else:
                await self.migrate()
        except BaseException:
            self._pool = None
            await self._close_pool(pool)
            raise
        finally:
            _IN_OPEN.reset(token)
            self._migrating = False

    async def _check_read_only(self) -> None:
        async def check(conn: Conn) -> None:
            if "metadata" not in await self._tables(conn):
                raise DatabaseNotFoundError(f"no session store in {self._where}")
            version = await self._read_version(conn)
            self._refuse_newer(version)
            self._refuse_older(version)

        await self._run(check, write=False, retry=True)

    async def _prepare_migration(self, conn: Conn) -> None:
        """Serialise migrators, and create the schema when missing.

        Existence is checked first because CREATE ... IF NOT EXISTS still demands the CREATE
        privilege, which a role given a ready-made schema may not have.
        """
        await conn.execute("SELECT pg_advisory_xact_lock($1)", (_MIGRATION_LOCK_KEY,))
        if self._schema is not None and not (
            await conn.fetch("SELECT 1 FROM pg_namespace WHERE nspname = $1", (self._schema,))
        ):
            # Safe to interpolate: validated against _SCHEMA_RE in __init__.
            await conn.execute(f'CREATE SCHEMA "{self._schema}"')

    async def _run(
        self,
        op: Callable[[Conn], Awaitable[R]],
        *,
        write: bool,
        retry: bool,
        transaction: bool = True,
    ) -> R:
        pool = self._writable() if write else self._require_pool()
        outages = rollbacks = 0
        while True:
            try:
                async with pool.acquire() as raw:
                    if write and transaction:
                        async with raw.transaction():
                            return await op(_Conn(raw))
                    return await op(_Conn(raw))
            except asyncpg.TransactionRollbackError:
                # Lost a deadlock or serialization race: rolled back whole, safe to replay.
                rollbacks += 1
                if not retry or rollbacks >= _WRITE_ATTEMPTS:
                    raise
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                # Once: the pool replaces a broken connection on the next acquire, so a
                # single dropped connection (a server restart) costs no error; a server
                # still down fails again at once.
                outages += 1
                if not retry or outages >= 2:
                    raise StoreUnavailableError(f"PostgreSQL is unavailable: {exc}") from exc

    async def resolve_session(
        self, fresh: Session, *, synchronous: bool = True
    ) -> tuple[Session, bool]:
        args = SESSIONS.args(fresh, self.dialect.encode)
        width = len(SESSIONS.columns)
        sql = _RESOLVE_SQL[synchronous]

        async def resolve(conn: Conn) -> tuple[Session, bool] | None:
            rows = await conn.fetch(sql, args)
            if not rows:
                return None
            row = rows[0]
            return SESSIONS.decode(row, is_new=bool(row[width])), bool(row[width + 1])

        # Not retried on a lost reply (it would turn "new" into "existing"); an empty
        # answer (a race with another instance's insert) is run again, boundedly.
        for _ in range(10):
            stored = await self._run(resolve, write=True, retry=False, transaction=False)
            if stored is not None:
                return stored
        raise StoreError(f"session {fresh.id!r} kept changing while being resolved")

    async def write_batch(self, batch: WriteBatch) -> None:
        """The session changes first, in a transaction of their own, then everything else.

        The changes lock session rows that other instances' resolves wait for: committed
        without waiting for the WAL flush (as the slides they extend), those locks are held
        for a round trip, not for the records' synchronous commit.
        """
        if not batch.changes:
            await super().write_batch(batch)
            return
        changes = sorted(batch.changes, key=lambda c: c.session.id)  # see batch_steps
        rows = [self._change_args(c) for c in changes]
        sql = self._q.apply_change

        async def apply(conn: Conn) -> None:
            await conn.execute("BEGIN; SET LOCAL synchronous_commit TO off")
            await conn.executemany(sql, rows)
            await conn.execute("COMMIT")

        await self._run(apply, write=True, retry=True, transaction=False)
        # Committed: a retry of this batch after the records fail (the writer retries the
        # same object, or salvages it item by item) must not add the turns again.
        batch.changes = []
        await super().write_batch(batch)

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

    def is_permanent_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError))
