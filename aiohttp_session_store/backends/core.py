"""The SQL core: lifecycle checks, migrations and sessions, written once over a `Dialect`.

A concrete backend supplies only `_run` (a connection, a transaction when asked, its
locking and error mapping), lifecycle, and what is truly its own (SQLite's multi-row
statements, PostgreSQL's advisory lock and schema creation).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from ..errors import ForeignDatabaseError, SchemaVersionError, StoreError
from ..migrations import METADATA_DDL, SCHEMA_VERSION_KEY, Migration, latest_version
from ..models import Session, SessionQuery, now_ms
from .base import Backend
from .codecs import SESSIONS
from .dialect import Dialect
from .queries import Queries, list_sessions_sql, queries_for

__all__ = ("Conn", "Row", "SQLCore")

R = TypeVar("R")
Row = Sequence[Any]
# Tables a store of ours may share a database with before its first migration: another
# program's `metadata` rows live beside ours under their own keys.
_SHAREABLE = frozenset({"metadata"})


class Conn(Protocol):
    """One connection, as the core uses it (parameters as a sequence, positional rows)."""

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    async def insert_rows(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Run an INSERT ... VALUES for every row, as the driver does that fastest."""


class SQLCore(Backend):
    """The SQL core's base: connection contract, schema checks, migrations and sessions."""

    dialect: ClassVar[Dialect]
    #: Whether UPDATE/INSERT/DELETE ... RETURNING can be used (per instance on SQLite).
    _returning: bool = True

    def __init__(self, *, read_only: bool, migrations: tuple[Migration, ...], adopt: bool) -> None:
        versions = [m.version for m in migrations]
        if len(set(versions)) != len(versions) or any(v <= 0 for v in versions):
            raise ValueError(f"migration versions must be unique and positive, got {versions}")
        self._read_only = read_only
        self._migrations = tuple(sorted(migrations, key=lambda m: m.version))
        self._latest = latest_version(self._migrations)
        self._adopt = adopt

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def _q(self) -> Queries:
        return queries_for(self.dialect)

    # -- what a backend supplies --------------------------------------------------------

    @abc.abstractmethod
    async def _run(
        self,
        op: Callable[[Conn], Awaitable[R]],
        *,
        write: bool,
        retry: bool,
        transaction: bool = True,
    ) -> R:
        """Run `op` on a connection: in a transaction for a write when `transaction` (or
        always, if the backend has no other way), again once after a transient failure when
        `retry` (only for work that is safe to repeat)."""

    @property
    @abc.abstractmethod
    def _where(self) -> str:
        """The store, for messages: "database /path", "PostgreSQL schema 'x'"."""

    @property
    @abc.abstractmethod
    def _migrate_command(self) -> str:
        """The CLI command that migrates this store."""

    async def _prepare_migration(self, conn: Conn) -> None:
        """Inside a migration's transaction, before the version is read (locks, schema)."""

    async def _backfill(self, name: str, conn: Conn) -> None:
        """A migration's named step after its statements, in its transaction."""
        raise ValueError(f"unknown migration backfill {name!r}")

    # -- small helpers -----------------------------------------------------------------

    def _args(self, *values: object) -> list[object]:
        return [self.dialect.encode(v) for v in values]

    async def _read(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return await self._run(lambda c: c.fetch(sql, params), write=False, retry=True)

    async def _write_count(self, sql: str, params: Sequence[object], *, retry: bool = False) -> int:
        return await self._run(
            lambda c: c.execute(sql, params), write=True, retry=retry, transaction=False
        )

    # -- schema and migrations -------------------------------------------------------------

    async def _tables(self, conn: Conn) -> set[str]:
        return {str(row[0]) for row in await conn.fetch(self.dialect.tables_sql)}

    async def _read_version(self, conn: Conn, tables: set[str] | None = None) -> int:
        if "metadata" not in (await self._tables(conn) if tables is None else tables):
            return 0
        rows = await conn.fetch(self._q.read_version, (SCHEMA_VERSION_KEY,))
        if not rows:
            return 0
        value = rows[0][0]
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SchemaVersionError(
                f"{self._where} has an unreadable schema version {value!r}"
            ) from None

    async def _check_store(self, conn: Conn) -> int:
        """The version, after refusing a newer store and a foreign one (nothing written)."""
        tables = await self._tables(conn)
        version = await self._read_version(conn, tables)
        self._refuse_newer(version)
        foreign = sorted(tables - _SHAREABLE)
        if version == 0 and foreign and not self._adopt and not self._read_only:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ForeignDatabaseError(
                f"{self._where} holds tables that are not this package's ({shown}) and no"
                " schema version of ours: refusing to add the store's tables there; choose"
                " another location, or pass adopt=True to use it anyway"
            )
        return version

    def _refuse_newer(self, version: int) -> None:
        if version > self._latest:
            raise SchemaVersionError(
                f"{self._where} is at schema version {version}, newer than this version of"
                f" aiohttp_session_store supports ({self._latest}): upgrade the package"
                " (the database was left untouched)",
                found=version,
                supported=self._latest,
            )

    def _refuse_older(self, version: int) -> None:
        """A read-only open cannot migrate: say how to."""
        if version < self._latest:
            raise SchemaVersionError(
                f"{self._where} is at schema version {version}, this version of"
                f" aiohttp_session_store needs {self._latest}: run migrate"
                f" (`{self._migrate_command}`)",
                found=version,
                supported=self._latest,
            )

    async def schema_version(self) -> int:
        return await self._run(self._read_version, write=False, retry=True)

    async def pending_migrations(self) -> list[tuple[int, str]]:
        version = await self.schema_version()
        return [(m.version, m.name) for m in self._migrations if m.version > version]

    async def _migrate_steps(self, conn: Conn) -> list[Migration]:
        """Apply pending migrations with their version bumps (caller: one transaction).

        The version is read afresh under the write lock: another process may have migrated
        while this one waited for it. A store that already has a version gets one migration
        per transaction, so a failing step keeps the ones before it. A new database gets all
        of them in one: it has nothing to keep, a failure still leaves it empty, and one
        commit instead of one per migration halves the cost of opening a new store.
        """
        await self._prepare_migration(conn)
        version = await self._check_store(conn)
        steps = [m for m in self._migrations if m.version > version]
        if version > 0:
            steps = steps[:1]
        # Bookkeeping must exist before a migration can record itself.
        if steps:
            await conn.execute(METADATA_DDL[self.dialect.name])
        for step in steps:
            for statement in getattr(step, self.dialect.name):
                await conn.execute(statement)
            if step.backfill is not None:
                await self._backfill(step.backfill, conn)
            await conn.execute(
                self._q.upsert_version,
                self._args(SCHEMA_VERSION_KEY, str(step.version), now_ms()),
            )
        return steps

    async def migrate(self) -> list[tuple[int, str]]:
        applied: list[tuple[int, str]] = []
        while True:
            steps = await self._run(self._migrate_steps, write=True, retry=False)
            if not steps:
                return applied
            applied.extend((step.version, step.name) for step in steps)

    # -- sessions ----------------------------------------------------------------------

    async def get_session(self, session_id: str) -> Session | None:
        rows = await self._read(self._q.get_session, self._args(session_id))
        return SESSIONS.decode(rows[0]) if rows else None

    async def insert_session(self, session: Session) -> Session:
        q, args = self._q, SESSIONS.args(session, self.dialect.encode)

        async def insert(conn: Conn) -> Session | None:
            if self._returning:
                rows = await conn.fetch(f"{q.insert_session} RETURNING {SESSIONS.names}", args)
                if rows:
                    return SESSIONS.decode(rows[0], is_new=True)
            elif await conn.execute(q.insert_session, args) == 1:
                # Inserted or replaced: the row holds exactly the values given.
                return SESSIONS.decode(args, is_new=True)
            rows = await conn.fetch(q.get_session, args[:1])
            return SESSIONS.decode(rows[0]) if rows else None

        # Outside a transaction the row that won could be deleted (swept, deleted by another
        # instance) before the SELECT; then inserting again is right. Bounded only against
        # a pathological loop. Not retried: a lost reply would turn "new" into "existing".
        for _ in range(10):
            stored = await self._run(insert, write=True, retry=False, transaction=False)
            if stored is not None:
                return stored
        raise StoreError(f"session {session.id!r} kept vanishing while being created")

    async def _update_session(
        self, sql: str, params: list[object], session_id: str, *, retry: bool
    ) -> Session | None:
        """Run an UPDATE of one session row and return the row as updated, or None."""

        async def update(conn: Conn) -> Session | None:
            if self._returning:
                rows = await conn.fetch(f"{sql} RETURNING {SESSIONS.names}", params)
            elif await conn.execute(sql, params) == 0:
                return None
            else:
                rows = await conn.fetch(self._q.get_session, self._args(session_id))
            return SESSIONS.decode(rows[0]) if rows else None

        return await self._run(update, write=True, retry=retry, transaction=not self._returning)

    async def touch_session(self, session_id: str, *, now: int, expires_at: int) -> Session | None:
        params = self._args(now, expires_at, session_id, now)
        # Setting the same values twice is harmless: safe to retry.
        return await self._update_session(self._q.touch_session, params, session_id, retry=True)

    async def advance_session(
        self, session_id: str, parent_id: str | None, *, now: int, expires_at: int
    ) -> Session | None:
        params = self._args(parent_id, now, expires_at, session_id, now)
        return await self._update_session(self._q.advance_session, params, session_id, retry=False)

    async def set_chat_id(self, session_id: str, chat_id: str | None, *, now: int) -> bool:
        params = self._args(chat_id, now, session_id, now)
        return await self._write_count(self._q.set_chat_id, params, retry=True) > 0

    async def delete_session(self, session_id: str) -> bool:
        return await self._write_count(self._q.delete_session, self._args(session_id)) > 0

    async def delete_session_if_expired(self, session_id: str, now: int) -> bool:
        params = self._args(session_id, now)
        return await self._write_count(self._q.delete_session_if_expired, params) > 0

    async def delete_expired_sessions(self, now: int, limit: int) -> list[str]:
        # SQLite reads a negative LIMIT as "no limit": never let one through.
        if limit <= 0:
            return []
        q = self._q

        async def sweep(conn: Conn) -> list[str]:
            if self._returning:
                rows = await conn.fetch(
                    f"DELETE FROM sessions WHERE id IN ({q.expired_ids}) RETURNING id, expires_at",
                    (now, limit),
                )
                # RETURNING's order is unspecified; report in expiry order (code point ties).
                return [str(r[0]) for r in sorted(rows, key=lambda r: (r[1], r[0]))]
            ids = [str(row[0]) for row in await conn.fetch(q.expired_ids, (now, limit))]
            await conn.executemany(q.delete_session, [(i,) for i in ids])
            return ids

        return await self._run(sweep, write=True, retry=False, transaction=not self._returning)

    async def clear_sessions(self) -> int:
        return await self._write_count(self._q.clear_sessions, ())

    async def count_sessions(self, *, active_at: int | None = None) -> int:
        if active_at is None:
            rows = await self._read(self._q.count_sessions)
        else:
            rows = await self._read(self._q.count_active_sessions, (active_at,))
        return int(rows[0][0])

    async def list_sessions(self, query: SessionQuery) -> list[Session]:
        sql, params = list_sessions_sql(query, self.dialect)
        return [SESSIONS.decode(row) for row in await self._read(sql, params)]
