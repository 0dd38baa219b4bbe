"""What metrics cost per call: the same app with the store, with and without `enable_metrics`.

    python benchmarks/bench_metrics.py                  # wall time, rounds interleaved
    python benchmarks/bench_metrics.py --callgrind      # also instructions per call (valgrind)

Both apps run in this process on real sockets, driven one call at a time by a raw keep-alive
HTTP client (so the client's cost is small and the same in both). Rounds alternate between
the two apps and report the median time per call and the ratio metrics/store, for JSON and
SSE replies (bench_app's handler: 20 chunks and a usage chunk). With `--callgrind` each
(mode, kind) also runs in a child under `valgrind --tool=callgrind --instr-atstart=no
--separate-threads=yes`, instrumentation switched on (callgrind_control) around a fixed
number of calls: the main thread's instructions per call are deterministic, so their
difference is the figure to trust on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import bench_app
from aiohttp import web

from aiohttp_session_store import STORE_KEY

MODES: Final = ("store", "metrics")
KINDS: Final = ("json", "sse")


def request_bytes(n: int, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": "bench-model",
            "stream": stream,
            "messages": [{"role": "user", "content": f"metrics bench call {n}"}],
        }
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected reply: {head[:80]!r}")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        await reader.readuntil(b"\r\n0\r\n\r\n")
        return
    start = lower.index(b"content-length:") + len(b"content-length:")
    await reader.readexactly(int(lower[start : lower.index(b"\r\n", start)]))


@asynccontextmanager
async def serving(db: Path, mode: str) -> AsyncIterator[tuple[str, int]]:
    app = bench_app.make_app(str(db))
    if mode == "metrics":
        store = app[STORE_KEY]
        app.add_subapp("/admin", store.metrics_app())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


async def calls(address: tuple[str, int], first: int, count: int, stream: bool) -> float:
    """Send `count` calls one after another on one connection; seconds taken."""
    reader, writer = await asyncio.open_connection(*address)
    payloads = [request_bytes(first + i, stream) for i in range(count)]
    try:
        started = time.perf_counter()
        for payload in payloads:
            writer.write(payload)
            await read_response(reader)
        return time.perf_counter() - started
    finally:
        writer.close()
        await writer.wait_closed()


async def wall(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    per_call: dict[tuple[str, str], list[float]] = {(m, k): [] for m in MODES for k in KINDS}
    async with (
        serving(work / "store.db", "store") as plain,
        serving(work / "metrics.db", "metrics") as metered,
    ):
        addresses = {"store": plain, "metrics": metered}
        await calls(plain, 0, 50, False)  # warm both up
        await calls(metered, 0, 50, False)
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for kind in KINDS:
                for mode in order:
                    first = 1000 + r * args.calls
                    seconds = await calls(addresses[mode], first, args.calls, kind == "sse")
                    per_call[(mode, kind)].append(seconds / args.calls * 1e6)
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        store_us = statistics.median(per_call[("store", kind)])
        metrics_us = statistics.median(per_call[("metrics", kind)])
        out[kind] = {"store_us": store_us, "metrics_us": metrics_us, "ratio": metrics_us / store_us}
    return out


def toggle(on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        check=True,
        capture_output=True,
    )


async def inner(mode: str, kind: str, count: int, db: Path) -> None:
    """The child run under callgrind: warm up, then instrument exactly `count` calls."""
    async with serving(db, mode) as address:
        await calls(address, 0, 100, kind == "sse")
        toggle(True)
        await calls(address, 1000, count, kind == "sse")
        toggle(False)


def instructions(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        figures: dict[str, float] = {}
        for mode in MODES:
            prefix = work / f"cg-{mode}-{kind}"
            cmd = [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                f"--callgrind-out-file={prefix}.%p", sys.executable, __file__, "--inner",
                mode, kind, str(args.callgrind_calls), str(work / f"cg-{mode}-{kind}.db"),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
            # Thread 1 is the event loop: where the request path runs.
            main = next(p for p in work.glob(f"cg-{mode}-{kind}.*-01"))
            totals = [ln for ln in main.read_text().splitlines() if ln.startswith("totals:")]
            figures[mode] = int(totals[0].split()[1]) / args.callgrind_calls
        figures["added"] = figures["metrics"] - figures["store"]
        figures["added_pct"] = 100 * figures["added"] / figures["store"]
        out[kind] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=1000, help="calls per round and mode")
    p.add_argument("--callgrind", action="store_true", help="also count instructions")
    p.add_argument("--callgrind-calls", type=int, default=300)
    p.add_argument("--inner", nargs=4, metavar=("MODE", "KIND", "N", "DB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        mode, kind, count, db = args.inner
        asyncio.run(inner(mode, kind, int(count), Path(db)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        work = Path(tmp)
        results = {"wall": asyncio.run(wall(args, work))}
        print(f"wall time per call, median of {args.rounds} rounds x {args.calls} calls:")
        for kind, f in results["wall"].items():
            print(
                f"  {kind:4}  store {f['store_us']:7.1f} us   store+metrics {f['metrics_us']:7.1f}"
                f" us   ratio {f['ratio']:.3f}"
            )
        if args.callgrind:
            results["instructions"] = instructions(args, work)
            print(f"main-thread instructions per call (callgrind, {args.callgrind_calls} calls):")
            for kind, f in results["instructions"].items():
                print(
                    f"  {kind:4}  store {f['store']:,.0f}   store+metrics {f['metrics']:,.0f}"
                    f"   added {f['added']:,.0f} ({f['added_pct']:+.2f} %)"
                )
    print("JSON " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
