"""Instructions the store adds per call, counted by callgrind: the deterministic overhead figure.

    python benchmarks/bench_callgrind.py                 # bare, store, store without lineage
    python benchmarks/bench_callgrind.py --calls 200 --json

The same app (bench_app's handler: a JSON chat.completion, or 20 chunks + a usage chunk over
SSE) runs in a child under `valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes`
in three modes: `bare` (no `setup()`), `store` (SQLite, batched durability) and `nolineage`
(the store with conversation lineage's resolve and complete stubbed out, so `store - nolineage`
is what lineage costs per call). A raw keep-alive HTTP client in the same process sends the
benchmark's conversation bodies one at a time; instrumentation is switched on (callgrind_control)
around exactly `--calls` calls after a warm-up. Thread 1 is the event loop, where the request
path runs: its instructions per call do not depend on the machine's load, so the difference
store - bare is the figure to optimise on a shared machine. The writer's own thread (aiosqlite)
is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import bench_app
from aiohttp import web
from bench_workload import AUTHORIZATION, conversation_bodies

from aiohttp_session_store import STORE_KEY

__all__ = ("KINDS", "MODES", "measure")

MODES: Final = ("bare", "store", "nolineage")
KINDS: Final = ("json", "sse")
_WARMUP: Final = 100
_ROOT: Final = Path(__file__).resolve().parent.parent


def request_bytes(body: bytes) -> bytes:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: {AUTHORIZATION}\r\n"
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


def _stub_lineage(app: web.Application) -> None:
    """Lineage's per-call work replaced by the cheapest equivalent: no hashes, no lookup."""
    from aiohttp_session_store.models import Session
    from aiohttp_session_store.turn import Turn

    lineage = app[STORE_KEY].manager.lineage

    async def resolve(history: list[Any], *, scope: str, session: Session | None) -> Turn:
        return Turn(session=session, scope=scope, history=history)

    def complete(*args: Any, **kwargs: Any) -> None:
        return None

    lineage.resolve = resolve  # type: ignore[method-assign]
    lineage.complete = complete  # type: ignore[method-assign]


@asynccontextmanager
async def serving(mode: str, db: Path) -> AsyncIterator[tuple[str, int]]:
    app = bench_app.make_app(None if mode == "bare" else str(db))
    if mode == "nolineage":
        _stub_lineage(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


async def calls(address: tuple[str, int], payloads: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        for payload in payloads:
            writer.write(payload)
            await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()


def toggle(on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        check=True,
        capture_output=True,
    )


async def inner(mode: str, kind: str, count: int, db: Path) -> None:
    """The child run under callgrind: warm up, then instrument exactly `count` calls."""
    # Turn 1 of every conversation warms up (new sessions); the measured calls continue
    # them (turns 2, 3, ...), the steady state of a proxy: sessions known, lineage cached.
    bodies = conversation_bodies(stream=kind == "sse", conversations=_WARMUP)
    payloads = [request_bytes(b) for b in bodies]
    async with serving(mode, db) as address:
        await calls(address, payloads[:_WARMUP])
        measured = payloads[_WARMUP : _WARMUP + count]
        if len(measured) < count:
            raise SystemExit(f"at most {len(payloads) - _WARMUP} calls")
        toggle(True)
        await calls(address, measured)
        toggle(False)
        # Let the writer commit what the measured calls queued before the app closes.
        await asyncio.sleep(0.5)


def _totals(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return 0


def _run(mode: str, kind: str, count: int, work: Path) -> dict[str, float]:
    prefix = work / f"cg-{mode}-{kind}"
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
        f"--callgrind-out-file={prefix}.%p", sys.executable, __file__, "--inner",
        mode, kind, str(count), str(work / f"cg-{mode}-{kind}.db"),
    ]  # fmt: skip
    # The checkout's package, not whichever copy is installed: this file's repository first.
    path = os.pathsep.join(filter(None, (str(_ROOT), os.environ.get("PYTHONPATH"))))
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": path})
    files = sorted(work.glob(f"cg-{mode}-{kind}.*-*"))
    main = next(p for p in files if p.name.endswith("-01"))
    others = sum(_totals(p) for p in files if not p.name.endswith("-01"))
    return {"main": _totals(main) / count, "threads": others / count}


def measure(
    count: int = 200, work: Path | None = None, kinds: tuple[str, ...] = KINDS
) -> dict[str, dict[str, float]]:
    """Per kind: main-thread instructions per call in each mode, and what the store adds.

    With `work` given, callgrind's output files stay there (for callgrind_annotate).
    """
    own = work is None
    tmp = Path(tempfile.mkdtemp(prefix="bench-callgrind-")) if work is None else work
    out: dict[str, dict[str, float]] = {}
    try:
        for kind in kinds:
            f: dict[str, float] = {}
            for mode in MODES:
                r = _run(mode, kind, count, tmp)
                f[mode] = r["main"]
                f[f"{mode}_threads"] = r["threads"]
            f["added"] = f["store"] - f["bare"]
            f["added_pct"] = 100 * f["added"] / f["bare"]
            f["lineage"] = f["store"] - f["nolineage"]
            out[kind] = f
    finally:
        if own:
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
    return out


def report(results: dict[str, dict[str, float]], count: int) -> list[str]:
    lines = [f"main-thread instructions per call (callgrind, {count} calls, event loop thread):"]
    for kind, f in results.items():
        lines.append(
            f"  {kind:4}  bare {f['bare']:,.0f}   store {f['store']:,.0f}"
            f"   added {f['added']:,.0f} ({f['added_pct']:+.1f} %)"
            f"   of which lineage {f['lineage']:,.0f}"
            f"   writer thread {f['store_threads']:,.0f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep callgrind's files in DIR (for annotate)"
    )
    p.add_argument("--inner", nargs=4, metavar=("MODE", "KIND", "N", "DB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        mode, kind, count, db = args.inner
        asyncio.run(inner(mode, kind, int(count), Path(db)))
        return 0
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        for old in args.keep.glob("cg-*"):
            old.unlink()
    results = measure(args.calls, args.keep, tuple(args.kinds))
    for line in report(results, args.calls):
        print(line)
    if args.json:
        print("JSON " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
