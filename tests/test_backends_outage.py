"""A store that cannot be reached: typed `StoreUnavailableError`, never a raw driver error,
and recovery without reopening. PostgreSQL outages are real, through a TCP relay the test
cuts and restores; SQLite's are the driver's file-level errors (disk I/O, lock, open)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import PG_DSN
from test_backends import T0, TTL, make_request, make_session

from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.backends.sqlite_thread import ConnNow
from aiohttp_session_store.errors import StoreError, StoreUnavailableError
from aiohttp_session_store.models import RequestQuery, SessionQuery, WriteBatch

if TYPE_CHECKING:
    from aiohttp_session_store.backends.postgres import PostgresBackend


class Relay:
    """A TCP relay to the test server that can be cut (every relayed connection closed,
    new ones refused) and restored on the same port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None

    async def restore(self) -> None:
        await self.start()


@pytest.fixture
async def relay(pg_schema: str) -> AsyncIterator[Relay]:
    r = Relay()
    await r.start()
    try:
        yield r
    finally:
        await r.cut()


def through(relay: Relay, schema: str) -> PostgresBackend:
    from aiohttp_session_store.backends.postgres import PostgresBackend

    dsn = PG_DSN.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    assert dsn != PG_DSN, "the relay only works for the default test DSN"
    return PostgresBackend(dsn, schema=schema, command_timeout=5, max_size=3)


@pytest.mark.postgres
async def test_postgres_outage_is_store_unavailable_and_heals(relay: Relay, pg_schema: str) -> None:
    backend = through(relay, pg_schema)
    await backend.open()
    try:
        await backend.insert_session(make_session("s1"))
        await relay.cut()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: backend.get_session("s1"),
            lambda: backend.count_sessions(),
            lambda: backend.list_sessions(SessionQuery()),
            lambda: backend.list_exchanges(RequestQuery()),
            lambda: backend.schema_version(),
            lambda: backend.insert_session(make_session("s2")),
            lambda: backend.advance_session("s1", "p", now=T0 + 1, expires_at=T0 + TTL),
            lambda: backend.set_chat_id("s1", "c", now=T0 + 1),
            lambda: backend.write_batch(WriteBatch(requests=[make_request("r1")])),
            lambda: backend.delete_records_before(T0, 10),
            lambda: backend.get_lineage_nodes(["h"]),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailableError):
                await call()
        await relay.restore()
        # Back without reopening: the pool replaces its broken connections.
        stored = await backend.get_session("s1")
        assert stored is not None
        assert stored.message_count == 0
        await backend.write_batch(WriteBatch(requests=[make_request("r1")]))
        assert await backend.count_requests(RequestQuery()) == 1
        assert await backend.advance_session("s1", "p", now=T0 + 1, expires_at=T0 + TTL)
    finally:
        await backend.close()


@pytest.mark.postgres
async def test_a_dropped_connection_costs_no_error_once_the_server_is_back(
    relay: Relay, pg_schema: str
) -> None:
    backend = through(relay, pg_schema)
    await backend.open()
    try:
        await backend.insert_session(make_session("s1"))
        for _ in range(3):
            # A restart between two calls: every pooled connection is gone.
            await relay.cut()
            await relay.restore()
            assert await backend.get_session("s1") is not None
            await backend.write_batch(WriteBatch(sessions=[make_session("s1", count=5)]))
    finally:
        await backend.close()
    # Written through the last restored relay, on the real server.
    check = through(relay, pg_schema)
    await check.open()
    try:
        stored = await check.get_session("s1")
        assert stored is not None
        assert stored.message_count == 5
    finally:
        await check.close()


@pytest.mark.postgres
async def test_open_while_the_server_is_unreachable_can_be_retried(
    relay: Relay, pg_schema: str
) -> None:
    backend = through(relay, pg_schema)
    await relay.cut()
    with pytest.raises(StoreUnavailableError, match="cannot connect to PostgreSQL"):
        await backend.open()
    with pytest.raises(StoreError, match="not open"):
        await backend.get_session("s1")
    await relay.restore()
    await backend.open()
    try:
        await backend.insert_session(make_session("s1"))
        assert await backend.get_session("s1") == make_session("s1")
    finally:
        await backend.close()


@pytest.mark.parametrize(
    "message", ["disk I/O error", "database is locked", "unable to open database file"]
)
async def test_sqlite_read_failing_on_the_file_is_unavailable(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:

        async def failing(*args: object, **kwargs: object) -> Any:
            raise sqlite3.OperationalError(message)

        # The driver's own failure, as SQLite reports it when the disk or a lock fails,
        # raised where every read meets the driver (on the connection's thread).
        monkeypatch.setattr(ConnNow, "fetch", failing)
        with pytest.raises(StoreUnavailableError, match=message):
            await backend.count_sessions()
        with pytest.raises(StoreUnavailableError):
            await backend.list_exchanges(RequestQuery())
        monkeypatch.undo()
        assert await backend.count_sessions() == 0
    finally:
        await backend.close()


async def test_sqlite_statement_errors_are_not_outages(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:

        async def failing(*args: object, **kwargs: object) -> Any:
            raise sqlite3.OperationalError("no such table: sessions")

        monkeypatch.setattr(ConnNow, "fetch", failing)
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await backend.count_sessions()
    finally:
        await backend.close()


@pytest.mark.postgres
async def test_only_safe_calls_are_retried_once_after_a_dropped_connection(
    relay: Relay, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    backend = through(relay, pg_schema)
    await backend.open()
    try:
        await backend.insert_session(make_session("s1"))
        pool_class = type(backend._pool)
        real_acquire = pool_class.acquire
        drops = 0

        def acquire(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal drops
            if drops:
                drops -= 1
                raise asyncpg.ConnectionDoesNotExistError("connection was closed")
            return real_acquire(self, *args, **kwargs)

        monkeypatch.setattr(pool_class, "acquire", acquire)
        drops = 1  # a read: retried, succeeds
        assert await backend.get_session("s1") is not None
        drops = 1  # an idempotent write: retried, succeeds
        await backend.write_batch(WriteBatch(requests=[make_request("r1")]))
        assert await backend.count_requests(RequestQuery()) == 1
        drops = 1  # an increment: never replayed blindly
        with pytest.raises(StoreUnavailableError):
            await backend.advance_session("s1", "p", now=T0 + 1, expires_at=T0 + TTL)
        drops = 2  # retried once only
        with pytest.raises(StoreUnavailableError):
            await backend.get_session("s1")
        assert drops == 0
        stored = await backend.get_session("s1")
        assert stored is not None
        assert stored.message_count == 0
    finally:
        monkeypatch.undo()
        await backend.close()
