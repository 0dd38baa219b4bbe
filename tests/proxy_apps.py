"""Test apps shaped like real OpenAI-compatible proxies, and helpers to read what they recorded.

The handlers here know nothing of the session store beyond its public API: they are what a
user already has (JSON replies, SSE via plain StreamResponse or aiohttp-sse), so the tests
show the middleware records them without a line of them changing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from aiohttp_session_store import (
    SessionStore,
    StoreConfig,
    get_session,
    get_store,
    set_upstream,
    setup,
)
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.models import Exchange, RequestQuery

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Gate = Callable[[int], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
COMPLETION_ID = "chatcmpl-abc123"
MODEL = "test-model-1"
CREATED = 1_700_000_000

# Multi-byte characters on purpose: a tee that cuts or re-encodes them would show.
PIECES: tuple[str, ...] = tuple(
    [f"tok{i} " for i in range(16)]
    + ["héllo ", "— ", "你好 ", "🙂 "]
    + [f"w{i} " for i in range(20)]
)
FULL_TEXT = "".join(PIECES)


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def chat_body(
    text: str = "Hello world", *, stream: bool = False, model: str = MODEL, **extra: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": text},
        ],
        **extra,
    }


# -- OpenAI-shaped replies ---------------------------------------------------------------


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": choices,
        **extra,
    }


def completion(
    text: str = FULL_TEXT,
    *,
    finish_reason: str = "stop",
    usage: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A non-streamed chat.completion."""
    body: dict[str, Any] = {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
    }
    if usage is not None:
        body["usage"] = dict(usage)
    return body


def content_chunks(
    pieces: Sequence[str] = PIECES,
    *,
    finish_reason: str = "stop",
    usage: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The chunks an OpenAI server streams for `pieces`, with a trailing usage chunk if given."""
    chunks = [_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    chunks += [
        _chunk([{"index": 0, "delta": {"content": p}, "finish_reason": None}]) for p in pieces
    ]
    chunks.append(_chunk([{"index": 0, "delta": {}, "finish_reason": finish_reason}]))
    if usage is not None:
        chunks.append(_chunk([], usage=dict(usage)))
    return chunks


def reasoning_chunks() -> list[dict[str, Any]]:
    """A reasoning model: thinking deltas first, then the answer."""
    chunks = [_chunk([{"index": 0, "delta": {"role": "assistant", "reasoning_content": ""}}])]
    for part in ("Let me ", "think ", "about ", "it."):
        chunks.append(_chunk([{"index": 0, "delta": {"reasoning_content": part}}]))
    for part in ("The answer ", "is 42."):
        chunks.append(_chunk([{"index": 0, "delta": {"content": part}}]))
    chunks.append(_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    return chunks


TOOL_CALLS = [
    {
        "id": "call_weather_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
    },
    {
        "id": "call_time_2",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
    },
]


def tool_call_chunks() -> list[dict[str, Any]]:
    """Two tool calls, each opened by id and name, its arguments split mid-token."""
    chunks = [_chunk([{"index": 0, "delta": {"role": "assistant", "content": None}}])]
    for index, call in enumerate(TOOL_CALLS):
        fn = call["function"]
        assert isinstance(fn, dict)
        chunks.append(
            _chunk(
                [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": index,
                                    "id": call["id"],
                                    "type": "function",
                                    "function": {"name": fn["name"], "arguments": ""},
                                }
                            ]
                        },
                    }
                ]
            )
        )
        args: str = fn["arguments"]
        for start in range(0, len(args), 5):
            delta = {
                "tool_calls": [{"index": index, "function": {"arguments": args[start : start + 5]}}]
            }
            chunks.append(_chunk([{"index": 0, "delta": delta}]))
    chunks.append(_chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    chunks.append(
        _chunk([], usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42})
    )
    return chunks


MULTI_TEXTS = ("First answer, complete.", "Second answer, cut")


def multi_choice_chunks() -> list[dict[str, Any]]:
    """n=2: the two choices' deltas interleaved, each ending with its own finish_reason."""
    chunks = [_chunk([{"index": i, "delta": {"role": "assistant", "content": ""}} for i in (0, 1)])]
    words = [text.split(" ") for text in MULTI_TEXTS]
    for step in range(max(len(w) for w in words)):
        for i in (1, 0):  # choice 1 first: order of arrival must not matter
            if step < len(words[i]):
                piece = words[i][step] + (" " if step < len(words[i]) - 1 else "")
                chunks.append(_chunk([{"index": i, "delta": {"content": piece}}]))
    chunks.append(_chunk([{"index": 1, "delta": {}, "finish_reason": "length"}]))
    chunks.append(_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    chunks.append(
        _chunk([], usage={"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17})
    )
    return chunks


def sse_frames(chunks: Sequence[Mapping[str, Any] | str], *, done: bool = True) -> list[bytes]:
    """One `data:` event per chunk (objects as JSON), then `[DONE]`."""
    frames = [
        b"data: "
        + (c if isinstance(c, str) else json.dumps(c, ensure_ascii=False)).encode("utf-8")
        + b"\n\n"
        for c in chunks
    ]
    if done:
        frames.append(b"data: [DONE]\n\n")
    return frames


# -- handlers ------------------------------------------------------------------------------


def json_handler(reply: Mapping[str, Any], *, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(dict(reply), status=status)

    return handler


def sse_handler(
    frames: Sequence[bytes],
    *,
    delay: float = 0.0,
    fail_after: int | None = None,
    swallow_disconnect: bool = False,
    content_type: str = "text/event-stream",
    gate: Gate | None = None,
    before_prepare: float = 0.0,
) -> Handler:
    """SSE through a plain `web.StreamResponse`, as most hand-written proxies do it.

    `fail_after=k` raises after k frames; `swallow_disconnect` ends quietly when the client
    is gone (as a careful proxy does); `gate(i)` is awaited after frame i is written.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if before_prepare:
            await asyncio.sleep(before_prepare)
        resp = web.StreamResponse(
            headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for i, frame in enumerate(frames):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("upstream exploded mid-stream")
            try:
                await resp.write(frame)
            except ConnectionResetError:
                if swallow_disconnect:
                    return resp
                raise
            if gate is not None:
                await gate(i)
            if delay:
                await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    return handler


def aiohttp_sse_handler(
    datas: Sequence[str],
    *,
    delay: float = 0.0,
    fail_after: int | None = None,
    gate: Gate | None = None,
) -> Handler:
    """SSE through aiohttp-sse's `EventSourceResponse` (CRLF separators, its own ping task)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        # POST, as /v1/chat/completions is: aiohttp-sse allows only GET unless told.
        async with sse_response(request, allow_all_methods=True) as sse:
            for i, data in enumerate(datas):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("upstream exploded mid-stream")
                await sse.send(data)
                if gate is not None:
                    await gate(i)
                if delay:
                    await asyncio.sleep(delay)
        return sse

    return handler


def sse_datas(chunks: Sequence[Mapping[str, Any]]) -> list[str]:
    return [json.dumps(c, ensure_ascii=False) for c in chunks] + ["[DONE]"]


async def stateful_proxy(request: web.Request) -> web.StreamResponse:
    """A Qwen-style proxy: per session a chat_id and the parent of the next turn.

    Each turn it sends the upstream only the new message with the parent it holds, and
    advances the session to the parent id the upstream returned.
    """
    body = await request.json()
    store = get_store(request)
    session = get_session(request)
    turn = 1
    upstream_request: dict[str, Any] = {"message": body["messages"][-1]["content"]}
    if session is not None:
        turn = session.message_count + 1
        if session.chat_id is None:
            chat_id = f"chat-{session.id[:8]}"
            await store.manager.set_chat_id(session.id, chat_id)
        else:
            chat_id = session.chat_id
        upstream_request.update(chat_id=chat_id, parent_id=session.parent_id)
    set_upstream(request, request_body=upstream_request)
    new_parent = f"parent-{turn}"
    text = f"reply {turn}"
    set_upstream(request, response_body={"parent_id": new_parent, "text": text})
    if session is not None:
        await store.manager.update_session(session.id, new_parent)
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in sse_frames(content_chunks([text])):
            await resp.write(frame)
        await resp.write_eof()
        return resp
    return web.json_response(completion(text))


# -- apps ----------------------------------------------------------------------------------


def make_app(
    routes: Mapping[str, Handler] | Handler,
    *,
    db: Path | str | None,
    config: StoreConfig | None = None,
    middlewares: Sequence[Any] = (),
) -> tuple[web.Application, SessionStore | None]:
    """An app with `routes` (POST; a bare handler serves CHAT_PATH), with setup() if `db`."""
    app = web.Application(middlewares=list(middlewares))
    table = {CHAT_PATH: routes} if callable(routes) else dict(routes)
    for path, handler in table.items():
        app.router.add_route("*", path, handler)
    store = setup(app, db, config=config) if db is not None else None
    return app, store


class FakeClock:
    """An injected clock (integer ms) so expiry is tested without sleeping."""

    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1000)


# -- reading records -----------------------------------------------------------------------


async def poll(check: Callable[[], Awaitable[bool]], *, timeout: float = 3.0) -> None:
    """Wait until `check()` holds (state another task or process changes); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def exchanges(store: SessionStore, **query: Any) -> list[Exchange]:
    """Every request with its response, oldest first, after committing what is queued."""
    await store.flush()
    return await store.backend.list_exchanges(RequestQuery(oldest_first=True, **query))


async def wait_for_responses(
    store: SessionStore, count: int = 1, *, timeout: float = 5.0
) -> list[Exchange]:
    """Poll until `count` requests have their response row (a fault is recorded later)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await exchanges(store)
        if len(found) >= count and all(e.response is not None for e in found):
            return found
        if loop.time() > deadline:
            raise AssertionError(
                f"expected {count} exchanges with responses within {timeout}s, got "
                f"{[(e.request.request_id, e.response) for e in found]}"
            )
        await asyncio.sleep(0.02)


async def assert_one_response_per_request(store: SessionStore, *, settle: float = 0.1) -> None:
    """Every request row has exactly one response row, even a while after the call ended."""
    await asyncio.sleep(settle)
    await store.flush()
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    rows = sqlite_rows(
        backend.path,
        "SELECT q.request_id, count(r.id) AS n FROM requests q"
        " LEFT JOIN responses r ON r.request_id = q.request_id GROUP BY q.request_id",
    )
    assert rows, "no request rows"
    assert [r["n"] for r in rows] == [1] * len(rows)


def stored_completion(exchange: Exchange) -> dict[str, Any]:
    assert exchange.response is not None, "no response row"
    assert exchange.response.openai_response is not None
    obj = json.loads(exchange.response.openai_response)
    assert isinstance(obj, dict)
    return obj


def stored_content(exchange: Exchange, choice: int = 0) -> str:
    content = stored_completion(exchange)["choices"][choice]["message"]["content"]
    return content if isinstance(content, str) else ""


def sqlite_rows(path: Path | str, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Read the file with a connection of its own (what another process would see)."""
    conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def db_file_bytes(path: Path) -> bytes:
    """The database and any WAL/journal beside it, as a byte string."""
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            data += p.read_bytes()
    return data


# -- raw HTTP, for byte-exact reads and disconnects ----------------------------------------


def raw_request(
    path: str, body: bytes, *, host: str = "127.0.0.1", headers: Mapping[str, str] | None = None
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


async def fetch_raw(host: str, port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


def split_response(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(status line, header lines, body bytes as framed on the wire)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {raw[:200]!r}"
    status, *headers = head.split(b"\r\n")
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    """Undo chunked transfer coding; a cut-off last chunk gives what arrived of it."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            break
        start = end + 2
        out += data[start : start + size]
        pos = start + size + 2
    return bytes(out)


def sse_content(body: bytes) -> str:
    """Choice 0's content in the complete `data:` events of an OpenAI stream body."""
    text = body.replace(b"\r\n", b"\n").decode("utf-8", "replace")
    events = text.split("\n\n")[:-1]  # the last piece is unterminated (or empty)
    out = []
    for event in events:
        for line in event.split("\n"):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[len("data: ") :])
            for choice in obj.get("choices", []):
                if choice.get("index") == 0:
                    out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)
