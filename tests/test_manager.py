"""SessionManager: the 18 methods, against every backend (the `backend_kind` fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from proxy_apps import FakeClock

from aiohttp_session_store import InvalidSessionIdError, SessionManager, StoreConfig
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.config import Durability

TIMEOUT = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_manager(
    backend_factory: Callable[..., Backend], clock: FakeClock
) -> Callable[..., SessionManager]:
    def make(**config: object) -> SessionManager:
        cfg = StoreConfig(**{"session_timeout": TIMEOUT, **config})  # type: ignore[arg-type]
        return SessionManager(backend_factory(), config=cfg, clock=clock)

    return make


@pytest.fixture(params=["batched", "sync"])
async def manager(
    request: pytest.FixtureRequest, make_manager: Callable[..., SessionManager]
) -> AsyncIterator[SessionManager]:
    m = make_manager(durability=request.param)
    await m.open()
    try:
        yield m
    finally:
        await m.shutdown()


# -- ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world", "3e25960a79dbc69b674cd4ec67a72c62"),
        ("hello", "5d41402abc4b2a76b9719d911017c592"),
        (" Hello world ", "0ba3d5eb40371eb5296a5b695a448cca"),
        ("你好", "7eca689f0d3389d9dea66ae112e5cfd7"),
    ],
)
def test_generate_session_id_vectors(text: str, expected: str) -> None:
    got = SessionManager.generate_session_id(text)
    assert got == expected
    assert len(got) == 32


def test_generate_session_id_does_not_trim() -> None:
    assert SessionManager.generate_session_id(" Hello world") != SessionManager.generate_session_id(
        "Hello world"
    )


@pytest.mark.parametrize("bad", ["", None, 42, b"bytes", ["list"]])
def test_generate_session_id_rejects_empty_and_non_strings(bad: object) -> None:
    with pytest.raises(ValueError, match="session id"):
        SessionManager.generate_session_id(bad)


# -- create / get / update ---------------------------------------------------------------


async def test_create_session_starts_empty(manager: SessionManager, clock: FakeClock) -> None:
    s = await manager.create_session("s1", first_user_message="Hello world")
    assert s.is_new
    assert s.parent_id is None
    assert s.chat_id is None
    assert s.message_count == 0
    assert s.first_user_message == "Hello world"
    assert s.created_at == s.last_accessed == clock.now
    assert s.expires_at == clock.now + TIMEOUT * 1000


async def test_create_existing_live_id_returns_it(manager: SessionManager) -> None:
    first = await manager.create_session("s1", chat_id="c1", first_user_message="hi")
    again = await manager.create_session("s1", chat_id="other", first_user_message="other")
    assert not again.is_new
    assert again.chat_id == "c1"
    assert again.first_user_message == "hi"
    assert again.created_at == first.created_at
    assert await manager.get_session_count() == 1


async def test_get_session_slides_expiry(manager: SessionManager, clock: FakeClock) -> None:
    await manager.create_session("s1")
    clock.advance(TIMEOUT - 1)
    got = await manager.get_session("s1")
    assert got is not None
    assert not got.is_new
    assert got.last_accessed == clock.now
    assert got.expires_at == clock.now + TIMEOUT * 1000
    clock.advance(TIMEOUT - 1)  # past the original expiry, within the slid one
    assert await manager.get_session("s1") is not None


async def test_get_missing_is_none(manager: SessionManager) -> None:
    assert await manager.get_session("nope") is None


async def test_update_parent_and_get_parent(manager: SessionManager) -> None:
    await manager.create_session("s1")
    assert await manager.update_session("s1", "p1")
    assert await manager.get_parent_id("s1") == "p1"
    assert await manager.update_parent_id("s1", "p2")
    s = await manager.get_session("s1")
    assert s is not None
    assert s.parent_id == "p2"
    assert s.message_count == 2


async def test_update_missing_is_false(manager: SessionManager) -> None:
    assert await manager.update_session("nope", "p") is False
    assert await manager.update_parent_id("nope", "p") is False
    assert await manager.get_parent_id("nope") is None


async def test_is_new_session(manager: SessionManager) -> None:
    assert await manager.is_new_session("s1") is True
    await manager.create_session("s1")
    assert await manager.is_new_session("s1") is False


async def test_set_chat_id(manager: SessionManager) -> None:
    await manager.create_session("s1")
    assert await manager.set_chat_id("s1", "chat-9")
    s = await manager.get_session("s1")
    assert s is not None
    assert s.chat_id == "chat-9"
    assert await manager.set_chat_id("nope", "chat") is False


async def test_delete_session(manager: SessionManager) -> None:
    await manager.create_session("s1")
    assert await manager.delete_session("s1") is True
    assert await manager.get_session("s1") is None
    assert await manager.delete_session("s1") is False


# -- listings and metrics ------------------------------------------------------------------


async def test_counts_active_and_all(manager: SessionManager, clock: FakeClock) -> None:
    await manager.create_session("old")
    clock.advance(10)
    await manager.create_session("mid")
    clock.advance(10)
    await manager.create_session("new")
    assert await manager.get_session_count() == 3
    assert await manager.get_active_sessions() == ["new", "mid", "old"]
    all_sessions = await manager.get_all_sessions()
    assert [sid for sid, _ in all_sessions] == ["new", "mid", "old"]
    assert all(sid == s.id for sid, s in all_sessions)

    clock.advance(TIMEOUT - 15)  # "old" expired, the others not
    assert await manager.get_session_count() == 2
    assert await manager.get_active_sessions() == ["new", "mid"]
    # Expired but not yet swept rows are still "all".
    assert len(await manager.get_all_sessions()) == 3


async def test_metrics(manager: SessionManager, clock: FakeClock) -> None:
    await manager.create_session("a")
    await manager.create_session("b")
    await manager.create_session("a")  # existing: not created again
    m = await manager.get_metrics()
    assert (m["active_sessions"], m["total_sessions"], m["total_created"]) == (2, 2, 2)
    assert m["total_cleaned"] == 0
    clock.advance(TIMEOUT + 1)
    m = await manager.get_metrics()
    assert (m["active_sessions"], m["total_sessions"]) == (0, 2)
    assert await manager.cleanup() == 2
    m = await manager.get_metrics()
    assert (m["active_sessions"], m["total_sessions"], m["total_cleaned"]) == (0, 0, 2)
    assert m["total_created"] == 2
    for key in ("write_errors", "records_dropped"):
        assert m[key] == 0


async def test_clear_all(manager: SessionManager) -> None:
    for i in range(5):
        await manager.create_session(f"s{i}")
    assert await manager.clear_all() == 5
    assert await manager.get_session_count() == 0
    assert await manager.get_session("s1") is None


# -- expiry ------------------------------------------------------------------------------


async def test_expired_session_is_gone_and_deleted_lazily(
    manager: SessionManager, clock: FakeClock
) -> None:
    await manager.create_session("s1")
    clock.advance(TIMEOUT)
    assert await manager.get_session("s1") is None
    # The read deleted the row: it is not waiting for a sweep.
    m = await manager.get_metrics()
    assert m["total_sessions"] == 0
    assert m["total_cleaned"] == 1
    assert await manager.cleanup() == 0


async def test_update_of_expired_session_is_false(
    manager: SessionManager, clock: FakeClock
) -> None:
    await manager.create_session("s1")
    clock.advance(TIMEOUT + 1)
    assert await manager.update_parent_id("s1", "p") is False


async def test_create_replaces_expired_row(manager: SessionManager, clock: FakeClock) -> None:
    await manager.create_session("s1", chat_id="old-chat")
    await manager.update_parent_id("s1", "p1")
    clock.advance(TIMEOUT + 1)
    s = await manager.create_session("s1")
    assert s.is_new
    assert s.chat_id is None
    assert s.parent_id is None
    assert s.message_count == 0


async def test_cleanup_deletes_only_expired(manager: SessionManager, clock: FakeClock) -> None:
    for i in range(7):
        await manager.create_session(f"old{i}")
    clock.advance(TIMEOUT / 2)
    await manager.create_session("young")
    await manager.get_session("old0")  # slid: no longer expiring with the others
    clock.advance(TIMEOUT / 2 + 1)
    assert await manager.cleanup() == 6
    assert set(await manager.get_active_sessions()) == {"young", "old0"}


async def test_cleanup_works_in_bounded_batches(
    make_manager: Callable[..., SessionManager], clock: FakeClock
) -> None:
    m = make_manager(sweep_batch_size=3)
    await m.open()
    try:
        for i in range(10):
            await m.create_session(f"s{i}")
        clock.advance(TIMEOUT + 1)
        assert await m.cleanup() == 10
        assert (await m.get_metrics())["total_sessions"] == 0
    finally:
        await m.shutdown()


async def test_start_and_stop_cleanup(
    make_manager: Callable[..., SessionManager], clock: FakeClock
) -> None:
    m = make_manager(sweep_interval=0.01)
    await m.open()
    try:
        await m.create_session("s1")
        clock.advance(TIMEOUT + 1)
        m.start_cleanup()
        m.start_cleanup()  # idempotent: still one timer
        assert m.cleanup_running
        for _ in range(200):
            if m.total_cleaned:
                break
            await asyncio.sleep(0.01)
        assert m.total_cleaned == 1
        m.stop_cleanup()
        m.stop_cleanup()
        await asyncio.sleep(0)
        assert not m.cleanup_running
        await m.create_session("s2")
        clock.advance(TIMEOUT + 1)
        await asyncio.sleep(0.05)
        assert m.total_cleaned == 1  # stopped: nothing swept since
    finally:
        await m.shutdown()


async def test_start_cleanup_needs_a_running_loop(
    make_manager: Callable[..., SessionManager],
) -> None:
    m = make_manager()

    def outside_loop() -> None:
        m.start_cleanup()

    with pytest.raises(RuntimeError):
        await asyncio.get_running_loop().run_in_executor(None, outside_loop)


# -- shutdown, persistence ------------------------------------------------------------------


async def test_shutdown_keeps_rows_and_persists_across_managers(
    make_manager: Callable[..., SessionManager],
) -> None:
    first = make_manager()
    await first.open()
    first.start_cleanup()
    await first.create_session("s1", first_user_message="Привет, 世界 🌍")
    await first.set_chat_id("s1", "chat-1")
    await first.update_parent_id("s1", "p1")
    await first.shutdown()
    assert not first.cleanup_running

    second = make_manager()
    await second.open()
    try:
        s = await second.get_session("s1")
        assert s is not None
        assert (s.chat_id, s.parent_id, s.message_count) == ("chat-1", "p1", 1)
        assert s.first_user_message == "Привет, 世界 🌍"
    finally:
        await second.shutdown()


async def test_context_manager_opens_and_shuts_down(
    make_manager: Callable[..., SessionManager],
) -> None:
    async with make_manager() as m:
        await m.create_session("s1")
    async with make_manager() as m:
        assert await m.get_session("s1") is not None


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", None, 5])
async def test_methods_reject_an_empty_or_non_string_id(
    manager: SessionManager, bad: object
) -> None:
    with pytest.raises(InvalidSessionIdError):
        await manager.create_session(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSessionIdError):
        await manager.get_session(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSessionIdError):
        await manager.update_parent_id(bad, "p")  # type: ignore[arg-type]


# -- concurrency ----------------------------------------------------------------------------


async def test_concurrent_creates_of_one_id_make_one_row(manager: SessionManager) -> None:
    results = await asyncio.gather(
        *(manager.create_session("same", first_user_message="hi") for _ in range(50))
    )
    assert sum(r.is_new for r in results) == 1
    assert {r.created_at for r in results} == {results[0].created_at}
    m = await manager.get_metrics()
    assert m["total_sessions"] == 1
    assert m["total_created"] == 1


async def test_concurrent_updates_lose_no_increment(manager: SessionManager) -> None:
    await manager.create_session("s1")
    oks = await asyncio.gather(*(manager.update_parent_id("s1", f"p{i}") for i in range(100)))
    assert all(oks)
    s = await manager.get_session("s1")
    assert s is not None
    assert s.message_count == 100


async def test_concurrent_updates_on_a_cold_cache(
    make_manager: Callable[..., SessionManager],
) -> None:
    async with make_manager() as m:
        await m.create_session("s1")
    # A new manager: the session is only in the database, every update starts with a read.
    async with make_manager() as m:
        await asyncio.gather(*(m.update_parent_id("s1", f"p{i}") for i in range(100)))
        s = await m.get_session("s1")
        assert s is not None
        assert s.message_count == 100


async def test_reads_see_own_writes_before_commit(
    make_manager: Callable[..., SessionManager],
) -> None:
    # A long flush interval: nothing is committed during the test, reads still see it.
    async with make_manager(flush_interval=30.0) as m:
        await m.create_session("s1")
        await m.update_parent_id("s1", "p1")
        await m.set_chat_id("s1", "c1")
        s = await m.get_session("s1")
        assert s is not None
        assert (s.parent_id, s.chat_id, s.message_count) == ("p1", "c1", 1)
        await m.delete_session("s1")
        assert await m.get_session("s1") is None


@pytest.mark.parametrize(
    "text", ["Hello world", "你好，世界", "emoji 🎉🚀", "מה שלומך", "e\u0301", "tab\tnew\nline"]
)
async def test_unicode_first_messages_round_trip(
    make_manager: Callable[..., SessionManager], text: str
) -> None:
    sid = SessionManager.generate_session_id(text)
    async with make_manager() as m:
        await m.create_session(sid, first_user_message=text)
    async with make_manager() as m:
        s = await m.get_session(sid)
        assert s is not None
        assert s.first_user_message == text


async def test_resolve_session_creates_then_slides(
    manager: SessionManager, clock: FakeClock
) -> None:
    first = await manager.resolve_session("s1", first_user_message="hi")
    assert first.is_new
    assert first.first_user_message == "hi"
    clock.advance(TIMEOUT / 2)
    again = await manager.resolve_session("s1", first_user_message="ignored")
    assert not again.is_new
    assert again.first_user_message == "hi"
    assert again.created_at == first.created_at
    assert again.expires_at == clock.now + TIMEOUT * 1000
    m = await manager.get_metrics()
    assert (m["total_created"], m["total_sessions"]) == (1, 1)


async def test_resolve_session_replaces_an_expired_session(
    manager: SessionManager, clock: FakeClock
) -> None:
    await manager.resolve_session("s1")
    await manager.update_parent_id("s1", "p1")
    clock.advance(TIMEOUT + 1)
    fresh = await manager.resolve_session("s1")
    assert fresh.is_new
    assert (fresh.parent_id, fresh.message_count) == (None, 0)
    assert (await manager.get_metrics())["total_created"] == 2


async def test_concurrent_resolves_of_one_new_id_create_one_session(
    manager: SessionManager,
) -> None:
    results = await asyncio.gather(*(manager.resolve_session("same") for _ in range(50)))
    assert sum(r.is_new for r in results) == 1
    assert (await manager.get_metrics())["total_sessions"] == 1


async def test_set_chat_id_of_an_expired_session_is_false(
    manager: SessionManager, clock: FakeClock
) -> None:
    await manager.create_session("s1")
    clock.advance(TIMEOUT + 1)
    assert await manager.set_chat_id("s1", "chat") is False


async def test_sessions_created_in_one_millisecond_list_newest_first(
    manager: SessionManager,
) -> None:
    for sid in ("zeta", "alpha", "mid"):  # the injected clock does not move: one instant
        await manager.create_session(sid)
    assert await manager.get_active_sessions() == ["mid", "alpha", "zeta"]
    assert [sid for sid, _ in await manager.get_all_sessions()] == ["mid", "alpha", "zeta"]


# -- memory bounded in bytes ------------------------------------------------------------------


async def test_a_long_first_message_is_cut_and_marked_in_memory_and_in_the_database(
    make_manager: Callable[..., SessionManager],
) -> None:
    text = "é" * 500_000  # 1,000,000 UTF-8 bytes
    sid = SessionManager.generate_session_id(text)  # derived from the whole text
    async with make_manager(max_first_message_bytes=1000) as m:
        s = await m.resolve_session(sid, first_user_message=text)
        assert s.id == sid
        assert s.first_user_message.endswith("…[cut]")
        assert text.startswith(s.first_user_message.removesuffix("…[cut]"))
        assert 990 <= len(s.first_user_message.encode()) <= 1000
        short = await m.create_session("short", first_user_message="fits")
        assert short.first_user_message == "fits"
    async with make_manager(max_first_message_bytes=1000) as m:
        stored = await m.get_session(sid)
        assert stored is not None
        assert stored.first_user_message == s.first_user_message


# The session cache exists only for a store one process owns (SQLite); a shared store
# holds nothing per session in memory.


async def test_the_session_cache_is_bounded_in_bytes(tmp_path: Path, clock: FakeClock) -> None:
    bound = 512 * 1024
    config = StoreConfig(max_cache_bytes=bound, max_first_message_bytes=64 * 1024)
    async with SessionManager(tmp_path / "s.db", config=config, clock=clock) as m:
        cache = m.cache
        assert cache is not None
        for i in range(300):  # 300 conversations opening with 800 KiB each: 234 MiB offered
            text = f"{i} " + "x" * (800 * 1024)
            await m.resolve_session(SessionManager.generate_session_id(text), text)
            assert cache.bytes <= bound
        assert 0 < len(cache) < 300
        # Forgotten sessions are still served, from the database.
        first = SessionManager.generate_session_id("0 " + "x" * (800 * 1024))
        got = await m.get_session(first)
        assert got is not None
        assert len(got.first_user_message.encode()) <= 64 * 1024


async def test_the_session_cache_is_bounded_in_count(tmp_path: Path, clock: FakeClock) -> None:
    config = StoreConfig(max_cached_sessions=10)
    async with SessionManager(tmp_path / "s.db", config=config, clock=clock) as m:
        for i in range(50):
            await m.create_session(f"s{i}")
        assert m.cache is not None
        assert len(m.cache) == 10
        assert await m.get_session_count() == 50


async def test_the_configs_clock_is_the_managers_clock(
    backend_factory: Callable[..., Backend], clock: FakeClock
) -> None:
    config = StoreConfig(session_timeout=TIMEOUT, clock=clock)
    async with SessionManager(backend_factory(), config=config) as m:
        s = await m.create_session("s1")
        assert s.created_at == clock.now
        clock.advance(TIMEOUT + 1)
        assert await m.get_session("s1") is None


@pytest.mark.parametrize("durability", ["batched", "sync"])
async def test_the_strategy_follows_the_backend_and_durability(
    backend_factory: Callable[..., Backend], durability: Durability
) -> None:
    from aiohttp_session_store.shared_behind import SharedBehindStrategy
    from aiohttp_session_store.strategies import DirectStrategy, WriteBehindStrategy

    m = SessionManager(backend_factory(), config=StoreConfig(durability=durability))
    if not m.backend.shared:
        expected: type = WriteBehindStrategy
    elif durability == "sync":
        expected = DirectStrategy  # every change awaited, as before
    else:
        expected = SharedBehindStrategy  # one awaited statement per call
    assert type(m.strategy) is expected
    assert (m.cache is None) == m.backend.shared
