"""Streamed replies: teed as written, assembled into a chat.completion, faults recorded.

The SSE parser's byte-by-byte split tests live in test_sse.py; here the streams go through
real servers, written by real handler shapes (plain StreamResponse, aiohttp-sse).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from proxy_apps import (
    CHAT_PATH,
    COMPLETION_ID,
    CREATED,
    FULL_TEXT,
    MODEL,
    MULTI_TEXTS,
    PIECES,
    TOOL_CALLS,
    Handler,
    aiohttp_sse_handler,
    assert_one_response_per_request,
    chat_body,
    completion,
    content_chunks,
    dechunk,
    exchanges,
    fetch_raw,
    json_handler,
    make_app,
    multi_choice_chunks,
    raw_request,
    reasoning_chunks,
    split_response,
    sse_content,
    sse_datas,
    sse_frames,
    sse_handler,
    stored_completion,
    stored_content,
    tool_call_chunks,
    wait_for_responses,
)

from aiohttp_session_store import SessionStore, StoreConfig, get_session, get_store, set_upstream
from aiohttp_session_store.config import Durability
from aiohttp_session_store.models import Exchange

# Every test here runs with the loop in debug mode (conftest.debug_loop).
pytestmark = pytest.mark.usefixtures("debug_loop")

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
ServerStarter = Callable[..., Awaitable[tuple[str, int]]]

USAGE = {"prompt_tokens": 21, "completion_tokens": len(PIECES), "total_tokens": 21 + len(PIECES)}


def both_kinds(chunks: list[dict[str, Any]], **kw: Any) -> dict[str, Handler]:
    """The same stream served by a plain StreamResponse and by aiohttp-sse."""
    return {
        "plain": sse_handler(sse_frames(chunks), **kw),
        "aiohttp_sse": aiohttp_sse_handler(sse_datas(chunks), **kw),
    }


KINDS = ["plain", "aiohttp_sse"]


async def serve_stream(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    handler: Handler,
    *,
    config: StoreConfig | None = None,
) -> tuple[bytes, Exchange, SessionStore]:
    app, store = make_app(handler, db=tmp_path / "s.db", config=config)
    assert store is not None
    client = await aiohttp_client(app)
    resp = await client.post(CHAT_PATH, json=chat_body("Hello world", stream=True))
    assert resp.status == 200
    body = await resp.read()
    (ex,) = await exchanges(store)
    return body, ex, store


@pytest.fixture
async def plain_server() -> AsyncIterator[ServerStarter]:
    """Serve an app as `web.run_app` does by default: handlers are not cancelled on disconnect.

    (pytest-aiohttp's test server always runs with handler_cancellation=True.)
    """
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, *, handler_cancellation: bool = False) -> tuple[str, int]:
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return str(host), int(port)

    yield start
    for runner in runners:
        await runner.cleanup()


# -- assembling what was streamed ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_openai_stream_recorded_as_assembled_completion(
    aiohttp_client: ClientFactory, tmp_path: Path, kind: str
) -> None:
    handler = both_kinds(content_chunks(usage=USAGE))[kind]
    body, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    assert sse_content(body) == FULL_TEXT  # what the client got
    r = ex.response
    assert r is not None
    assert r.status_code == 200
    assert r.outcome == "completed"
    assert r.error is None
    obj = stored_completion(ex)
    assert obj["object"] == "chat.completion"
    assert (obj["id"], obj["model"], obj["created"]) == (COMPLETION_ID, MODEL, CREATED)
    (choice,) = obj["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == FULL_TEXT
    assert choice["finish_reason"] == "stop"
    assert obj["usage"] == USAGE
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
        USAGE["total_tokens"],
    )
    assert r.finish_reason == "stop"
    assert ex.request.stream is True
    assert r.duration_ms >= 0
    assert r.first_byte_ms is not None
    assert 0 <= r.first_byte_ms <= r.duration_ms


@pytest.mark.parametrize(
    "content_type",
    ["text/event-stream; charset=utf-8", "text/event-stream;charset=UTF-8"],
)
async def test_event_stream_with_parameters_is_teed(
    aiohttp_client: ClientFactory, tmp_path: Path, content_type: str
) -> None:
    handler = sse_handler(sse_frames(content_chunks(["a", "b", "c"])), content_type=content_type)
    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    assert stored_content(ex) == "abc"


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_call_stream_assembled_by_index(
    aiohttp_client: ClientFactory, tmp_path: Path, kind: str
) -> None:
    handler = both_kinds(tool_call_chunks())[kind]
    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    (choice,) = stored_completion(ex)["choices"]
    assert choice["message"]["tool_calls"] == TOOL_CALLS
    assert choice["message"]["content"] in (None, "")
    assert choice["finish_reason"] == "tool_calls"
    r = ex.response
    assert r is not None
    assert r.finish_reason == "tool_calls"
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (30, 12, 42)
    for call in TOOL_CALLS:  # the split arguments were rejoined into valid JSON
        fn = call["function"]
        assert isinstance(fn, dict)
        json.loads(fn["arguments"])


async def test_multi_choice_stream_keeps_each_choice_and_its_finish_reason(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    handler = sse_handler(sse_frames(multi_choice_chunks()))
    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    choices = stored_completion(ex)["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["message"]["content"] for c in choices] == list(MULTI_TEXTS)
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]
    assert ex.response is not None
    assert ex.response.finish_reason == "stop"  # choice 0's
    assert ex.response.total_tokens == 17


async def test_reasoning_text_joined_apart_from_content(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    _, ex, _ = await serve_stream(
        aiohttp_client, tmp_path, sse_handler(sse_frames(reasoning_chunks()))
    )
    (choice,) = stored_completion(ex)["choices"]
    assert choice["message"]["reasoning_content"] == "Let me think about it."
    assert choice["message"]["content"] == "The answer is 42."


async def test_stream_zero_usage_stays_zero(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    handler = sse_handler(sse_frames(content_chunks([], usage=zero)))
    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    r = ex.response
    assert r is not None
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (0, 0, 0)
    assert stored_completion(ex)["usage"] == zero


async def test_stream_without_usage_has_no_token_counts(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    _, ex, _ = await serve_stream(
        aiohttp_client, tmp_path, sse_handler(sse_frames(content_chunks(["x"])))
    )
    r = ex.response
    assert r is not None
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (None, None, None)
    assert r.finish_reason == "stop"


async def test_stream_not_openai_shaped_is_stored_as_raw_event_data(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    frames = [
        b"event: progress\ndata: step 1\n\n",
        b": a comment line\n\n",
        b'data: {"status": "half"}\n\n',
        b"data: line one\ndata: line two\n\n",
    ]
    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, sse_handler(frames))
    r = ex.response
    assert r is not None
    assert r.outcome == "completed"
    assert json.loads(r.openai_response or "") == [
        "step 1",
        '{"status": "half"}',
        "line one\nline two",
    ]
    assert (r.prompt_tokens, r.finish_reason) == (None, None)


async def test_stream_that_is_not_sse_is_stored_as_sent(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    lines = [json.dumps({"n": i, "text": "é" * i}).encode() + b"\n" for i in range(5)]
    handler = sse_handler(lines, content_type="application/x-ndjson")
    body, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    assert body == b"".join(lines)
    assert ex.response is not None
    assert ex.response.openai_response == body.decode()


async def test_compressed_stream_is_recorded_uncompressed(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    frames = sse_frames(content_chunks(usage=USAGE))

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_compression()
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
        await resp.write_eof()
        return resp

    app, store = make_app(handler, db=tmp_path / "s.db")
    assert store is not None
    client = await aiohttp_client(app)
    resp = await client.post(
        CHAT_PATH, json=chat_body(stream=True), headers={"Accept-Encoding": "gzip"}
    )
    assert resp.headers["Content-Encoding"] == "gzip"
    assert sse_content(await resp.read()) == FULL_TEXT
    (ex,) = await exchanges(store)
    assert stored_content(ex) == FULL_TEXT


@pytest.mark.parametrize("size", [1, 7, 64])
async def test_writes_of_any_size_assemble_the_same(
    aiohttp_client: ClientFactory, tmp_path: Path, size: int
) -> None:
    """A handler relaying upstream bytes as they come: events and characters cut anywhere."""
    stream = b"".join(sse_frames(content_chunks(usage=USAGE)))
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, sse_handler(pieces))
    assert stored_content(ex) == FULL_TEXT
    assert stored_completion(ex)["usage"] == USAGE


async def test_sse_sent_whole_in_a_plain_response_is_assembled(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """A proxy that buffers the upstream stream and returns it in one `web.Response`.

    The reply still has Content-Type text/event-stream, so its record is the assembled
    completion, as for any event stream.
    """
    stream = b"".join(sse_frames(content_chunks(usage=USAGE)))

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=stream, content_type="text/event-stream")

    body, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    assert body == stream
    assert stored_content(ex) == FULL_TEXT
    assert ex.response is not None
    assert ex.response.total_tokens == USAGE["total_tokens"]


async def test_stream_past_max_body_bytes_is_stored_truncated_and_marked(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    pieces = list(PIECES) * 10
    handler = sse_handler(sse_frames(content_chunks(pieces)))
    body, ex, _ = await serve_stream(
        aiohttp_client, tmp_path, handler, config=StoreConfig(max_body_bytes=200)
    )
    assert sse_content(body) == "".join(pieces)  # the client is never cut
    assert ex.response is not None
    stored = ex.response.openai_response
    assert stored is not None
    assert len(stored.encode()) < 1000
    # Marked the same way as a cut request body: a JSON envelope saying so.
    marked = json.loads(stored)
    assert marked["truncated"] is True


async def test_stream_advancing_the_session_records_the_new_parent(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    frames = sse_frames(content_chunks(["a", "b"]))

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        session = get_session(request)
        assert session is not None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(frames[0])
        # Qwen-style: the upstream names the next parent at the start of its reply.
        await get_store(request).manager.update_session(session.id, "next-parent")
        for frame in frames[1:]:
            await resp.write(frame)
        await resp.write_eof()
        return resp

    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    assert ex.response is not None
    assert ex.response.parent_id == "next-parent"


@pytest.mark.parametrize("durability", ["batched", "sync"])
async def test_what_the_handler_does_after_write_eof_is_recorded(
    aiohttp_client: ClientFactory, tmp_path: Path, durability: Durability
) -> None:
    """A proxy that learns the next parent when the upstream stream ends, after its own eof.

    The response row holds the session's parent *after the call*, and the upstream body
    the handler attached, whichever the durability.
    """
    frames = sse_frames(content_chunks(["a", "b"]))

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        session = get_session(request)
        assert session is not None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
        await resp.write_eof()
        await get_store(request).manager.update_session(session.id, "parent-from-upstream")
        set_upstream(request, response_body={"parent_id": "parent-from-upstream"})
        return resp

    _, ex, store = await serve_stream(
        aiohttp_client,
        tmp_path,
        handler,
        config=StoreConfig(durability=durability),
    )
    # The client has the whole reply at write_eof, while the handler is still running: the
    # row is rewritten with the parent once the handler returns (sync: right before its
    # eof it was recorded already, so a crash after eof still leaves the reply stored).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    while ex.response is None or ex.response.parent_id is None:
        assert loop.time() < deadline, "the response row never got the handler's later parent"
        await asyncio.sleep(0.02)
        (ex,) = await exchanges(store)
    ((_, session),) = await store.manager.get_all_sessions()
    assert session.parent_id == "parent-from-upstream"
    assert ex.response is not None
    assert stored_content(ex) == "ab"
    assert ex.response.parent_id == "parent-from-upstream"
    assert json.loads(ex.response.upstream_response or "null") == {
        "parent_id": "parent-from-upstream"
    }
    await assert_one_response_per_request(store)


async def test_first_byte_and_duration_measure_the_stream(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    handler = sse_handler(
        sse_frames(content_chunks(["a", "b", "c"])), delay=0.03, before_prepare=0.1
    )
    _, ex, _ = await serve_stream(aiohttp_client, tmp_path, handler)
    r = ex.response
    assert r is not None
    assert r.first_byte_ms is not None
    assert 90 <= r.first_byte_ms <= r.duration_ms
    assert r.duration_ms >= r.first_byte_ms + 6 * 30 - 20  # six frames, a sleep after each


# -- the client sees exactly what it would without the middleware ----------------------------


def _strip_date(headers: list[bytes]) -> list[bytes]:
    return sorted(h for h in headers if not h.lower().startswith(b"date:"))


@pytest.mark.parametrize("kind", ["json", "plain", "aiohttp_sse", "tools-1-byte-writes"])
async def test_output_byte_identical_with_and_without_the_middleware(
    aiohttp_server: Any, tmp_path: Path, kind: str
) -> None:
    stream = b"".join(sse_frames(tool_call_chunks()))
    handlers: dict[str, Callable[[], Handler]] = {
        "json": lambda: json_handler(completion(usage=USAGE)),
        "plain": lambda: sse_handler(sse_frames(content_chunks(usage=USAGE))),
        "aiohttp_sse": lambda: aiohttp_sse_handler(sse_datas(content_chunks(usage=USAGE))),
        "tools-1-byte-writes": lambda: sse_handler([stream[i : i + 1] for i in range(len(stream))]),
    }
    request = raw_request(CHAT_PATH, json.dumps(chat_body("Hello world", stream=True)).encode())
    wires = []
    for db in (None, tmp_path / "s.db"):
        app, store = make_app(handlers[kind](), db=db)
        server = await aiohttp_server(app)
        wires.append(split_response(await fetch_raw(server.host, server.port, request)))
        if store is not None:
            (ex,) = await exchanges(store)
            assert ex.response is not None
            assert ex.response.outcome == "completed"
    (bare_status, bare_headers, bare_body), (status, headers, body) = wires
    assert status == bare_status
    assert _strip_date(headers) == _strip_date(bare_headers)
    assert body == bare_body  # the framing too: every write went out as written


@pytest.mark.parametrize("kind", KINDS)
async def test_each_write_reaches_the_client_before_the_next(
    aiohttp_client: ClientFactory, tmp_path: Path, kind: str
) -> None:
    """The handler waits, after each event, until the client has read it: no buffering."""
    chunks = content_chunks(["one", "two", "three"])
    received = [asyncio.Event() for _ in range(len(chunks) + 1)]

    async def gate(i: int) -> None:
        await asyncio.wait_for(received[i].wait(), 3.0)

    handler = (
        sse_handler(sse_frames(chunks), gate=gate)
        if kind == "plain"
        else aiohttp_sse_handler(sse_datas(chunks), gate=gate)
    )
    app, store = make_app(handler, db=tmp_path / "s.db")
    assert store is not None
    client = await aiohttp_client(app)
    resp = await client.post(CHAT_PATH, json=chat_body(stream=True))
    seen = 0
    buffer = b""
    async for data in resp.content.iter_any():
        buffer += data
        complete = buffer.replace(b"\r\n", b"\n").count(b"\n\n")
        while seen < complete:
            received[seen].set()
            seen += 1
    assert seen == len(chunks) + 1
    (ex,) = await exchanges(store)
    assert stored_content(ex) == "onetwothree"
    assert ex.response is not None
    assert ex.response.outcome == "completed"


# -- faults: exceptions, disconnects, cancellation -------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_exception_mid_stream_records_handler_error_with_what_was_sent(
    aiohttp_client: ClientFactory, tmp_path: Path, kind: str
) -> None:
    sent = 6  # the role chunk and five content pieces
    handler = both_kinds(content_chunks(usage=USAGE), fail_after=sent)[kind]
    app, store = make_app(handler, db=tmp_path / "s.db")
    assert store is not None
    client = await aiohttp_client(app)
    resp = await client.post(CHAT_PATH, json=chat_body(stream=True))
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    (ex,) = await wait_for_responses(store)
    r = ex.response
    assert r is not None
    assert r.outcome == "handler_error"
    assert r.error is not None
    assert "upstream exploded mid-stream" in r.error
    assert r.status_code == 200
    assert stored_content(ex) == "".join(PIECES[: sent - 1])
    await assert_one_response_per_request(store)
    assert r.first_byte_ms is not None
    assert r.first_byte_ms <= r.duration_ms


async def _disconnect_after(host: str, port: int, body_bytes: int) -> bytes:
    """Request a stream, read its headers and `body_bytes` more, then drop the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw_request(CHAT_PATH, json.dumps(chat_body(stream=True)).encode()))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3.0)
        assert b" 200 " in head.split(b"\r\n")[0]
        body = await asyncio.wait_for(reader.readexactly(body_bytes), 3.0) if body_bytes else b""
    finally:
        writer.close()
        await writer.wait_closed()
    return body


async def _assert_prefix_recorded(store: SessionStore, ex: Exchange, received_wire: bytes) -> None:
    await assert_one_response_per_request(store)
    r = ex.response
    assert r is not None
    assert r.outcome == "client_disconnected"
    assert r.status_code == 200
    content = stored_content(ex) if r.openai_response else ""
    got = sse_content(dechunk(received_wire))
    # What the client did receive <= what is stored <= the whole reply, and never all of it.
    assert FULL_TEXT.startswith(content)
    assert content.startswith(got)
    assert len(content) < len(FULL_TEXT)
    assert r.duration_ms >= 0
    if r.first_byte_ms is not None:
        assert r.first_byte_ms <= r.duration_ms


POINTS = [0, 1, 400, 1200, 2500]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("body_bytes", POINTS)
async def test_client_disconnect_mid_stream_records_the_prefix_sent(
    plain_server: ServerStarter, tmp_path: Path, kind: str, body_bytes: int
) -> None:
    """Not cancelled, the handler keeps writing until a write fails on the closed socket."""
    handler = both_kinds(content_chunks(usage=USAGE), delay=0.01)[kind]
    app, store = make_app(handler, db=tmp_path / "s.db")
    assert store is not None
    host, port = await plain_server(app)
    received = await _disconnect_after(host, port, body_bytes)
    (ex,) = await wait_for_responses(store)
    await _assert_prefix_recorded(store, ex, received)


@pytest.mark.parametrize("body_bytes", [0, 700])
async def test_client_disconnect_swallowed_by_the_handler_is_still_recorded(
    plain_server: ServerStarter, tmp_path: Path, body_bytes: int
) -> None:
    """A careful proxy catches the failed write and returns; the call still did not complete."""
    handler = sse_handler(
        sse_frames(content_chunks(usage=USAGE)), delay=0.01, swallow_disconnect=True
    )
    app, store = make_app(handler, db=tmp_path / "s.db")
    assert store is not None
    host, port = await plain_server(app)
    received = await _disconnect_after(host, port, body_bytes)
    (ex,) = await wait_for_responses(store)
    await _assert_prefix_recorded(store, ex, received)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("body_bytes", POINTS)
async def test_handler_cancelled_on_disconnect_records_the_prefix_sent(
    aiohttp_server: Any, tmp_path: Path, kind: str, body_bytes: int
) -> None:
    handler = both_kinds(content_chunks(usage=USAGE), delay=0.01)[kind]
    app, store = make_app(handler, db=tmp_path / "s.db")
    assert store is not None
    server = await aiohttp_server(app)  # pytest-aiohttp's server: handler_cancellation=True
    received = await _disconnect_after(server.host, server.port, body_bytes)
    (ex,) = await wait_for_responses(store)
    await _assert_prefix_recorded(store, ex, received)


async def test_cancelled_handler_in_sync_durability_still_records(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    handler = sse_handler(sse_frames(content_chunks()), delay=0.01)
    app, store = make_app(handler, db=tmp_path / "s.db", config=StoreConfig(durability="sync"))
    assert store is not None
    server = await aiohttp_server(app)
    received = await _disconnect_after(server.host, server.port, 700)
    (ex,) = await wait_for_responses(store)
    await _assert_prefix_recorded(store, ex, received)


async def test_handler_cancelled_before_writing_anything(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    started = asyncio.Event()

    async def slow_upstream(request: web.Request) -> web.StreamResponse:
        await request.read()
        started.set()
        await asyncio.sleep(10)  # waiting on an upstream that never answers
        return web.json_response({})

    app, store = make_app(slow_upstream, db=tmp_path / "s.db")
    assert store is not None
    server = await aiohttp_server(app)
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw_request(CHAT_PATH, json.dumps(chat_body()).encode()))
    await writer.drain()
    await asyncio.wait_for(started.wait(), 3.0)
    writer.close()
    await writer.wait_closed()
    (ex,) = await wait_for_responses(store)
    await assert_one_response_per_request(store)
    r = ex.response
    assert r is not None
    assert r.outcome == "client_disconnected"
    assert r.openai_response is None
    assert r.duration_ms >= 0


def test_a_non_openai_stream_cut_to_the_limit_is_marked() -> None:
    from aiohttp_session_store.capture import summarize_body

    stream = b"data: " + b"a" * 100 + b"\n\n" + b"data: " + b"b" * 2000 + b"\n\ndata: c\n\n"
    body = summarize_body(stream, 1000, sse=True)
    assert body.truncated
    stored = json.loads(body.text or "")
    assert stored["truncated"] is True
    assert stored["original_bytes"] == len(stream)
    assert json.loads(stored["prefix"]) == ["a" * 100]


def test_an_event_over_the_parser_limit_is_kept_cut_and_marked() -> None:
    from aiohttp_session_store.capture import summarize_body

    limit = 64 * 1024  # the parser takes events up to max(limit, 64 KiB)
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "A" * 2_000_000}}],
    }
    first = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "Hi"}}],
    }
    last = {"object": "chat.completion.chunk", "choices": [{"index": 0, "finish_reason": "stop"}]}
    stream = b"".join(sse_frames([first, chunk, last]))
    body = summarize_body(stream, limit, sse=True)
    assert body.truncated
    stored = json.loads(body.text or "")
    assert stored["truncated"] is True
    assert stored["original_bytes"] == len(stream)
    assert len(stored["prefix"].encode()) <= limit
    # The prefix holds the start of the oversized event, not only what came around it.
    assert "Hi" in stored["prefix"]
    assert "A" * 10_000 in stored["prefix"]
    assert body.summary.finish_reason == "stop"
