"""Three ways to run the SQLite store's writes, compared on the same app and load.

    python benchmarks/bench_writer.py callgrind [--calls 200]     # event-loop instructions
    python benchmarks/bench_writer.py http [--rounds 3 --duration 3]   # throughput store/bare

- `aiosqlite`: the package as it is: `SQLiteBackend.write_batch` hands the whole batch to the
  aiosqlite connection's thread in one hop, rows built there.
- `thread`: a dedicated `threading.Thread` with its own plain sqlite3 connection to the file
  and a `queue.SimpleQueue`; the same `_write_now` runs there, the loop's future is settled
  by `call_soon_threadsafe` (reads stay on the aiosqlite connection).
- `process`: a writer process (this file, `--child PATH`) owning a sqlite3 connection, fed
  over a pipe: each batch as one length-prefixed `marshal` frame of plain tuples (built on
  the loop with `attrgetter`), answered by one frame (ok, or the sqlite3 error's class and
  message). The child rebuilds the records and runs the same `batch_steps`/`_write_now`, so
  the rows are identical; no GIL is shared with the loop.

The prototypes here are for measuring only: the process writer does not respawn a child
that died, and the parent's other writes (sweeps, migrations) keep the aiosqlite
connection, serialised with the child's by SQLite's file lock and busy timeout.
`callgrind` runs bench_app's handler in a child under valgrind for each writer and reports
the event loop's instructions per call (thread 1) and the other threads' (`http` reports the
loop thread's involuntary context switches per call beside the throughput ratio, a sign of
GIL hand-offs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import marshal
import os
import queue
import select
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
from operator import attrgetter
from pathlib import Path
from typing import Any, Final

import bench_app
import bench_callgrind
import bench_http
from aiohttp import web
from bench_workload import conversation_bodies, write_bodies

from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.errors import StoreError
from aiohttp_session_store.models import (
    LineageNode,
    RequestRecord,
    ResponseRecord,
    Session,
    WriteBatch,
)

__all__ = ("WRITERS", "ProcessWriterBackend", "ThreadWriterBackend", "make_backend")

WRITERS: Final = ("aiosqlite", "thread", "process")
_ROOT: Final = Path(__file__).resolve().parent.parent
_LEN: Final = struct.Struct("<I")

_CLASSES: Final = (Session, RequestRecord, ResponseRecord, LineageNode)
_FIELDS: Final = {cls: attrgetter(*cls.__slots__) for cls in _CLASSES}


def _pragmas(con: sqlite3.Connection, busy_timeout: float) -> None:
    """What SQLiteBackend sets on its connection (WAL already set by it)."""
    con.execute("PRAGMA foreign_keys=ON")
    con.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    con.execute("PRAGMA synchronous=NORMAL")


class ThreadWriterBackend(SQLiteBackend):
    """Writes on a dedicated thread and connection (no aiosqlite on the write path)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._jobs: queue.SimpleQueue[tuple[asyncio.Future[None], WriteBatch] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    async def open(self) -> None:
        await super().open()
        if self._thread is None:
            loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._serve, args=(loop,), daemon=True)
            self._thread.start()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        _pragmas(con, self._busy_timeout)
        try:
            while (job := self._jobs.get()) is not None:
                future, batch = job
                try:
                    self._write_now(con, batch)
                except BaseException as exc:  # handed to the loop, raised there
                    loop.call_soon_threadsafe(_settle, future, exc)
                else:
                    loop.call_soon_threadsafe(_settle, future, None)
        finally:
            con.close()

    async def write_batch(self, batch: WriteBatch) -> None:
        if not len(batch):
            return
        self._writable()
        future = asyncio.get_running_loop().create_future()
        self._jobs.put((future, batch))
        # Cancelled while waiting: the batch still commits or rolls back whole, as before.
        await future

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        await super().close()


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def encode_batch(batch: WriteBatch) -> bytes:
    """One frame: the batch as tuples of str/int/None, marshalled, length first."""
    f = _FIELDS
    body = marshal.dumps(
        (
            [f[Session](s) for s in batch.sessions],
            batch.deleted_sessions,
            [f[RequestRecord](r) for r in batch.requests],
            batch.upstream_requests,
            [f[ResponseRecord](r) for r in batch.responses],
            [f[LineageNode](n) for n in batch.nodes],
        )
    )
    return _LEN.pack(len(body)) + body


def decode_batch(body: bytes) -> WriteBatch:
    sessions, deleted, requests, upstream, responses, nodes = marshal.loads(body)
    return WriteBatch(
        sessions=[Session(*v) for v in sessions],
        deleted_sessions=list(deleted),
        requests=[RequestRecord(*v) for v in requests],
        upstream_requests=[tuple(u) for u in upstream],
        responses=[ResponseRecord(*v) for v in responses],
        nodes=[LineageNode(*v) for v in nodes],
    )


class ProcessWriterBackend(SQLiteBackend):
    """Writes in a child process fed over a pipe; answers come back in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._child: asyncio.subprocess.Process | None = None
        self._waiting: list[asyncio.Future[None]] = []
        self._answers: asyncio.Task[None] | None = None
        self.child_pid = 0

    async def open(self) -> None:
        await super().open()
        if self._child is None:
            path = os.pathsep.join(filter(None, (str(_ROOT), os.environ.get("PYTHONPATH"))))
            self._child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--child", self.path,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": path},
            )  # fmt: skip
            self.child_pid = self._child.pid
            self._answers = asyncio.create_task(self._read_answers())

    async def _read_answers(self) -> None:
        assert self._child is not None
        assert self._child.stdout is not None
        reader = self._child.stdout
        while True:
            try:
                head = await reader.readexactly(_LEN.size)
                ok, kind, message = marshal.loads(await reader.readexactly(_LEN.unpack(head)[0]))
            except asyncio.IncompleteReadError:
                for future in self._waiting:
                    _settle(future, StoreError("the writer process exited"))
                self._waiting.clear()
                return
            future = self._waiting.pop(0)
            exc = None if ok else getattr(sqlite3, kind, StoreError)(message)
            _settle(future, exc)

    async def write_batch(self, batch: WriteBatch) -> None:
        if not len(batch):
            return
        child = self._child
        if child is None or child.stdin is None or child.returncode is not None:
            raise StoreError("the writer process is not running")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        child.stdin.write(encode_batch(batch))
        await future

    async def close(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.stdin is not None:
            child.stdin.close()  # EOF: the child commits what it was sent, then exits
            await child.wait()
            if self._answers is not None:
                await self._answers
        await super().close()


def child(path: str) -> None:
    """The writer process: frames in on stdin, one answer frame each on stdout."""
    backend = SQLiteBackend(path)  # never opened: it builds the statements
    con = sqlite3.connect(path, isolation_level=None)
    _pragmas(con, backend._busy_timeout)
    src, out = sys.stdin.buffer, sys.stdout.buffer
    while head := src.read(_LEN.size):
        batch = decode_batch(src.read(_LEN.unpack(head)[0]))
        try:
            backend._write_now(con, batch)
            answer: tuple[bool, str, str] = (True, "", "")
        except sqlite3.Error as exc:
            answer = (False, type(exc).__name__, str(exc))
        body = marshal.dumps(answer)
        out.write(_LEN.pack(len(body)) + body)
        out.flush()
    con.close()


def make_backend(writer: str, path: str) -> SQLiteBackend:
    if writer == "thread":
        return ThreadWriterBackend(path)
    if writer == "process":
        return ProcessWriterBackend(path)
    return SQLiteBackend(path)


# -- callgrind ---------------------------------------------------------------------------


async def _cg_inner(writer: str, kind: str, count: int, db: Path) -> None:
    bodies = conversation_bodies(stream=kind == "sse", conversations=100)
    payloads = [bench_callgrind.request_bytes(b) for b in bodies]
    app = bench_app.make_app(make_backend(writer, str(db)))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address = runner.addresses[0][:2]
    try:
        await bench_callgrind.calls(address, payloads[:100])
        bench_callgrind.toggle(True)
        await bench_callgrind.calls(address, payloads[100 : 100 + count])
        bench_callgrind.toggle(False)
        await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()


def callgrind(count: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
        work = Path(tmp)
        path = os.pathsep.join(filter(None, (str(_ROOT), os.environ.get("PYTHONPATH"))))
        for kind in ("json", "sse"):
            for writer in WRITERS:
                prefix = work / f"cg-{writer}-{kind}"
                cmd = [
                    "valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--separate-threads=yes", f"--callgrind-out-file={prefix}.%p",
                    sys.executable, __file__, "--cg-inner", writer, kind, str(count),
                    str(work / f"{writer}-{kind}.db"),
                ]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": path}
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                files = sorted(work.glob(f"cg-{writer}-{kind}.*-*"))
                main = next(p for p in files if p.name.endswith("-01"))
                others = {p.name.rsplit("-", 1)[1]: bench_callgrind._totals(p) for p in files}
                del others["01"]
                out[f"{writer}/{kind}"] = {
                    "loop": bench_callgrind._totals(main) / count,
                    "threads": sum(others.values()) / count,
                }
                got = out[f"{writer}/{kind}"]
                print(f"  {writer:9} {kind:4} loop {got['loop']:12,.0f}"
                      f"  other threads {got['threads']:12,.0f}", flush=True)  # fmt: skip
    return out


# -- throughput ----------------------------------------------------------------------------


class _Server(bench_http.Server):
    """This file's `--serve` instead of bench_app.py: bench_app's app with a chosen writer."""

    def start(self) -> None:
        cmd = [sys.executable, __file__, "--serve", "--port", str(self.port), *self.args]
        env = {**os.environ, **self.env}
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if line != "READY":
            self.stop()
            raise RuntimeError(f"{self.name} server did not start: {line!r}; see {self.log}")


def _nvcsw(pid: int, tid: int) -> int:
    """Involuntary context switches of one thread of `pid` so far."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


async def _serve(writer: str, port: int, db: str) -> None:
    app = bench_app.make_app(None if writer == "bare" else make_backend(writer, db))
    await bench_app.serve(app, port)
    print("STATS " + json.dumps({"served": app[bench_app.STATE]["served"]}), flush=True)


def http(rounds: int, duration: float, connections: int) -> dict[str, Any]:
    loader = bench_http.choose_loader("auto")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
        work = Path(tmp)
        specs = [
            _Server(w, ["--writer", w, "--db", str(work / f"{w}.db")], bench_http.free_port(),
                    work / f"{w}.log")
            for w in ("bare", *WRITERS)
        ]  # fmt: skip
        with bench_http.servers(specs):
            for kind in ("json", "sse"):
                bodies = write_bodies(
                    work / f"bodies-{kind}.jsonl", conversation_bodies(stream=kind == "sse")
                )
                for s in specs:  # warm-up: sessions and lineage known
                    bench_http.run_load(loader, s, bodies, connections=connections, duration=1)
                ratios: dict[str, list[float]] = {w: [] for w in WRITERS}
                switches: dict[str, list[float]] = {s.name: [] for s in specs}
                for r in range(rounds):
                    got: dict[str, float] = {}
                    for s in specs if r % 2 == 0 else list(reversed(specs)):
                        before = _nvcsw(s.pid, s.pid)
                        res = bench_http.run_load(
                            loader, s, bodies, connections=connections, duration=duration
                        )
                        switches[s.name].append((_nvcsw(s.pid, s.pid) - before) / res.requests)
                        got[s.name] = res.rps
                    for w in WRITERS:
                        ratios[w].append(got[w] / got["bare"])
                    print(f"  {kind} round {r + 1}: " + "  ".join(
                        f"{n} {v:6.0f}/s" for n, v in got.items()), flush=True)  # fmt: skip
                results[kind] = {
                    w: {
                        "ratio": statistics.median(ratios[w]),
                        "ratios": ratios[w],
                        "nvcsw_per_call": statistics.median(switches[w]),
                    }
                    for w in WRITERS
                }
                results[kind]["bare_nvcsw_per_call"] = statistics.median(switches["bare"])
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=("callgrind", "http"), default="callgrind")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cg-inner", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--writer", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
    elif args.cg_inner:
        writer, kind, count, db = args.cg_inner
        asyncio.run(_cg_inner(writer, kind, int(count), Path(db)))
    elif args.serve:
        asyncio.run(_serve(args.writer, args.port, args.db))
    elif args.what == "callgrind":
        print(f"instructions per call ({args.calls} calls): event loop, other threads")
        print("JSON " + json.dumps(callgrind(args.calls)))
    else:
        print("JSON " + json.dumps(http(args.rounds, args.duration, args.connections)))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
