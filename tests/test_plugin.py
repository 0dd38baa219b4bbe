"""setup() and its accessors, the writer's durability modes, shutdown, and the sweeps."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from proxy_apps import (
    CHAT_PATH,
    FakeClock,
    aiohttp_sse_handler,
    chat_body,
    completion,
    content_chunks,
    exchanges,
    json_handler,
    make_app,
    md5,
    poll,
    raw_request,
    sqlite_rows,
    sse_datas,
    sse_frames,
    sse_handler,
    stateful_proxy,
)

from aiohttp_session_store import (
    SessionManager,
    SessionStore,
    StoreConfig,
    get_session,
    get_store,
    mark_upstream_error,
    set_upstream,
    setup,
)
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.models import RequestQuery, now_ms

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


# -- setup() and the accessors -------------------------------------------------------------


async def test_setup_wires_one_store_into_the_app(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["store"] = get_store(request)
        seen["session"] = get_session(request)
        return web.json_response(completion("ok"))

    app = web.Application()
    app.router.add_post(CHAT_PATH, handler)
    config = StoreConfig(session_timeout=60)
    store = setup(app, tmp_path / "s.db", config=config)
    assert isinstance(store, SessionStore)
    assert isinstance(store.manager, SessionManager)
    assert isinstance(store.backend, SQLiteBackend)
    assert store.backend is store.manager.backend
    assert get_store(app) is store
    assert not store.manager.writer.running  # nothing runs before the app starts
    client = await aiohttp_client(app)
    # The app's startup opened the store: its writer and its sweeper run on the app loop.
    assert store.manager.writer.running
    assert store.manager.cleanup_running
    await client.post(CHAT_PATH, json=chat_body("Hello world"))
    assert seen["store"] is store
    assert seen["session"].id == md5("Hello world")
    assert seen["session"].expires_at - seen["session"].created_at == 60_000
    assert len(await exchanges(store)) == 1


@pytest.mark.parametrize("form", ["path", "str", "url", "backend"])
async def test_setup_takes_every_database_form(
    aiohttp_client: ClientFactory, tmp_path: Path, form: str
) -> None:
    path = tmp_path / "sub" / "s.db"
    database: Any = {
        "path": path,
        "str": str(path),
        "url": f"sqlite:///{path}",
        "backend": SQLiteBackend(path),
    }[form]
    app = web.Application()
    app.router.add_post(CHAT_PATH, json_handler(completion("ok")))
    setup(app, database)
    client = await aiohttp_client(app)
    assert (await client.post(CHAT_PATH, json=chat_body())).status == 200
    await client.close()
    assert len(sqlite_rows(path, "SELECT * FROM responses")) == 1


def test_setup_twice_on_one_app_is_refused(tmp_path: Path) -> None:
    app = web.Application()
    setup(app, tmp_path / "a.db")
    with pytest.raises(RuntimeError, match="setup"):
        setup(app, tmp_path / "b.db")


async def test_get_store_without_setup_names_setup(aiohttp_client: ClientFactory) -> None:
    errors: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        with pytest.raises(RuntimeError) as info:
            get_store(request)
        errors.append(str(info.value))
        assert get_session(request) is None
        return web.Response(text="ok")

    with pytest.raises(RuntimeError, match=re.escape("setup(")):
        get_store(web.Application())
    app = web.Application()
    sub = web.Application()
    sub.router.add_post(CHAT_PATH, handler)
    app.router.add_post(CHAT_PATH, handler)
    app.add_subapp("/api", sub)
    client = await aiohttp_client(app)
    assert (await client.post(CHAT_PATH, json=chat_body())).status == 200
    assert (await client.post("/api" + CHAT_PATH, json=chat_body())).status == 200
    assert len(errors) == 2
    assert all("setup(" in e for e in errors)


async def test_sub_application_handlers_reach_the_parents_store(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["store"] = get_store(request)
        session = get_session(request)
        seen["session"] = session.id if session else None
        set_upstream(request, request_body={"via": "sub"})
        return await sse_handler(sse_frames(content_chunks(["sub", "app"])))(request)

    app = web.Application()
    sub = web.Application()
    sub.router.add_post(CHAT_PATH, handler)
    app.add_subapp("/api", sub)
    store = setup(app, tmp_path / "s.db", config=StoreConfig(paths=("/api" + CHAT_PATH,)))
    client = await aiohttp_client(app)
    resp = await client.post("/api" + CHAT_PATH, json=chat_body("from sub", stream=True))
    await resp.read()
    assert seen == {"store": store, "session": md5("from sub")}
    (ex,) = await exchanges(store)
    assert ex.request.path == "/api" + CHAT_PATH
    assert json.loads(ex.request.upstream_request or "") == {"via": "sub"}
    assert ex.response is not None
    # The sub-app's stream was teed too (the parent's response hook saw it).
    assert (
        json.loads(ex.response.openai_response or "")["choices"][0]["message"]["content"]
        == "subapp"
    )


async def test_upstream_bodies_and_upstream_error_are_recorded(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        set_upstream(request, request_body={"prompt": body["messages"][-1]["content"]})
        if body.get("fail"):
            set_upstream(request, response_body=b'{"code": "E_UPSTREAM", "msg": "quota"}')
            mark_upstream_error(request, "upstream said E_UPSTREAM: quota")
            return web.json_response({"error": {"message": "upstream failed"}}, status=502)
        set_upstream(request, response_body="raw upstream text")
        return web.json_response(completion("fine"))

    app, store = make_app(handler, db=tmp_path / "s.db")
    assert store is not None
    client = await aiohttp_client(app)
    assert (await client.post(CHAT_PATH, json=chat_body("ok turn"))).status == 200
    assert (await client.post(CHAT_PATH, json=chat_body("bad turn", fail=True))).status == 502
    ok, bad = await exchanges(store)
    assert json.loads(ok.request.upstream_request or "") == {"prompt": "ok turn"}
    assert ok.response is not None
    assert ok.response.upstream_response == "raw upstream text"
    assert ok.response.outcome == "completed"
    assert bad.response is not None
    assert bad.response.outcome == "upstream_error"
    assert bad.response.error == "upstream said E_UPSTREAM: quota"
    assert bad.response.status_code == 502
    assert json.loads(bad.response.upstream_response or "") == {
        "code": "E_UPSTREAM",
        "msg": "quota",
    }


# -- writing: batched, sync, shutdown ------------------------------------------------------


async def test_batched_records_committed_within_flush_interval_in_batches(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    app, store = make_app(
        json_handler(completion("ok")), db=db, config=StoreConfig(flush_interval=0.05)
    )
    assert store is not None
    client = await aiohttp_client(app)
    n = 10
    replies = await asyncio.gather(
        *(client.post(CHAT_PATH, json=chat_body(f"conversation {i}")) for i in range(n))
    )
    answered = time.monotonic()
    assert all(r.status == 200 for r in replies)

    async def all_in_file() -> bool:
        # Another connection on the file: no flush() from us, the writer's own timing.
        return len(sqlite_rows(db, "SELECT 1 FROM responses")) == n

    await poll(all_in_file, timeout=2.0)
    assert time.monotonic() - answered < 1.0
    writer = store.manager.writer
    assert writer.records_written == 2 * n
    assert writer.batches_committed < 2 * n  # grouped, not one commit per record
    assert len(sqlite_rows(db, "SELECT 1 FROM sessions")) == n


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_sync_durability_rows_are_in_the_file_when_the_client_has_its_reply(
    aiohttp_client: ClientFactory, tmp_path: Path, stream: bool
) -> None:
    db = tmp_path / "s.db"
    # A flush interval no test waits for: only sync durability can put the rows there.
    config = StoreConfig(durability="sync", flush_interval=30.0)
    app, store = make_app(stateful_proxy, db=db, config=config)
    assert store is not None
    client = await aiohttp_client(app)
    for turn in (1, 2, 3):
        resp = await client.post(CHAT_PATH, json=chat_body("Hello world", stream=stream))
        await resp.read()
        assert len(sqlite_rows(db, "SELECT 1 FROM requests")) == turn
        rows = sqlite_rows(db, "SELECT parent_id, outcome FROM responses ORDER BY id")
        assert len(rows) == turn, (
            f"turn {turn}: the client has its reply, its response row is not committed"
        )
        assert (rows[-1]["parent_id"], rows[-1]["outcome"]) == (f"parent-{turn}", "completed")
        (session,) = sqlite_rows(db, "SELECT parent_id, message_count FROM sessions")
        assert (session["parent_id"], session["message_count"]) == (f"parent-{turn}", turn)


async def test_sync_durability_aiohttp_sse_rows_in_the_file_when_the_client_has_its_reply(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    config = StoreConfig(durability="sync", flush_interval=30.0)
    app, store = make_app(
        aiohttp_sse_handler(sse_datas(content_chunks(["x", "y"]))), db=db, config=config
    )
    assert store is not None
    client = await aiohttp_client(app)
    for turn in (1, 2):
        resp = await client.post(CHAT_PATH, json=chat_body(f"turn {turn}", stream=True))
        await resp.read()
        rows = sqlite_rows(db, "SELECT openai_response FROM responses")
        assert len(rows) == turn, f"turn {turn}: the client has its reply, its row is not committed"
        assert json.loads(rows[-1]["openai_response"])["choices"][0]["message"]["content"] == "xy"


async def test_shutdown_commits_every_queued_record(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    # Batched with a long interval: nothing is committed by the time we close.
    app, store = make_app(
        {
            CHAT_PATH: stateful_proxy,
            "/v1/stream": sse_handler(sse_frames(content_chunks(["a", "b"]))),
        },
        db=db,
        config=StoreConfig(flush_interval=30.0, paths=(CHAT_PATH, "/v1/stream")),
    )
    assert store is not None
    client = await aiohttp_client(app)
    await (await client.post(CHAT_PATH, json=chat_body("one"))).read()
    await (await client.post(CHAT_PATH, json=chat_body("one", stream=True))).read()
    await (await client.post("/v1/stream", json=chat_body("two", stream=True))).read()
    assert store.manager.writer.pending > 0
    await client.close()
    assert not store.manager.writer.running
    assert not store.manager.cleanup_running
    leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith("aiohttp_session_store")]
    assert leftover == []
    assert len(sqlite_rows(db, "SELECT 1 FROM requests")) == 3
    outcomes = [r["outcome"] for r in sqlite_rows(db, "SELECT outcome FROM responses")]
    assert outcomes == ["completed"] * 3
    sessions = {r["id"]: r for r in sqlite_rows(db, "SELECT * FROM sessions")}
    assert set(sessions) == {md5("one"), md5("two")}
    assert sessions[md5("one")]["parent_id"] == "parent-2"


async def test_shutdown_during_a_stream_still_records_it(tmp_path: Path) -> None:
    """The server stops while a reply is streaming: the call is recorded before the store closes."""
    db = tmp_path / "s.db"
    handler = sse_handler(sse_frames(content_chunks([f"w{i} " for i in range(200)])), delay=0.01)
    app, store = make_app(handler, db=db, config=StoreConfig(flush_interval=30.0))
    assert store is not None
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw_request(CHAT_PATH, json.dumps(chat_body(stream=True)).encode()))
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3.0)
        await asyncio.wait_for(reader.readexactly(500), 3.0)
        await runner.cleanup()  # the client is still reading
    finally:
        writer.close()
        await writer.wait_closed()
    assert not store.manager.writer.running
    (row,) = sqlite_rows(db, "SELECT outcome, openai_response FROM responses")
    assert row["outcome"] in ("client_disconnected", "handler_error")
    content = json.loads(row["openai_response"])["choices"][0]["message"]["content"]
    assert content.startswith("w0 w1 ")
    assert len(sqlite_rows(db, "SELECT 1 FROM requests")) == 1


# -- sweeps ------------------------------------------------------------------------------------


async def test_sweeps_delete_expired_sessions_and_keep_their_records(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    clock = FakeClock()
    config = StoreConfig(session_timeout=60, sweep_interval=0.05, clock=clock)
    app, store = make_app(stateful_proxy, db=tmp_path / "s.db", config=config)
    assert store is not None
    client = await aiohttp_client(app)
    await (await client.post(CHAT_PATH, json=chat_body("soon gone"))).read()
    await store.flush()
    assert await store.backend.count_sessions() == 1
    await asyncio.sleep(0.15)  # a few sweeps on the app loop: the live session stays
    assert await store.backend.count_sessions() == 1
    clock.advance(60)

    async def swept() -> bool:
        return await store.backend.count_sessions() == 0

    await poll(swept)
    assert store.manager.total_cleaned >= 1
    (ex,) = await exchanges(store)
    assert ex.request.session_id == md5("soon gone")
    assert ex.response is not None
    assert ex.response.parent_id == "parent-1"


async def test_sweeps_delete_records_past_log_retention(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    # Records are stamped with the wall clock: the fake one starts from it.
    clock = FakeClock(now_ms())
    config = StoreConfig(log_retention="1h", sweep_interval=0.05, session_timeout="2d", clock=clock)
    app, store = make_app(stateful_proxy, db=tmp_path / "s.db", config=config)
    assert store is not None
    client = await aiohttp_client(app)
    await (await client.post(CHAT_PATH, json=chat_body("kept session"))).read()
    assert len(await exchanges(store)) == 1
    clock.advance(3601)

    async def purged() -> bool:
        return await store.backend.count_requests(RequestQuery()) == 0

    await poll(purged)
    assert store.manager.records_purged == 1
    # Retention is about records: the live session stays.
    assert await store.backend.count_sessions() == 1


async def test_a_call_outliving_log_retention_does_not_stall_the_writer(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """A stream still running when its request row ages past retention.

    Its response row then refers to a request the sweep may have deleted; that must not
    stop every later record from being committed.
    """
    long_stream = sse_handler(sse_frames(content_chunks(["a"] * 10)), delay=0.08)
    # shutdown_timeout: so that, were the writer stalled, teardown would not wait out 10 s.
    config = StoreConfig(
        log_retention=0.3, sweep_interval=0.05, paths=(CHAT_PATH, "/quick"), shutdown_timeout=0.5
    )
    app, store = make_app(
        {CHAT_PATH: long_stream, "/quick": json_handler(completion("q"))},
        db=tmp_path / "s.db",
        config=config,
    )
    assert store is not None
    client = await aiohttp_client(app)
    await (await client.post(CHAT_PATH, json=chat_body("long", stream=True))).read()
    await (await client.post("/quick", json=chat_body("quick"))).read()
    try:
        await asyncio.wait_for(store.flush(), 2.0)
    except TimeoutError:
        pytest.fail(
            f"writer stalled: {store.manager.writer.pending} records pending, "
            f"{store.manager.writer.write_errors} failed commits"
        )
    quick = await store.backend.list_exchanges(RequestQuery(session_id=md5("quick")))
    assert len(quick) == 1
    assert quick[0].response is not None


async def test_sweeps_keep_records_when_no_retention_is_set(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    clock = FakeClock()
    config = StoreConfig(session_timeout=60, sweep_interval=0.05, clock=clock)
    app, store = make_app(stateful_proxy, db=tmp_path / "s.db", config=config)
    assert store is not None
    client = await aiohttp_client(app)
    await (await client.post(CHAT_PATH, json=chat_body("x"))).read()
    sweeps_before = store.manager.total_cleaned
    clock.advance(61)
    await poll(lambda: _true_after(store, sweeps_before))
    await asyncio.sleep(0.2)  # several more sweeps
    assert len(await exchanges(store)) == 1


async def _true_after(store: SessionStore, cleaned: int) -> bool:
    return store.manager.total_cleaned > cleaned


async def test_a_failed_sweep_is_logged_and_tried_again(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    config = StoreConfig(session_timeout=60, sweep_interval=0.05, clock=clock)
    app, store = make_app(stateful_proxy, db=tmp_path / "s.db", config=config)
    assert store is not None
    real = store.backend.delete_expired_sessions
    calls = 0

    async def flaky(now: int, limit: int) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk I/O error (simulated)")
        return await real(now, limit)

    monkeypatch.setattr(store.backend, "delete_expired_sessions", flaky)
    caplog.set_level(logging.ERROR, logger="aiohttp_session_store")
    client = await aiohttp_client(app)
    await (await client.post(CHAT_PATH, json=chat_body("x"))).read()
    clock.advance(61)

    async def recovered() -> bool:
        return calls >= 2 and await store.backend.count_sessions() == 0

    await poll(recovered)
    assert store.manager.sweep_errors == 1
    assert any("simulated" in (r.exc_text or r.getMessage()) for r in caplog.records)
    assert store.manager.cleanup_running  # the timer survived the failure


async def test_sweeps_delete_in_bounded_batches(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    config = StoreConfig(session_timeout=60, sweep_interval=0.05, sweep_batch_size=2, clock=clock)
    app, store = make_app(stateful_proxy, db=tmp_path / "s.db", config=config)
    assert store is not None
    real = store.backend.delete_expired_sessions
    batches: list[tuple[int, int]] = []

    async def spy(now: int, limit: int) -> list[str]:
        ids = await real(now, limit)
        batches.append((limit, len(ids)))
        return ids

    monkeypatch.setattr(store.backend, "delete_expired_sessions", spy)
    client = await aiohttp_client(app)
    for i in range(5):
        await (await client.post(CHAT_PATH, json=chat_body(f"conversation {i}"))).read()
    await store.flush()
    assert await store.backend.count_sessions() == 5
    clock.advance(61)

    async def swept() -> bool:
        return await store.backend.count_sessions() == 0

    await poll(swept)
    assert all(limit == 2 for limit, _ in batches)
    assert all(n <= 2 for _, n in batches)
    assert sum(n for _, n in batches) == 5
    assert len(await exchanges(store)) == 5
