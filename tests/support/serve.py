"""A minimal recorded chat server run with `web.run_app`, for tests that signal or kill it.

`python tests/support/serve.py --db PATH --port PORT` serves `/v1/chat/completions` with
sessions and records (the package's defaults; `--durability sync` for sync) and `GET /health`
(not recorded). Each chat call counts a turn in its session and answers with the session as it
was before the turn, so a test can tell a continued conversation from a new one.
SIGTERM stops it the way a production proxy is stopped: run_app's graceful shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from aiohttp import web

from aiohttp_session_store import StoreConfig, get_session, get_store, setup
from aiohttp_session_store.config import Durability


async def chat(request: web.Request) -> web.Response:
    delay = request.app[DELAY]
    if delay:
        # Keeps calls in flight, so a signal lands while some are being handled.
        await asyncio.sleep(delay)
    session = get_session(request)
    if session is None:
        return web.json_response({"session_id": None})
    turn = session.message_count + 1
    await get_store(request).manager.update_session(session.id, f"parent-{turn}")
    return web.json_response(
        {
            "session_id": session.id,
            "is_new": session.is_new,
            "parent_id": session.parent_id,
            "message_count": session.message_count,
        }
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


DELAY = web.AppKey("delay", float)


def create_app(
    db: str, *, flush_interval: float, delay: float, durability: Durability = "batched"
) -> web.Application:
    app = web.Application()
    app[DELAY] = delay
    setup(app, db, config=StoreConfig(flush_interval=flush_interval, durability=durability))
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--flush-interval", type=float, default=0.05)
    parser.add_argument("--delay", type=float, default=0.005, help="seconds each chat call takes")
    parser.add_argument("--durability", choices=["batched", "sync"], default="batched")
    args = parser.parse_args(argv)
    app = create_app(
        args.db, flush_interval=args.flush_interval, delay=args.delay, durability=args.durability
    )
    web.run_app(
        app, host="127.0.0.1", port=args.port, shutdown_timeout=10, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
