"""The shared backend suite: every `Backend` method, run against each backend in conftest.

Written only against the abstract interface and the `backend` / `backend_factory` fixtures,
so a new backend passes by being correct, not by resembling SQLite. The few SQLite-only
tests at the end (pre-3.35 fallback paths) use `SQLiteBackend` directly and run once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.errors import StoreError
from aiohttp_session_store.migrations import latest_version
from aiohttp_session_store.models import (
    SESSION_ORDERS,
    Exchange,
    Outcome,
    RequestQuery,
    RequestRecord,
    ResponseRecord,
    Session,
    SessionOrder,
    SessionQuery,
    WriteBatch,
)


def _db_errors() -> tuple[type[BaseException], ...]:
    """What a failing statement raises: each driver's base error, or the store's own."""
    errors: list[type[BaseException]] = [StoreError, sqlite3.Error]
    try:
        import asyncpg  # type: ignore[import-untyped, unused-ignore]
    except ImportError:  # pragma: no cover - the dev environment has it
        pass
    else:
        errors.append(asyncpg.PostgresError)
    return tuple(errors)


DB_ERRORS = _db_errors()

T0 = 1_700_000_000_000
MINUTE = 60_000
TTL = 30 * MINUTE

# Text a real conversation carries: accents, CJK, emoji (outside the BMP), a ZWJ sequence,
# quotes and a newline, so every layer's encoding is exercised.
UNICODE = "Grüße, 你好 👋🏽 — \"quoted\" 'single'\n👨‍👩‍👧 done"


def make_session(
    session_id: str = "s1",
    *,
    created: int = T0,
    ttl: int = TTL,
    first: str = "Hello world",
    chat_id: str | None = None,
    parent_id: str | None = None,
    count: int = 0,
    last_accessed: int | None = None,
) -> Session:
    return Session(
        id=session_id,
        chat_id=chat_id,
        parent_id=parent_id,
        first_user_message=first,
        message_count=count,
        created_at=created,
        last_accessed=created if last_accessed is None else last_accessed,
        expires_at=created + ttl,
    )


def make_request(
    request_id: str,
    *,
    session_id: str | None = "s1",
    ts: int = T0,
    model: str | None = "qwen-max",
    stream: bool = False,
    body: str | None = '{"messages": []}',
    upstream: str | None = None,
    headers: str | None = '{"Authorization": "[REDACTED]"}',
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        session_id=session_id,
        timestamp=ts,
        method="POST",
        path="/v1/chat/completions",
        model=model,
        stream=stream,
        openai_request=body,
        upstream_request=upstream,
        headers=headers,
        created_at=ts,
    )


def make_response(
    request_id: str,
    *,
    response_id: str | None = None,
    session_id: str | None = "s1",
    ts: int = T0 + 100,
    outcome: Outcome = "completed",
    status: int | None = 200,
    tokens: tuple[int | None, int | None, int | None] = (3, 5, 8),
    body: str | None = '{"object": "chat.completion"}',
    duration: int = 100,
    first_byte: int | None = 20,
) -> ResponseRecord:
    return ResponseRecord(
        response_id=response_id or f"resp-{request_id}",
        request_id=request_id,
        session_id=session_id,
        timestamp=ts,
        status_code=status,
        outcome=outcome,
        openai_response=body,
        upstream_response=None,
        parent_id=None,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        total_tokens=tokens[2],
        finish_reason="stop",
        error=None,
        duration_ms=duration,
        first_byte_ms=first_byte,
        created_at=ts,
    )


def ids(exchanges: list[Exchange]) -> list[str]:
    return [e.request.request_id for e in exchanges]


# -- lifecycle ---------------------------------------------------------------------------


async def test_open_applies_every_migration(backend: Backend) -> None:
    assert await backend.schema_version() == latest_version()
    assert await backend.pending_migrations() == []
    assert await backend.migrate() == []
    assert not backend.read_only


async def test_close_is_idempotent(backend_factory: Callable[..., Backend]) -> None:
    b = backend_factory()
    await b.open()
    await b.close()
    await b.close()


async def test_concurrent_opens_of_one_instance_connect_once(
    backend_factory: Callable[..., Backend],
) -> None:
    b = backend_factory()
    await asyncio.gather(b.open(), b.open(), b.open())
    try:
        assert await b.schema_version() == latest_version()
    finally:
        await b.close()  # a second, leaked connection would fail the run (ResourceWarning)


async def test_store_persists_across_instances(backend_factory: Callable[..., Backend]) -> None:
    first = backend_factory()
    await first.open()
    try:
        await first.insert_session(make_session("kept", first=UNICODE))
        await first.advance_session("kept", "p1", now=T0 + 1, expires_at=T0 + TTL + 1)
        await first.write_batch(
            WriteBatch(requests=[make_request("r1", session_id="kept")], responses=[])
        )
        await first.write_batch(WriteBatch(responses=[make_response("r1", session_id="kept")]))
    finally:
        await first.close()

    second = backend_factory()
    await second.open()
    try:
        stored = await second.get_session("kept")
        assert stored is not None
        assert stored.first_user_message == UNICODE
        assert (stored.parent_id, stored.message_count) == ("p1", 1)
        exchange = await second.get_exchange("r1")
        assert exchange is not None
        assert exchange.response == make_response("r1", session_id="kept")
        assert await second.schema_version() == latest_version()
    finally:
        await second.close()


async def test_two_open_instances_see_each_others_commits(
    backend: Backend, backend_factory: Callable[..., Backend]
) -> None:
    other = backend_factory()
    await other.open()
    try:
        await backend.insert_session(make_session("a"))
        assert await other.get_session("a") == make_session("a")
        await other.advance_session("a", "p", now=T0 + 5, expires_at=T0 + TTL + 5)
        seen = await backend.get_session("a")
        assert seen is not None
        assert seen.message_count == 1
        await other.write_batch(WriteBatch(requests=[make_request("r1", session_id="a")]))
        assert await backend.count_requests(RequestQuery()) == 1
    finally:
        await other.close()


async def test_read_only_instance_reads_and_refuses_writes(
    backend: Backend, backend_factory: Callable[..., Backend]
) -> None:
    await backend.insert_session(make_session("a"))
    await backend.write_batch(WriteBatch(requests=[make_request("r1", session_id="a")]))
    reader = backend_factory(read_only=True)
    await reader.open()
    try:
        assert reader.read_only
        assert await reader.get_session("a") == make_session("a")
        assert ids(await reader.list_exchanges(RequestQuery())) == ["r1"]
        assert await reader.pending_migrations() == []
        with pytest.raises(DB_ERRORS):
            await reader.insert_session(make_session("b"))
        with pytest.raises(DB_ERRORS):
            await reader.write_batch(WriteBatch(requests=[make_request("r2")]))
    finally:
        await reader.close()
    assert await backend.get_session("b") is None
    assert await backend.count_requests(RequestQuery()) == 1


# -- sessions ----------------------------------------------------------------------------


async def test_insert_session_new_then_existing(backend: Backend) -> None:
    created = await backend.insert_session(make_session("s1", first="first"))
    assert created.is_new
    assert created == make_session("s1", first="first")

    # A live row wins: the second caller gets the stored row, not its own values.
    again = await backend.insert_session(make_session("s1", created=T0 + 10, first="second"))
    assert not again.is_new
    assert again == make_session("s1", first="first")
    assert await backend.count_sessions() == 1


async def test_insert_session_replaces_an_expired_row(backend: Backend) -> None:
    old = make_session("s1", first="old", chat_id="c-old", parent_id="p-old", count=7)
    await backend.insert_session(old)
    newer = make_session("s1", created=old.expires_at + 1, first="new")
    replaced = await backend.insert_session(newer)
    assert replaced.is_new
    assert replaced == newer  # every column replaced: no chat_id/parent/count carried over
    assert await backend.get_session("s1") == newer
    assert await backend.count_sessions() == 1


async def test_insert_session_treats_expiry_instant_as_expired(backend: Backend) -> None:
    # expires_at <= now means expired, everywhere (Session.is_expired agrees).
    old = make_session("s1", first="old")
    await backend.insert_session(old)
    at_expiry = make_session("s1", created=old.expires_at, first="new")
    assert (await backend.insert_session(at_expiry)).is_new
    just_before = make_session("s1", created=at_expiry.expires_at - 1, first="newest")
    assert not (await backend.insert_session(just_before)).is_new


async def test_concurrent_inserts_of_one_id_make_one_row(backend: Backend) -> None:
    results = await asyncio.gather(
        *(
            backend.insert_session(make_session("race", created=T0 + i, first=f"m{i}"))
            for i in range(50)
        )
    )
    assert sum(r.is_new for r in results) == 1
    winner = next(r for r in results if r.is_new)
    # Everyone is told about the same row, and it is the winner's.
    assert all(r == winner for r in results)
    assert await backend.get_session("race") == winner
    assert await backend.count_sessions() == 1


async def test_cancelled_writes_leave_the_backend_consistent(backend: Backend) -> None:
    # Cancelling callers mid-write (a client disconnecting) must neither wedge the backend
    # nor leave a half-written batch: each operation lands whole or not at all.
    await backend.insert_session(make_session("s1"))
    writes = [
        asyncio.ensure_future(
            backend.write_batch(
                WriteBatch(
                    requests=[make_request(f"r{i}", ts=T0 + i)],
                    responses=[make_response(f"r{i}", ts=T0 + i)],
                )
            )
        )
        for i in range(20)
    ]
    advances = [
        asyncio.ensure_future(
            backend.advance_session("s1", f"p{i}", now=T0 + i, expires_at=T0 + TTL)
        )
        for i in range(20)
    ]
    tasks: list[asyncio.Future[Any]] = [*writes, *advances]
    for _ in range(3):
        await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    exchanges = await backend.list_exchanges(RequestQuery())
    assert all(e.response is not None for e in exchanges)  # never a request alone
    assert len(await backend.response_facts(RequestQuery())) == len(exchanges)
    # Still usable, and no increment that did land was lost.
    stored = await backend.get_session("s1")
    assert stored is not None
    after = await backend.advance_session("s1", "last", now=T0 + 99, expires_at=T0 + TTL)
    assert after is not None
    assert after.message_count == stored.message_count + 1
    await backend.write_batch(WriteBatch(requests=[make_request("after")]))
    assert await backend.get_request("after") is not None


async def test_concurrent_advances_lose_no_increment(backend: Backend) -> None:
    await backend.insert_session(make_session("s1"))
    results = await asyncio.gather(
        *(
            backend.advance_session("s1", f"p{i}", now=T0 + i, expires_at=T0 + TTL + i)
            for i in range(100)
        )
    )
    assert sorted(r.message_count for r in results if r is not None) == list(range(1, 101))
    stored = await backend.get_session("s1")
    assert stored is not None
    assert stored.message_count == 100
    # The last writer's values are the stored ones, whoever that was.
    last = max((r for r in results if r is not None), key=lambda r: r.message_count)
    assert stored == last


async def test_advance_session(backend: Backend) -> None:
    await backend.insert_session(make_session("s1", chat_id="c1"))
    advanced = await backend.advance_session("s1", "p1", now=T0 + 50, expires_at=T0 + 9_999_999)
    assert advanced == replace(
        make_session("s1", chat_id="c1"),
        parent_id="p1",
        message_count=1,
        last_accessed=T0 + 50,
        expires_at=T0 + 9_999_999,
    )
    assert not advanced.is_new
    cleared = await backend.advance_session("s1", None, now=T0 + 60, expires_at=T0 + 9_999_999)
    assert cleared is not None
    assert (cleared.parent_id, cleared.message_count) == (None, 2)
    assert await backend.advance_session("missing", "p", now=T0, expires_at=T0 + 1) is None


async def test_touch_slides_a_live_session(backend: Backend) -> None:
    await backend.insert_session(make_session("s1", chat_id="c1", parent_id="p1", count=3))
    touched = await backend.touch_session("s1", now=T0 + 10, expires_at=T0 + 10 + TTL)
    assert touched == replace(
        make_session("s1", chat_id="c1", parent_id="p1", count=3),
        last_accessed=T0 + 10,
        expires_at=T0 + 10 + TTL,
    )
    assert await backend.get_session("s1") == touched


async def test_touch_of_an_expired_or_missing_row_is_none(backend: Backend) -> None:
    expired = make_session("s1")
    await backend.insert_session(expired)
    for now in (expired.expires_at, expired.expires_at + 1):
        assert await backend.touch_session("s1", now=now, expires_at=now + TTL) is None
    # Left as it was (deleting it is the caller's business), still readable as stored.
    assert await backend.get_session("s1") == expired
    assert await backend.touch_session("missing", now=T0, expires_at=T0 + TTL) is None


async def test_get_session(backend: Backend) -> None:
    assert await backend.get_session("missing") is None
    await backend.insert_session(make_session("s1", first=UNICODE))
    stored = await backend.get_session("s1")
    assert stored == make_session("s1", first=UNICODE)
    assert stored is not None
    assert not stored.is_new


async def test_session_ids_are_exact(backend: Backend) -> None:
    # Client-chosen ids use [A-Za-z0-9._:-]; case matters, and nothing is a pattern.
    for sid in ("Abc", "abc", "a.b:c-d_e", "%", "a_c"):
        await backend.insert_session(make_session(sid, first=sid))
    for sid in ("Abc", "abc", "a.b:c-d_e", "%", "a_c"):
        stored = await backend.get_session(sid)
        assert stored is not None
        assert stored.first_user_message == sid
    assert await backend.get_session("ABC") is None
    assert await backend.get_session("abc_") is None
    assert await backend.delete_session("a%") is False
    assert await backend.count_sessions() == 5


async def test_set_chat_id(backend: Backend) -> None:
    await backend.insert_session(make_session("s1"))
    assert await backend.set_chat_id("s1", "chat-✓", now=T0 + 5) is True
    stored = await backend.get_session("s1")
    assert stored is not None
    assert (stored.chat_id, stored.last_accessed, stored.message_count) == ("chat-✓", T0 + 5, 0)
    assert await backend.set_chat_id("s1", None, now=T0 + 6) is True
    stored = await backend.get_session("s1")
    assert stored is not None
    assert stored.chat_id is None
    assert await backend.set_chat_id("missing", "c", now=T0) is False


async def test_delete_session(backend: Backend) -> None:
    await backend.insert_session(make_session("s1"))
    await backend.insert_session(make_session("s2"))
    assert await backend.delete_session("s1") is True
    assert await backend.delete_session("s1") is False
    assert await backend.get_session("s1") is None
    assert await backend.get_session("s2") is not None


async def test_delete_expired_sessions_is_bounded(backend: Backend) -> None:
    # Five expired (at T0 + 1..5 minutes), two live at `now`.
    for i in range(1, 6):
        await backend.insert_session(make_session(f"old{i}", created=T0 - TTL + i * MINUTE))
    for i in range(2):
        await backend.insert_session(make_session(f"live{i}", created=T0 + i))
    now = T0 + 10 * MINUTE

    assert await backend.delete_expired_sessions(now, 0) == []
    first = await backend.delete_expired_sessions(now, 3)
    assert first == ["old1", "old2", "old3"]  # soonest expired first
    assert await backend.count_sessions() == 4
    rest = await backend.delete_expired_sessions(now, 10)
    assert rest == ["old4", "old5"]
    assert await backend.delete_expired_sessions(now, 10) == []
    assert sorted(s.id for s in await backend.list_sessions(SessionQuery())) == [
        "live0",
        "live1",
    ]


async def test_delete_expired_sessions_counts_expiry_instant(backend: Backend) -> None:
    s = make_session("s1")
    await backend.insert_session(s)
    assert await backend.delete_expired_sessions(s.expires_at - 1, 10) == []
    assert await backend.delete_expired_sessions(s.expires_at, 10) == ["s1"]


async def test_clear_and_count_sessions(backend: Backend) -> None:
    assert await backend.count_sessions() == 0
    assert await backend.clear_sessions() == 0
    await backend.insert_session(make_session("expired", created=T0 - 2 * TTL))
    await backend.insert_session(make_session("live1"))
    await backend.insert_session(make_session("live2", created=T0 + 1))
    assert await backend.count_sessions() == 3
    assert await backend.count_sessions(active_at=T0) == 2
    # Active means expires_at > active_at.
    assert await backend.count_sessions(active_at=T0 + TTL) == 1
    assert await backend.count_sessions(active_at=T0 + TTL + 1) == 0
    assert await backend.clear_sessions() == 3
    assert await backend.count_sessions() == 0


def _session_sort_key(order: SessionOrder) -> tuple[Callable[[Session], int], bool]:
    column, _, direction = order.rpartition("_")
    return (lambda s: int(getattr(s, column))), direction == "desc"


@pytest.mark.parametrize("order", SESSION_ORDERS)
async def test_list_sessions_orders(backend: Backend, order: SessionOrder) -> None:
    # Each column orders the five rows differently, so a wrong ORDER BY cannot pass.
    created = [5, 1, 4, 2, 3]
    accessed = [2, 5, 1, 3, 4]
    ttls = [4, 3, 5, 1, 2]
    counts = [3, 1, 2, 5, 4]
    sessions = [
        make_session(
            f"s{i}",
            created=T0 + created[i],
            last_accessed=T0 + 10 + accessed[i],
            ttl=TTL + ttls[i] * 100,
            count=counts[i],
        )
        for i in range(5)
    ]
    for s in sessions:
        await backend.insert_session(s)
    key, reverse = _session_sort_key(order)
    expected = sorted(sessions, key=key, reverse=reverse)
    listed = await backend.list_sessions(SessionQuery(order=order))
    assert [s.id for s in listed] == [s.id for s in expected]
    assert listed == expected


async def test_list_sessions_default_is_newest_first(backend: Backend) -> None:
    for i in range(3):
        await backend.insert_session(make_session(f"s{i}", created=T0 + i))
    assert [s.id for s in await backend.list_sessions(SessionQuery())] == ["s2", "s1", "s0"]


async def test_list_sessions_states_and_paging(backend: Backend) -> None:
    now = T0 + TTL
    # e*: expires_at <= now (one exactly at now); a*: expires_at > now.
    await backend.insert_session(make_session("e1", created=T0 - 2))
    await backend.insert_session(make_session("e2", created=T0))
    for i in range(1, 4):
        await backend.insert_session(make_session(f"a{i}", created=T0 + i))

    async def listed(**kwargs: object) -> list[str]:
        return [s.id for s in await backend.list_sessions(SessionQuery(**kwargs))]  # type: ignore[arg-type]

    assert await listed(state="all", now=now) == ["a3", "a2", "a1", "e2", "e1"]
    assert await listed(state="active", now=now) == ["a3", "a2", "a1"]
    assert await listed(state="expired", now=now) == ["e2", "e1"]
    assert await listed(state="active", now=now, limit=2) == ["a3", "a2"]
    assert await listed(state="active", now=now, limit=2, offset=2) == ["a1"]
    assert await listed(state="all", now=now, offset=4) == ["e1"]
    assert await listed(state="all", now=now, limit=0) == []
    assert await listed(state="expired", now=now, order="created_at_asc") == ["e1", "e2"]


async def test_list_sessions_rejects_unknown_order_and_state(backend: Backend) -> None:
    await backend.insert_session(make_session("s1"))
    with pytest.raises(ValueError, match="order"):
        await backend.list_sessions(SessionQuery(order="id; DROP TABLE sessions"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state"):
        await backend.list_sessions(SessionQuery(state="dead"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        await backend.list_sessions(SessionQuery(limit=-1))
    assert await backend.count_sessions() == 1


# -- records -----------------------------------------------------------------------------


async def test_write_batch_round_trip(backend: Backend) -> None:
    requests = [
        make_request("r1", body=UNICODE, headers='{"X-Emoji": "🚀"}'),
        make_request(
            "r2",
            session_id=None,
            ts=T0 + 1,
            model=None,
            stream=True,
            body=None,
            upstream=None,
            headers=None,
        ),
    ]
    responses = [
        # Zero token counts are facts, not "unknown": they must not come back as None.
        make_response("r1", tokens=(0, 0, 0), body=UNICODE, first_byte=0),
        make_response(
            "r2",
            session_id=None,
            ts=T0 + 2,
            outcome="client_disconnected",
            status=None,
            tokens=(None, None, None),
            body=None,
            duration=0,
            first_byte=None,
        ),
    ]
    await backend.write_batch(WriteBatch(requests=requests, responses=responses))

    one = await backend.get_exchange("r1")
    assert one == Exchange(requests[0], responses[0])
    assert one is not None
    assert one.response is not None
    assert one.response.prompt_tokens == 0
    assert one.response.completion_tokens == 0
    assert one.response.total_tokens == 0
    assert one.response.first_byte_ms == 0
    assert one.request.stream is False

    two = await backend.get_exchange("r2")
    assert two == Exchange(requests[1], responses[1])
    assert two is not None
    assert two.request.stream is True
    assert await backend.get_request("r1") == requests[0]
    assert await backend.get_request("missing") is None
    assert await backend.get_exchange("missing") is None


async def test_every_outcome_round_trips(backend: Backend) -> None:
    outcomes: list[Outcome] = [
        "completed",
        "client_disconnected",
        "upstream_error",
        "handler_error",
    ]
    await backend.write_batch(
        WriteBatch(
            requests=[make_request(o) for o in outcomes],
            responses=[make_response(o, outcome=o) for o in outcomes],
        )
    )
    for o in outcomes:
        exchange = await backend.get_exchange(o)
        assert exchange is not None
        assert exchange.response is not None
        assert exchange.response.outcome == o


async def test_replayed_batch_is_harmless(backend: Backend) -> None:
    batch = WriteBatch(
        sessions=[make_session("s1", count=2)],
        requests=[make_request("r1"), make_request("r2", ts=T0 + 1)],
        upstream_requests=[("r1", "upstream-1")],
        responses=[make_response("r1"), make_response("r2", ts=T0 + 2)],
    )
    await backend.write_batch(batch)
    await backend.write_batch(batch)
    assert await backend.count_requests(RequestQuery()) == 2
    assert len(await backend.response_facts(RequestQuery())) == 2
    assert await backend.count_sessions() == 1
    exchange = await backend.get_exchange("r1")
    assert exchange is not None
    assert exchange.request.upstream_request == "upstream-1"
    assert exchange.response == make_response("r1")


async def test_replayed_records_are_harmless_and_a_response_can_be_rewritten(
    backend: Backend,
) -> None:
    first = WriteBatch(requests=[make_request("r1", body="first")], responses=[make_response("r1")])
    await backend.write_batch(first)
    await backend.write_batch(first)  # a batch whose commit outcome was unknown, replayed
    assert await backend.count_requests(RequestQuery()) == 1
    # Requests are immutable once written; a response recorded again under its id (sync
    # durability records a stream before its end, then once more) takes the new values.
    await backend.write_batch(
        WriteBatch(
            requests=[make_request("r1", body="second")],
            responses=[make_response("r1", body="second")],
        )
    )
    exchange = await backend.get_exchange("r1")
    assert exchange is not None
    assert exchange.request.openai_request == "first"
    assert exchange.response == make_response("r1", body="second")
    assert len(await backend.response_facts(RequestQuery())) == 1


async def test_delete_records_before_keeps_calls_still_in_flight(backend: Backend) -> None:
    # r-old ended long ago; r-live is old too but has no response yet (still streaming).
    await backend.write_batch(
        WriteBatch(
            requests=[make_request("r-old", ts=T0), make_request("r-live", ts=T0 + 1)],
            responses=[make_response("r-old", ts=T0)],
        )
    )
    assert await backend.delete_records_before(T0 + 10, 10) == 1
    assert await backend.get_exchange("r-old") is None
    assert await backend.get_exchange("r-live") is not None
    # Its response can still be written: the request it refers to is there.
    await backend.write_batch(WriteBatch(responses=[make_response("r-live", ts=T0 + 20)]))
    # A request left without a response a day past the cutoff is an orphan and goes.
    assert await backend.delete_records_before(T0 + 10 + 86_400_001, 10) == 1


async def test_write_batch_session_snapshots_and_deletes(backend: Backend) -> None:
    await backend.insert_session(make_session("gone"))
    await backend.insert_session(make_session("kept", first="original"))
    snapshot = make_session(
        "kept", first="original", chat_id="c", parent_id="p", count=4, last_accessed=T0 + 9
    )
    fresh = make_session("fresh", created=T0 + 1, first=UNICODE)
    await backend.write_batch(WriteBatch(sessions=[snapshot, fresh], deleted_sessions=["gone"]))
    assert await backend.get_session("gone") is None
    assert await backend.get_session("kept") == snapshot
    assert await backend.get_session("fresh") == fresh
    # Deleting an id that is not there is not an error.
    await backend.write_batch(WriteBatch(deleted_sessions=["never-existed"]))
    assert await backend.count_sessions() == 2


async def test_write_batch_is_all_or_nothing(backend: Backend) -> None:
    # A response whose request does not exist breaks the foreign key; the session and the
    # valid request in the same batch must not be committed either.
    bad = WriteBatch(
        sessions=[make_session("s1")],
        requests=[make_request("r1")],
        responses=[make_response("no-such-request")],
    )
    with pytest.raises(DB_ERRORS):
        await backend.write_batch(bad)
    assert await backend.get_session("s1") is None
    assert await backend.count_requests(RequestQuery()) == 0
    # The backend is still usable afterwards.
    await backend.write_batch(WriteBatch(requests=[make_request("r1")]))
    assert await backend.count_requests(RequestQuery()) == 1


async def test_empty_batch_is_a_no_op(backend: Backend) -> None:
    await backend.write_batch(WriteBatch())
    assert await backend.count_requests(RequestQuery()) == 0


async def test_upstream_request_update(backend: Backend) -> None:
    # In the same batch as its request, and in a later one.
    await backend.write_batch(
        WriteBatch(
            requests=[make_request("r1"), make_request("r2", ts=T0 + 1)],
            upstream_requests=[("r1", '{"chat_id": "c1"}')],
        )
    )
    await backend.write_batch(WriteBatch(upstream_requests=[("r2", UNICODE)]))
    r1 = await backend.get_request("r1")
    r2 = await backend.get_request("r2")
    assert r1 is not None
    assert r2 is not None
    assert r1.upstream_request == '{"chat_id": "c1"}'
    assert r2.upstream_request == UNICODE
    assert r1.openai_request == make_request("r1").openai_request
    # An update for a request that is not stored is dropped, not an error.
    await backend.write_batch(WriteBatch(upstream_requests=[("missing", "x")]))
    assert await backend.count_requests(RequestQuery()) == 2


async def test_delete_records_before_is_bounded(backend: Backend) -> None:
    # r0..r5 at T0+0..5; every one but r5 has a response.
    await backend.write_batch(
        WriteBatch(
            requests=[make_request(f"r{i}", ts=T0 + i) for i in range(6)],
            responses=[make_response(f"r{i}", ts=T0 + i) for i in range(5)],
        )
    )
    cutoff = T0 + 4  # r0..r3 are older; r4 (== cutoff) and r5 are kept
    assert await backend.delete_records_before(cutoff, 0) == 0
    assert await backend.delete_records_before(cutoff, 3) == 3
    remaining = ids(await backend.list_exchanges(RequestQuery(oldest_first=True)))
    assert remaining == ["r3", "r4", "r5"]  # oldest go first
    assert await backend.delete_records_before(cutoff, 10) == 1
    assert await backend.delete_records_before(cutoff, 10) == 0
    # Their responses went with them; the rest are intact.
    facts = await backend.response_facts(RequestQuery())
    assert len(facts) == 1
    exchange = await backend.get_exchange("r4")
    assert exchange is not None
    assert exchange.response == make_response("r4", ts=T0 + 4)
    assert await backend.get_exchange("r0") is None


async def test_session_deletion_never_deletes_records(backend: Backend) -> None:
    # Each way a session can go: deleted, swept, removed by the writer, cleared.
    await backend.insert_session(make_session("a"))
    await backend.insert_session(make_session("b", created=T0 - 2 * TTL))
    await backend.insert_session(make_session("c"))
    await backend.insert_session(make_session("d"))
    await backend.write_batch(
        WriteBatch(
            requests=[make_request(f"r-{sid}", session_id=sid) for sid in "abcd"],
            responses=[make_response(f"r-{sid}", session_id=sid) for sid in "abcd"],
        )
    )
    assert await backend.delete_session("a")
    assert await backend.delete_expired_sessions(T0, 10) == ["b"]
    await backend.write_batch(WriteBatch(deleted_sessions=["c"]))
    assert await backend.clear_sessions() == 1
    assert await backend.count_sessions() == 0
    assert await backend.count_requests(RequestQuery()) == 4
    for sid in "abcd":
        exchange = await backend.get_exchange(f"r-{sid}")
        assert exchange is not None
        assert exchange.response is not None
        assert exchange.request.session_id == sid


# -- queries -----------------------------------------------------------------------------


@pytest.fixture
async def records(backend: Backend) -> Backend:
    """Six requests over two sessions, two models and both kinds; r5 has no response."""
    specs = [
        # request_id, session, model, stream, ts
        ("r0", "s1", "qwen-max", False, T0),
        ("r1", "s1", "qwen-max", True, T0 + 10),
        ("r2", "s2", "qwen-plus", False, T0 + 20),
        ("r3", "s1", "qwen-plus", True, T0 + 30),
        ("r4", None, "qwen-max", False, T0 + 40),
        ("r5", "s2", "qwen-max", True, T0 + 50),
    ]
    await backend.write_batch(
        WriteBatch(
            requests=[
                make_request(rid, session_id=sid, model=model, stream=stream, ts=ts)
                for rid, sid, model, stream, ts in specs
            ],
            responses=[
                make_response(
                    rid,
                    session_id=sid,
                    ts=ts + 5,
                    tokens=(n, n * 2, n * 3),
                    duration=100 + n,
                    first_byte=None if stream else n,
                    outcome="upstream_error" if rid == "r2" else "completed",
                )
                for n, (rid, sid, _model, stream, ts) in enumerate(specs[:5])
            ],
        )
    )
    return backend


async def test_list_exchanges_filters(records: Backend) -> None:
    async def listed(**kwargs: object) -> list[str]:
        return ids(await records.list_exchanges(RequestQuery(**kwargs)))  # type: ignore[arg-type]

    assert await listed() == ["r5", "r4", "r3", "r2", "r1", "r0"]  # newest first
    assert await listed(oldest_first=True) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert await listed(session_id="s1") == ["r3", "r1", "r0"]
    assert await listed(session_id="nope") == []
    assert await listed(model="qwen-plus") == ["r3", "r2"]
    assert await listed(stream=True) == ["r5", "r3", "r1"]
    assert await listed(stream=False) == ["r4", "r2", "r0"]
    # since is inclusive, until exclusive: adjacent windows never overlap.
    assert await listed(since=T0 + 20) == ["r5", "r4", "r3", "r2"]
    assert await listed(until=T0 + 20) == ["r1", "r0"]
    assert await listed(since=T0 + 10, until=T0 + 40) == ["r3", "r2", "r1"]
    assert await listed(session_id="s1", model="qwen-max", stream=True) == ["r1"]
    assert await listed(limit=2) == ["r5", "r4"]
    assert await listed(limit=2, offset=2) == ["r3", "r2"]
    assert await listed(limit=2, offset=2, oldest_first=True) == ["r2", "r3"]
    assert await listed(offset=5) == ["r0"]
    assert await listed(limit=0) == []
    # Values are bound, never spliced into SQL.
    assert await listed(session_id="s1' OR '1'='1") == []
    with pytest.raises(ValueError, match="offset"):
        await listed(offset=-1)


async def test_list_exchanges_pairs_each_request_with_its_response(records: Backend) -> None:
    exchanges = {e.request.request_id: e for e in await records.list_exchanges(RequestQuery())}
    assert exchanges["r5"].response is None  # in flight or lost
    for rid in ("r0", "r1", "r2", "r3", "r4"):
        response = exchanges[rid].response
        assert response is not None
        assert response.request_id == rid
    assert exchanges["r2"].response is not None
    assert exchanges["r2"].response.outcome == "upstream_error"
    assert exchanges["r4"].request.session_id is None


async def test_a_second_response_never_duplicates_its_request(backend: Backend) -> None:
    await backend.write_batch(
        WriteBatch(requests=[make_request("r1")], responses=[make_response("r1")])
    )
    await backend.write_batch(
        WriteBatch(responses=[make_response("r1", response_id="other", ts=T0 + 500)])
    )
    exchanges = await backend.list_exchanges(RequestQuery())
    assert len(exchanges) == 1
    # The first response written is the request's response.
    assert exchanges[0].response == make_response("r1")
    assert await backend.get_exchange("r1") == exchanges[0]
    assert await backend.count_requests(RequestQuery()) == 1


async def test_count_requests(records: Backend) -> None:
    assert await records.count_requests(RequestQuery()) == 6
    assert await records.count_requests(RequestQuery(session_id="s1")) == 3
    assert await records.count_requests(RequestQuery(model="qwen-max", stream=False)) == 2
    assert await records.count_requests(RequestQuery(since=T0 + 10, until=T0 + 40)) == 3
    # limit/offset describe a page, not the total.
    assert await records.count_requests(RequestQuery(limit=1, offset=3)) == 6


async def test_response_facts(records: Backend) -> None:
    facts = await records.response_facts(RequestQuery())
    # One per response (r5 has none), oldest first.
    assert [f.duration_ms for f in facts] == [100, 101, 102, 103, 104]
    first = facts[0]
    assert (first.session_id, first.model, first.outcome) == ("s1", "qwen-max", "completed")
    # Zero stays zero; a missing first byte stays None.
    assert (first.prompt_tokens, first.completion_tokens, first.total_tokens) == (0, 0, 0)
    assert first.first_byte_ms == 0
    assert facts[1].first_byte_ms is None
    assert facts[2].outcome == "upstream_error"
    assert facts[2].model == "qwen-plus"

    # Filters apply to the request.
    by_model = await records.response_facts(RequestQuery(model="qwen-plus"))
    assert [f.duration_ms for f in by_model] == [102, 103]
    by_session = await records.response_facts(RequestQuery(session_id="s2"))
    assert [(f.session_id, f.duration_ms) for f in by_session] == [("s2", 102)]
    window = await records.response_facts(RequestQuery(since=T0 + 10, until=T0 + 40, stream=True))
    assert [f.total_tokens for f in window] == [3, 9]
    assert await records.response_facts(RequestQuery(session_id="nope")) == []


# -- SQLite only: the paths taken when the library predates RETURNING (3.35) --------------


@pytest.fixture
async def sqlite_without_returning(db_path: Path) -> AsyncIterator[Backend]:
    from aiohttp_session_store.backends.sqlite import SQLiteBackend

    b = SQLiteBackend(db_path)
    b._returning = False
    await b.open()
    try:
        yield b
    finally:
        await b.close()


async def test_sqlite_fallbacks_without_returning(sqlite_without_returning: Backend) -> None:
    b = sqlite_without_returning
    assert (await b.insert_session(make_session("s1", first="first"))).is_new
    again = await b.insert_session(make_session("s1", created=T0 + 1, first="second"))
    assert not again.is_new
    assert again == make_session("s1", first="first")
    replaced = await b.insert_session(make_session("s1", created=T0 + TTL, first="new"))
    assert replaced.is_new
    assert replaced == make_session("s1", created=T0 + TTL, first="new")

    results = await asyncio.gather(
        *(b.insert_session(make_session("race", first=f"m{i}")) for i in range(20))
    )
    assert sum(r.is_new for r in results) == 1

    now = T0 + TTL
    advanced = await asyncio.gather(
        *(b.advance_session("s1", f"p{i}", now=now, expires_at=now + TTL) for i in range(20))
    )
    assert sorted(a.message_count for a in advanced if a is not None) == list(range(1, 21))
    assert await b.advance_session("missing", None, now=now, expires_at=now) is None

    touched = await b.touch_session("s1", now=now + 1, expires_at=now + 2 * TTL)
    assert touched is not None
    assert touched.expires_at == now + 2 * TTL
    assert await b.touch_session("race", now=T0 + TTL, expires_at=T0 + 2 * TTL) is None

    assert await b.delete_expired_sessions(T0 + TTL, 10) == ["race"]
    assert await b.delete_expired_sessions(T0 + TTL, 10) == []


async def test_sqlite_backup_is_a_consistent_openable_copy(tmp_path: Path) -> None:
    from aiohttp_session_store.backends.sqlite import SQLiteBackend
    from aiohttp_session_store.errors import StoreError

    source = SQLiteBackend(tmp_path / "live.db")
    await source.open()
    try:
        await source.insert_session(Session("s1", "c1", "p1", "hello", 2, 1, 1, 10**15))
        dest = tmp_path / "copy.db"
        await source.backup(str(dest))
        with pytest.raises(StoreError, match="already exists"):
            await source.backup(str(dest))
    finally:
        await source.close()
    copy = SQLiteBackend(dest, read_only=True)
    await copy.open()
    try:
        got = await copy.get_session("s1")
        assert got is not None
        assert (got.chat_id, got.parent_id, got.message_count) == ("c1", "p1", 2)
    finally:
        await copy.close()


async def test_delete_session_if_expired_spares_a_live_row(backend: Backend) -> None:
    await backend.insert_session(make_session("live"))
    await backend.insert_session(make_session("old", created=T0 - 2 * TTL))
    assert await backend.delete_session_if_expired("live", T0 + 1) is False
    assert await backend.get_session("live") is not None
    assert await backend.delete_session_if_expired("old", T0 + 1) is True
    assert await backend.get_session("old") is None
    assert await backend.delete_session_if_expired("missing", T0 + 1) is False


async def test_a_second_sqlite_writer_on_one_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aiohttp_session_store.backends.sqlite import SQLiteBackend

    first, second = SQLiteBackend(tmp_path / "s.db"), SQLiteBackend(tmp_path / "s.db")
    await first.open()
    try:
        await second.open()
        await second.close()
        assert any("already open for writing" in r.message for r in caplog.records)
        caplog.clear()
        reader = SQLiteBackend(tmp_path / "s.db", read_only=True)
        await reader.open()  # readers never claim the file
        await reader.close()
        assert not caplog.records
    finally:
        await first.close()
    caplog.clear()
    again = SQLiteBackend(tmp_path / "s.db")
    await again.open()  # the first one's claim went with its close
    await again.close()
    assert not any("already open" in r.message for r in caplog.records)
