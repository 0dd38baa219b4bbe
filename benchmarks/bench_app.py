"""The benchmarked server: one chat.completions app, bare or with `setup()`, in its own process.

    python benchmarks/bench_app.py --mode bare  --port 8101
    python benchmarks/bench_app.py --mode store --port 8102 --db /tmp/bench.db

Both modes run the same handler. With the store it is session-aware, as a proxy for a stateful
upstream is: it reads the session, sets a chat id on a new one and calls `update_parent_id`
after each reply. `"stream": true` in the body selects the SSE reply (20 chat.completion.chunk
events, a usage chunk, `[DONE]`); otherwise a JSON chat.completion. Prints `READY` once it
listens, serves until SIGTERM/SIGINT, then closes (committing every record) and prints one
`STATS {json}` line. SIGUSR1/SIGUSR2 start/stop an in-process pyinstrument profile when
`--pyinstrument OUT.html` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from bench_workload import REPLY_TEXT

import aiohttp_session_store as store_lib
from aiohttp_session_store.backends.base import Backend

__all__ = ("main", "make_app", "serve")

STATE: Final = web.AppKey("bench_state", dict)

_CHUNKS: Final = 20
_WORDS: Final = tuple(f"word{i} " for i in range(_CHUNKS))
assert "".join(_WORDS) == REPLY_TEXT  # the workload resends this reply as the next turn's history


def _completion_text() -> str:
    return "".join(_WORDS)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    state: dict[str, Any] = request.app[STATE]
    state["served"] += 1
    store: store_lib.SessionStore | None = state["store"]
    session = store_lib.get_session(request) if store is not None else None
    if store is not None and session is not None and session.is_new:
        await store.manager.set_chat_id(session.id, f"chat-{uuid.uuid4().hex}")
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    # What a stateful upstream's reply would name as the parent of the next turn.
    parent_id = f"msg-{uuid.uuid4().hex}"
    created = int(time.time())
    model = body.get("model", "bench-model")
    prompt_tokens = sum(len(str(m.get("content", ""))) // 4 for m in body.get("messages", []))

    if body.get("stream") is True:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for i, word in enumerate(_WORDS):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": "stop" if i == _CHUNKS - 1 else None,
                    }
                ],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        usage = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": _CHUNKS,
                "total_tokens": prompt_tokens + _CHUNKS,
            },
        }
        await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        if store is not None and session is not None:
            await store.manager.update_parent_id(session.id, parent_id)
        return response

    reply = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _completion_text()},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _CHUNKS,
            "total_tokens": prompt_tokens + _CHUNKS,
        },
    }
    if store is not None and session is not None:
        await store.manager.update_parent_id(session.id, parent_id)
    return web.json_response(reply)


def make_app(
    database: str | Backend | None, *, config: store_lib.StoreConfig | None = None
) -> web.Application:
    """The app; with `database` None it is served bare (no `setup()`)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    store = store_lib.setup(app, database, config=config) if database is not None else None
    app[STATE] = {"served": 0, "store": store}
    return app


def _stats(app: web.Application) -> dict[str, Any]:
    state: dict[str, Any] = app[STATE]
    stats: dict[str, Any] = {"served": state["served"]}
    store: store_lib.SessionStore | None = state["store"]
    if store is not None:
        writer = store.manager.writer
        stats.update(
            records_written=writer.records_written,
            records_dropped=writer.records_dropped,
            write_errors=writer.write_errors,
            batches_committed=writer.batches_committed,
        )
    return stats


def _database(args: argparse.Namespace) -> str | Backend | None:
    if args.mode == "bare":
        return None
    if args.postgres:
        from aiohttp_session_store.backends.postgres import PostgresBackend

        return PostgresBackend(args.postgres, schema=args.schema)
    if not args.db:
        raise SystemExit("--mode store needs --db PATH or --postgres URL")
    return str(args.db)


async def serve(
    app: web.Application,
    port: int,
    *,
    on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
) -> None:
    """Serve `app` on `port`, print `READY`, and stop cleanly on SIGTERM or SIGINT.

    Every benchmark server runs this way, so the load generator starts and stops them alike.
    """
    # No access log in either mode: it would cost the same in both and only add noise.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_loop is not None:
        on_loop(loop)
    print("READY", flush=True)
    await stop.wait()
    await runner.cleanup()


async def _serve(args: argparse.Namespace) -> None:
    config = store_lib.StoreConfig(durability=args.durability)
    app = make_app(_database(args), config=config)
    profile = args.pyinstrument
    await serve(
        app,
        args.port,
        on_loop=(lambda loop: _install_profiler(loop, profile)) if profile else None,
    )
    print("STATS " + json.dumps(_stats(app)), flush=True)


def _install_profiler(loop: asyncio.AbstractEventLoop, output: str) -> None:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")

    def start() -> None:
        if not profiler.is_running:
            profiler.start()

    def stop() -> None:
        if profiler.is_running:
            profiler.stop()
            with open(output, "w", encoding="utf-8") as fh:
                fh.write(profiler.output_html())
            with open(output + ".txt", "w", encoding="utf-8") as fh:
                fh.write(profiler.output_text(unicode=False, color=False, show_all=False))

    loop.add_signal_handler(signal.SIGUSR1, start)
    loop.add_signal_handler(signal.SIGUSR2, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("bare", "store"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", help="SQLite file for --mode store")
    parser.add_argument("--postgres", help="PostgreSQL URL for --mode store (instead of --db)")
    parser.add_argument("--schema", help="PostgreSQL schema (with --postgres)")
    parser.add_argument("--durability", choices=("batched", "sync"), default="batched")
    parser.add_argument("--pyinstrument", metavar="OUT.html", help="profile on SIGUSR1..SIGUSR2")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
