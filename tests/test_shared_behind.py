"""A shared store in batched durability: one awaited statement per call, turns behind.

The handler's turn (`update_parent_id`, `set_chat_id`) is committed by the writer with
atomic SQL; this instance's reads see it at once; two instances advancing one session
lose no turn; sync durability still awaits every change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import PG_DSN
from proxy_apps import FakeClock, poll
from pytest_aiohttp import AiohttpClient

from aiohttp_session_store import (
    SessionManager,
    StoreConfig,
    get_session,
    get_store,
    get_turn,
    setup,
)
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.models import Session, SessionChange, SessionQuery, WriteBatch

asyncpg: Any = pytest.importorskip("asyncpg")

from aiohttp_session_store.backends.postgres import _RESOLVE_SQL, PostgresBackend  # noqa: E402

TIMEOUT = 60.0


def backend_of(schema: str) -> PostgresBackend:
    return PostgresBackend(PG_DSN, schema=schema, max_size=4)


class GatedBackend(PostgresBackend):
    """PostgreSQL whose batches wait for `gate` before they commit."""

    def __init__(self, schema: str) -> None:
        super().__init__(PG_DSN, schema=schema, max_size=4)
        self.gate = asyncio.Event()
        self.gate.set()

    async def write_batch(self, batch: WriteBatch) -> None:
        await self.gate.wait()
        await super().write_batch(batch)


def count_statements(backend: PostgresBackend) -> list[str]:
    """Names of the tasks that sent each statement from now on (the writer's excluded)."""
    sent: list[str] = []
    run = backend._run

    async def counted(op: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        name = task.get_name() if task is not None else "?"
        if not name.startswith("aiohttp_session_store."):
            sent.append(name)
        return await run(op, **kwargs)

    backend._run = counted  # type: ignore[method-assign]
    return sent


async def chat(request: web.Request) -> web.Response:
    """What a stateful proxy does per call: continue the turn, report the node it became."""
    session, turn = get_session(request), get_turn(request)
    assert session is not None
    assert turn is not None
    number = session.message_count + 1
    await turn.advance(chat_id="chat-1", node_id=f"parent-{number}")  # chat id once, turn
    return web.json_response(
        {
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"reply {number}"},
                    "finish_reason": "stop",
                }
            ],
            # What the handler saw: the session before its turn, where lineage continues.
            "seen": [session.message_count, session.parent_id, session.chat_id, turn.parent_id],
        }
    )


@pytest.fixture
async def client_for(
    pg_schema: str, aiohttp_client: AiohttpClient
) -> Callable[[str], Awaitable[tuple[TestClient[Any, Any], PostgresBackend]]]:
    async def make(durability: str) -> tuple[TestClient[Any, Any], PostgresBackend]:
        backend = backend_of(pg_schema)
        app = web.Application()
        setup(app, backend, config=StoreConfig(durability=durability))  # type: ignore[arg-type]
        app.router.add_post("/v1/chat/completions", chat)
        return await aiohttp_client(app), backend

    return make


def body(turn: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Count my statements"}]
    for i in range(1, turn):
        messages += [
            {"role": "assistant", "content": f"reply {i}"},
            {"role": "user", "content": f"turn {i + 1}"},
        ]
    return {"model": "m", "messages": messages}


@pytest.mark.postgres
async def test_a_batched_call_awaits_exactly_one_statement(client_for: Any) -> None:
    client, backend = await client_for("batched")
    sent = count_statements(backend)
    for turn in (1, 2, 3):  # a new session (chat id and turn), then two continued turns
        sent.clear()
        resp = await client.post("/v1/chat/completions", json=body(turn))
        assert resp.status == 200
        seen = await resp.json()
        assert len(sent) == 1, sent  # the resolve; the turn went to the writer
        # Each turn sees the one before, though nothing was committed in between.
        # Each turn sees the one before, though nothing was committed in between, and
        # lineage finds it from memory (the client resends the replies it was given).
        previous = None if turn == 1 else f"parent-{turn - 1}"
        chat_id = None if turn == 1 else "chat-1"
        assert seen["seen"] == [turn - 1, previous, chat_id, previous]
    store = get_store(client.app)
    await store.flush()
    (row,) = await store.manager.get_all_sessions()
    assert (row[1].message_count, row[1].parent_id, row[1].chat_id) == (3, "parent-3", "chat-1")


@pytest.mark.postgres
async def test_sync_durability_still_awaits_every_change(client_for: Any) -> None:
    client, backend = await client_for("sync")
    sent = count_statements(backend)
    for turn, expected in ((1, 3), (2, 2)):  # resolve, (set_chat_id,) update_parent_id
        sent.clear()
        resp = await client.post("/v1/chat/completions", json=body(turn))
        assert resp.status == 200
        assert len(sent) == expected, sent
    # Committed before the answer went out: another connection sees it without a flush.
    rows = await backend.list_sessions(SessionQuery())
    assert [(s.message_count, s.parent_id) for s in rows] == [(2, "parent-2")]


@pytest.mark.postgres
async def test_the_handler_sees_its_own_turn_before_the_commit(pg_schema: str) -> None:
    clock = FakeClock()
    config = StoreConfig(session_timeout=TIMEOUT, clock=clock, flush_interval=3600)
    backend = GatedBackend(pg_schema)
    async with SessionManager(backend, config=config) as m:
        s = await m.resolve_session("s1", "hello")
        assert s.is_new
        backend.gate.clear()  # the writer takes the turns but cannot commit them yet
        assert await m.set_chat_id("s1", "chat-a")
        assert await m.update_parent_id("s1", "p1")
        clock.advance(0.01)
        assert await m.update_parent_id("s1", "p2")
        # The database has none of it yet ...
        row = await m.backend.get_session("s1")
        assert row is not None
        assert (row.message_count, row.parent_id, row.chat_id) == (0, None, None)
        # ... but this instance's reads do, through get and resolve alike.
        for read in (m.get_session("s1"), m.resolve_session("s1")):
            seen = await read
            assert seen is not None
            assert (seen.message_count, seen.parent_id, seen.chat_id) == (2, "p2", "chat-a")
            assert not seen.is_new
        backend.gate.set()
        await m.writer.flush()
        row = await m.backend.get_session("s1")
        assert row is not None
        assert (row.message_count, row.parent_id, row.chat_id) == (2, "p2", "chat-a")
        assert row.expires_at == clock.now + round(TIMEOUT * 1000)
        # Committed: read from the row alone, counted once.
        seen = await m.resolve_session("s1")
        assert (seen.message_count, seen.parent_id) == (2, "p2")
        assert m.writer.change_of("s1") is None


@pytest.mark.postgres
async def test_a_commit_landing_during_a_read_is_not_counted_twice(pg_schema: str) -> None:
    config = StoreConfig(session_timeout=TIMEOUT, flush_interval=3600)
    async with SessionManager(backend_of(pg_schema), config=config) as m:
        await m.resolve_session("s1", "hello")
        assert await m.update_parent_id("s1", "p1")
        backend = m.backend
        resolve = backend.resolve_session

        async def resolve_after_commit(fresh: Session, **kw: Any) -> tuple[Session, bool]:
            # The writer commits the turn while the read is on its way: the row read holds
            # it, and the writer no longer does.
            await m.writer.flush()
            return await resolve(fresh, **kw)

        backend.resolve_session = resolve_after_commit  # type: ignore[method-assign]
        seen = await m.resolve_session("s1")
        assert m.writer.change_of("s1") is None
        assert (seen.message_count, seen.parent_id) == (1, "p1")


@pytest.mark.postgres
async def test_unknown_or_expired_sessions_are_advanced_by_the_awaited_statement(
    pg_schema: str,
) -> None:
    clock = FakeClock()
    config = StoreConfig(session_timeout=TIMEOUT, clock=clock, flush_interval=3600)
    async with SessionManager(backend_of(pg_schema), config=config) as a:
        assert not await a.update_parent_id("missing", "p")  # no row: False, as before
        async with SessionManager(backend_of(pg_schema), config=config) as b:
            await b.resolve_session("s1", "hello")  # known to b only
            assert await a.update_parent_id("s1", "pa")  # a does not know it: awaited
            row = await a.backend.get_session("s1")
            assert row is not None
            assert (row.message_count, row.parent_id) == (1, "pa")
            clock.advance(TIMEOUT + 0.001)
            assert not await b.update_parent_id("s1", "pb")  # expired: not advanced


@pytest.mark.postgres
async def test_two_instances_advancing_one_session_lose_no_turn(pg_schema: str) -> None:
    config = StoreConfig(session_timeout=TIMEOUT, flush_interval=0.002)
    async with (
        SessionManager(backend_of(pg_schema), config=config) as a,
        SessionManager(backend_of(pg_schema), config=config) as b,
    ):
        ids = [f"s{i:02}" for i in range(20)]
        for sid in ids:
            await a.resolve_session(sid, sid)
            await b.resolve_session(sid, sid)

        async def turns(m: SessionManager, name: str, order: list[str]) -> None:
            for n in range(10):
                for sid in order:
                    assert await m.update_parent_id(sid, f"{name}-{n}")
                await asyncio.sleep(0.001)  # let the writers commit batches in between

        # Opposite orders: unsorted batches of two instances would deadlock.
        await asyncio.gather(turns(a, "a", ids), turns(b, "b", ids[::-1]))
        await asyncio.gather(a.writer.flush(), b.writer.flush())
        assert a.writer.write_errors == b.writer.write_errors == 0
        for sid in ids:
            row = await a.backend.get_session(sid)
            assert row is not None
            assert row.message_count == 20  # 10 from each instance, none lost
            assert row.parent_id in {"a-9", "b-9"}


@pytest.mark.parametrize("durability", ["batched", "sync"])
async def test_the_change_sql_is_atomic_and_keeps_times(backend: Backend, durability: str) -> None:
    """`apply_change`, as the writer sends it (one SQL text for both backends)."""
    row = Session("s1", "c0", "p0", "hi", 3, 1_000, 5_000, 9_000)
    await backend.write_batch(WriteBatch(sessions=[row]))

    def change(turns: int, *, accessed: int, expires_at: int, **kw: Any) -> SessionChange:
        session = Session(
            "s1",
            kw.get("chat", "ignored"),
            kw.get("parent", "ignored"),
            "hi",
            0,
            kw.get("created", 1_000),
            accessed,
            expires_at,
        )
        return SessionChange(session, turns, "parent" in kw, "chat" in kw, accessed, expires_at)

    await backend.write_batch(
        WriteBatch(changes=[change(2, accessed=4_000, expires_at=12_000, parent="p1")])
    )
    got = await backend.get_session("s1")
    assert got is not None
    # Count added, parent set, chat kept, last_accessed never moved back.
    assert (got.message_count, got.parent_id, got.chat_id) == (5, "p1", "c0")
    assert (got.last_accessed, got.expires_at) == (5_000, 12_000)
    await backend.write_batch(
        WriteBatch(changes=[change(0, accessed=6_000, expires_at=0, chat="c1")])
    )
    got = await backend.get_session("s1")
    assert got is not None
    assert (got.message_count, got.parent_id, got.chat_id) == (5, "p1", "c1")
    assert (got.last_accessed, got.expires_at) == (6_000, 12_000)
    # A change made on a row since replaced (another created_at) touches nothing.
    await backend.write_batch(
        WriteBatch(changes=[change(1, accessed=7_000, expires_at=20_000, parent="x", created=999)])
    )
    assert await backend.get_session("s1") == got


@pytest.mark.postgres
async def test_batched_slides_do_not_wait_for_the_wal_flush(pg_schema: str) -> None:
    """The batched resolve turns `synchronous_commit` off for its own transaction only."""
    backend = backend_of(pg_schema)
    await backend.open()
    await backend.close()
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        args = ["s1", None, None, "hi", 0, 1_000, 1_000, 61_000]
        for synchronous, expected in ((True, "on"), (False, "off")):
            async with conn.transaction():
                await conn.fetch(_RESOLVE_SQL[synchronous], *args)
                assert await conn.fetchval("SHOW synchronous_commit") == expected
            assert await conn.fetchval("SHOW synchronous_commit") == "on"  # not left behind
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_records_failing_after_the_turns_committed_do_not_count_them_twice(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp_session_store.backends.sql import SQLBackend
    from aiohttp_session_store.errors import StoreUnavailableError

    records = SQLBackend.write_batch
    failures: list[int] = []

    async def fail_once(self: SQLBackend, batch: WriteBatch) -> None:
        if not failures:
            failures.append(len(batch))
            raise StoreUnavailableError("the records' transaction failed (simulated)")
        await records(self, batch)

    config = StoreConfig(session_timeout=TIMEOUT, flush_interval=3600)
    async with SessionManager(backend_of(pg_schema), config=config) as m:
        await m.resolve_session("s1", "hello")
        await m.writer.flush()
        monkeypatch.setattr(SQLBackend, "write_batch", fail_once)
        assert await m.update_parent_id("s1", "p1")
        await m.writer.flush()  # the turn commits, the records fail, the batch is retried
        assert failures
        row = await m.backend.get_session("s1")
        assert row is not None
        assert (row.message_count, row.parent_id) == (1, "p1")


@pytest.mark.postgres
async def test_a_turn_on_a_session_deleted_here_is_refused_while_its_change_is_held(
    pg_schema: str,
) -> None:
    config = StoreConfig(session_timeout=TIMEOUT, flush_interval=3600)
    backend = GatedBackend(pg_schema)
    async with SessionManager(backend, config=config) as m:
        await m.resolve_session("s1", "hello")
        backend.gate.clear()  # the change stays held by the writer
        assert await m.update_parent_id("s1", "p1")
        assert await m.delete_session("s1")
        # As on every other store: no session, no turn (not "accepted", then lost).
        assert not await m.update_parent_id("s1", "p2")
        assert await m.get_session("s1") is None
        backend.gate.set()
        await m.writer.flush()
        assert await m.backend.get_session("s1") is None


@pytest.mark.postgres
async def test_another_instance_sees_a_turn_without_waiting_for_a_batch(pg_schema: str) -> None:
    # An hour's flush interval: only a writer that commits turns at once (a shared store's)
    # lets the other instance see the parent before the timeout.
    config = StoreConfig(session_timeout=TIMEOUT, flush_interval=3600)
    async with (
        SessionManager(backend_of(pg_schema), config=config) as a,
        SessionManager(backend_of(pg_schema), config=config) as b,
    ):
        await a.resolve_session("s1", "hello")
        assert await a.update_parent_id("s1", "p1")

        async def parent_seen_by_b() -> bool:
            seen = await b.get_session("s1")
            return seen is not None and seen.parent_id == "p1"

        await poll(parent_seen_by_b, timeout=10)
