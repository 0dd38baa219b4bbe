"""What a real proxy pays: the example proxy calling a fake upstream over HTTP, bare vs store.

    python benchmarks/bench_proxy.py                      # JSON and SSE, 3 rounds of 5 s
    python benchmarks/bench_proxy.py --rounds 5 --duration 8 --connections 16

Three kinds of process: the fake stateful upstream (examples/fake_upstream.py, no delay
between deltas), the proxy, and this one, the load. The proxy runs in two versions, each in
its own process: `store` is examples/proxy_server.py's app in stateful mode (`setup()`, SQLite,
lineage finds where each history continues), `bare` is the same handler without `setup()`,
remembering each conversation's upstream chat and node in a dict keyed by (first user
message, turn) - what a proxy without the store would do. Both send the upstream the same
calls: one new chat per conversation, then only the new message of each turn.

The load: `--connections` conversations at a time, each a real client: it reads the reply
(JSON, or the SSE chunks joined) and resends it in the next turn's history, for `--turns`
turns, then starts a new conversation. Rounds alternate bare/store; the figure is the median
of the per-round throughput ratios store/bare. The handler's work (an HTTP call upstream,
parsing and relaying its stream) dilutes the store's cost as it does in production: compare
with bench_http's no-op handler.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import aiohttp
import bench_app

__all__ = ("measure",)

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
EXAMPLES: Final = ROOT / "examples"
_READY_TIMEOUT: Final = 30.0
_KINDS: Final = ("json", "sse")


# -- the servers (run as `--serve`) ----------------------------------------------------------


def _bare_app(upstream: str) -> Any:
    """proxy_server's app without `setup()`: the turn comes from a dict, not the store."""
    sys.path.insert(0, str(EXAMPLES))
    import proxy_server
    from aiohttp import web

    from aiohttp_session_store.hashing import first_user_text
    from aiohttp_session_store.models import LineageNode
    from aiohttp_session_store.turn import Turn

    known: dict[tuple[str, int], tuple[str, str, int]] = {}
    turn_key: web.RequestKey[Turn] = web.RequestKey("bench_turn", Turn)

    def get_turn(request: web.BaseRequest) -> Turn | None:
        turn = request.get(turn_key)
        return turn if isinstance(turn, Turn) else None

    @web.middleware
    async def conversations(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = json.loads(await request.read())
        history = body.get("messages")
        first = first_user_text(body) or ""
        entry = known.pop((first, len(history)), None)
        node = None
        if entry is not None:
            chat_id, node_id, depth = entry
            node = LineageNode("", "", None, chat_id, node_id, None, depth, None, 0)
        turn = request[turn_key] = Turn(session=None, scope="", history=history, node=node)
        response = await handler(request)
        if turn.advanced and turn.reply_chat_id and turn.reply_node_id:
            # The next turn resends this history, the reply and one new user message.
            known[(first, len(history) + 2)] = (
                turn.reply_chat_id,
                turn.reply_node_id,
                len(history) + 1,
            )
        return response

    # The handler asks for the session only to refuse calls without one; with no records,
    # what it sent upstream goes nowhere.
    stand_ins: dict[str, Callable[..., Any]] = {
        "get_turn": get_turn,
        "get_session": get_turn,
        "set_upstream": lambda request, **bodies: None,
    }
    for name, stand_in in stand_ins.items():
        setattr(proxy_server, name, stand_in)
    app = web.Application(middlewares=[conversations])
    app[proxy_server.UPSTREAM] = proxy_server.Upstream(mode="stateful", url=upstream, api_key=None)
    app.cleanup_ctx.append(proxy_server.http_client)
    app.router.add_post("/v1/chat/completions", proxy_server.chat_completions)
    return app


def _store_app(upstream: str, db: str) -> Any:
    sys.path.insert(0, str(EXAMPLES))
    import proxy_server

    return proxy_server.create_app(db=db, upstream=upstream, mode="stateful")


def serve(mode: str, port: int, upstream: str, db: str) -> None:

    logging.basicConfig(level=logging.WARNING)
    app = _bare_app(upstream) if mode == "bare" else _store_app(upstream, db)

    asyncio.run(bench_app.serve(app, port))


# -- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    # The checkout's package, not whichever copy is installed.
    path = os.pathsep.join(filter(None, (str(ROOT), str(EXAMPLES), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path}


@contextmanager
def _process(cmd: list[str]) -> Iterator[None]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[1:3]} exited with {proc.returncode}")
            line = proc.stdout.readline()
            if b"READY" in line or b"Running on" in line:
                break
        else:
            raise RuntimeError(f"{cmd[1:3]} did not start")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _upstream_cmd(port: int) -> list[str]:
    code = (
        "import sys, fake_upstream; from aiohttp import web; "
        "print('READY', flush=True); "
        f"web.run_app(fake_upstream.create_app(delta_delay=0.0), host='127.0.0.1', port={port},"
        " access_log=None, print=None)"
    )
    return [sys.executable, "-c", code]


def _proxy_cmd(mode: str, port: int, upstream: str, db: Path) -> list[str]:
    return [
        sys.executable, str(Path(__file__)), "--serve", mode, str(port), upstream, str(db),
    ]  # fmt: skip


# -- the load --------------------------------------------------------------------------------


async def _reply_text(resp: aiohttp.ClientResponse, stream: bool) -> str:
    if resp.status != 200:
        raise RuntimeError(f"proxy answered {resp.status}: {(await resp.text())[:200]}")
    if not stream:
        reply = await resp.json()
        return str(reply["choices"][0]["message"]["content"])
    parts: list[str] = []
    async for line in resp.content:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    parts.append(content)
    return "".join(parts)


async def _conversations(
    url: str, stream: bool, connections: int, turns: int, seconds: float, tag: str
) -> int:
    """Run `connections` clients for `seconds`; calls completed."""
    done = 0
    deadline = time.perf_counter() + seconds
    numbers = itertools.count()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                n = next(numbers)
                history: list[dict[str, str]] = [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"{tag} conversation {n}: tell me about B-trees."},
                ]
                for turn in range(turns):
                    if time.perf_counter() >= deadline:
                        return
                    body = {"model": "qwen-fake", "stream": stream, "messages": history}
                    async with http.post(url, json=body) as resp:
                        text = await _reply_text(resp, stream)
                    done += 1
                    history = [
                        *history,
                        {"role": "assistant", "content": text},
                        {"role": "user", "content": f"And then? ({turn})"},
                    ]

        await asyncio.gather(*(client() for _ in range(connections)))
    return done


def measure(
    *, rounds: int, duration: float, connections: int, turns: int, work: Path, say: Any = print
) -> dict[str, Any]:
    """Per kind: throughput of bare and store per round, and the median ratio store/bare."""
    up_port = _free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    ports = {"bare": _free_port(), "store": _free_port()}
    out: dict[str, Any] = {}
    with (
        _process(_upstream_cmd(up_port)),
        _process(_proxy_cmd("bare", ports["bare"], upstream, work / "unused.db")),
        _process(_proxy_cmd("store", ports["store"], upstream, work / "proxy-store.db")),
    ):
        for kind in _KINDS:
            stream = kind == "sse"
            rps: dict[str, list[float]] = {"bare": [], "store": []}
            for mode in ("bare", "store"):  # warm-up
                url = f"http://127.0.0.1:{ports[mode]}/v1/chat/completions"
                asyncio.run(_conversations(url, stream, connections, turns, 1.0, f"warm-{kind}"))
            for r in range(rounds):
                order = ("bare", "store") if r % 2 == 0 else ("store", "bare")
                for mode in order:
                    url = f"http://127.0.0.1:{ports[mode]}/v1/chat/completions"
                    calls = asyncio.run(
                        _conversations(url, stream, connections, turns, duration, f"{kind}{r}")
                    )
                    rps[mode].append(calls / duration)
            ratios = [s / b for s, b in zip(rps["store"], rps["bare"], strict=True) if b]
            out[kind] = {
                "bare_rps": statistics.median(rps["bare"]),
                "store_rps": statistics.median(rps["store"]),
                "ratio": statistics.median(ratios),
                "runs": rps,
            }
            say(
                f"   proxy {kind}: bare {out[kind]['bare_rps']:.0f} req/s, store"
                f" {out[kind]['store_rps']:.0f} req/s => store/bare {out[kind]['ratio']:.3f}"
                f" (median of {rounds} rounds)"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--turns", type=int, default=4, help="turns per conversation")
    p.add_argument(
        "--serve", nargs=4, metavar=("MODE", "PORT", "UPSTREAM", "DB"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.serve:
        mode, port, upstream, db = args.serve
        serve(mode, int(port), upstream, db)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        results = measure(
            rounds=args.rounds,
            duration=args.duration,
            connections=args.connections,
            turns=args.turns,
            work=Path(tmp),
        )
    print("JSON " + json.dumps({k: {**v, "runs": v["runs"]} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
