"""How many bytes a SQLite store grows per thousand recorded calls (the figure in docs/cli.md).

    python benchmarks/file_growth.py [--calls 1000] [--turns 5] [--reply-chars 600]

Serves a chat app with `setup()` in-process and sends real HTTP calls through the middleware,
shaped like chat traffic: conversations of `--turns` turns, each request resending the whole
history (as OpenAI clients do), user messages of ~200 characters, replies of `--reply-chars`.
Each profile runs on a fresh file; the size is read after the app has closed (WAL folded back
into the file), minus the size of an empty store. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aiohttp_session_store import get_session, get_store, setup

REPLY_CHARS = web.AppKey("reply_chars", int)

_USER = (
    "Could you explain, with a short example, how {topic} works and when I should prefer it"
    " over the alternatives? Please keep it practical; I am writing production code. ({n})"
)
_TOPICS = ("connection pooling", "backpressure", "WAL mode", "async generators", "retries")


def _reply(chars: int, n: int) -> str:
    words = (f"word{(n + i) % 97}" for i in range(chars))
    text = ""
    for word in words:
        if len(text) >= chars:
            break
        text += word + " "
    return text[:chars]


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    session = get_session(request)
    if session is not None:
        await get_store(request).manager.update_session(session.id, os.urandom(8).hex())
    chars = request.app[REPLY_CHARS]
    reply = _reply(chars, len(body["messages"]))
    usage = {"prompt_tokens": 50, "completion_tokens": chars // 4, "total_tokens": 50 + chars // 4}
    if not body.get("stream"):
        return web.json_response(
            {
                "id": "chatcmpl-x",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    # About four characters per token, one token per event, as real streams send.
    for i in range(0, len(reply), 4):
        chunk = {
            "id": "chatcmpl-x",
            "object": "chat.completion.chunk",
            "model": body.get("model"),
            "choices": [{"index": 0, "delta": {"content": reply[i : i + 4]}}],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
    await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


@contextlib.asynccontextmanager
async def _served(path: Path, reply_chars: int) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    app[REPLY_CHARS] = reply_chars
    setup(app, str(path))
    app.router.add_post("/v1/chat/completions", _chat)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def _run(path: Path, *, calls: int, turns: int, reply_chars: int, stream: bool) -> None:
    async with _served(path, reply_chars) as client:
        sent = 0
        conversation = 0
        while sent < calls:
            topic = _TOPICS[conversation % len(_TOPICS)]
            messages: list[dict[str, str]] = [{"role": "system", "content": "Be helpful."}]
            for turn in range(min(turns, calls - sent)):
                messages.append(
                    {
                        "role": "user",
                        "content": _USER.format(topic=topic, n=f"{conversation}.{turn}"),
                    }
                )
                resp = await client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o", "stream": stream, "messages": messages},
                )
                text = await resp.text()
                assert resp.status == 200, text
                messages.append(
                    {"role": "assistant", "content": _reply(reply_chars, len(messages))}
                )
                sent += 1
            conversation += 1


async def _empty_size(directory: Path) -> int:
    path = directory / "empty.db"
    async with _served(path, 0):
        pass
    return path.stat().st_size


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--reply-chars", type=int, default=600)
    args = parser.parse_args()
    profiles = [
        ("one short turn, JSON", 1, 40, False),
        (f"{args.turns}-turn conversations, JSON", args.turns, args.reply_chars, False),
        (f"{args.turns}-turn conversations, SSE", args.turns, args.reply_chars, True),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        empty = await _empty_size(directory)
        print(f"empty store: {empty:,} bytes; {args.calls} calls per profile\n")
        print("| profile | bytes per 1,000 calls | per call | request body | reply body |")
        print("|---|---:|---:|---:|---:|")
        for n, (name, turns, reply_chars, stream) in enumerate(profiles):
            path = directory / f"p{n}.db"
            await _run(path, calls=args.calls, turns=turns, reply_chars=reply_chars, stream=stream)
            grown = path.stat().st_size - empty
            per_thousand = grown * 1000 / args.calls
            req, resp = _body_sizes(path)
            print(
                f"| {name} | {per_thousand / 1e6:.2f} MB | {grown / args.calls / 1024:.1f} KiB"
                f" | {req / 1024:.1f} KiB | {resp / 1024:.1f} KiB |"
            )


def _body_sizes(path: Path) -> tuple[float, float]:
    """Mean stored request and reply body sizes (bytes), for reading the table."""
    uri = path.resolve().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        row = conn.execute(
            "SELECT avg(length(CAST(q.openai_request AS BLOB))),"
            " avg(length(CAST(r.openai_response AS BLOB)))"
            " FROM requests q JOIN responses r ON r.request_id = q.request_id"
        ).fetchone()
    return float(row[0] or 0), float(row[1] or 0)


if __name__ == "__main__":
    asyncio.run(main())
