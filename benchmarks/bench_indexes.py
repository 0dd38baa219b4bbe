"""What each secondary index and the foreign key cost the SQLite writer, per call.

    python benchmarks/bench_indexes.py                   # every variant, JSON and SSE batches
    python benchmarks/bench_indexes.py --calls 2000 --reps 5 --schema 6
    python benchmarks/bench_indexes.py --callgrind     # instructions per call (deterministic)

The batches are the real ones: bench_app's session-aware handler runs in this process with the
store (SQLite, batched durability) and the benchmark's conversations (turns 1-4 of each), and
every `WriteBatch` the writer commits is kept. Each variant then replays those batches into a
fresh store at the given schema version, the index named dropped (or `PRAGMA foreign_keys=OFF`
for the foreign key, or the search documents left out), through the same statements the
writer runs (`SQLBackend.batch_steps`, one `BEGIN IMMEDIATE ... COMMIT` per batch); the figure
is the thread's CPU time per call (median of `--reps` replays), so other processes on the
machine do not count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import bench_app
import bench_callgrind
from aiohttp import web
from bench_workload import conversation_bodies

from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.backends.sqlite_thread import run_rows
from aiohttp_session_store.migrations import MIGRATIONS
from aiohttp_session_store.models import WriteBatch

__all__ = ("capture_batches", "measure", "replay", "secondary_indexes", "variants")


class _Capturing(SQLiteBackend):
    """The real backend, keeping every batch it commits."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.batches: list[WriteBatch] = []

    async def write_batch(self, batch: WriteBatch) -> None:
        self.batches.append(batch)
        await super().write_batch(batch)


async def _capture(kind: str, calls: int, db: Path) -> list[WriteBatch]:
    backend = _Capturing(str(db))
    app = bench_app.make_app(backend)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    bodies = conversation_bodies(stream=kind == "sse", conversations=max(1, calls // 4))
    try:
        await bench_callgrind.calls(
            (host, port), [bench_callgrind.request_bytes(b) for b in bodies]
        )
    finally:
        await runner.cleanup()
    return backend.batches


_ROOT: Final = Path(__file__).resolve().parent.parent


def capture_batches(kind: str, calls: int) -> list[WriteBatch]:
    """The batches the writer commits while the app serves `calls` calls of `kind`."""
    with tempfile.TemporaryDirectory(prefix="bench-indexes-") as tmp:
        return asyncio.run(_capture(kind, calls, Path(tmp) / "capture.db"))


def secondary_indexes(schema: int) -> list[str]:
    """The schema's own secondary indexes (not those SQLite makes for UNIQUE/PRIMARY KEY)."""
    with tempfile.TemporaryDirectory(prefix="bench-indexes-") as tmp:
        path = _store(Path(tmp) / "probe.db", schema)
        with contextlib.closing(sqlite3.connect(path)) as con:
            rows = con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                " ORDER BY tbl_name, name"
            ).fetchall()
    return [str(r[0]) for r in rows]


def _store(path: Path, schema: int) -> str:
    """A fresh store migrated to `schema` by the package itself."""

    async def make() -> None:
        backend = SQLiteBackend(path, migrations=MIGRATIONS[:schema])
        await backend.open()
        await backend.close()

    asyncio.run(make())
    return str(path)


def _write_now(backend: SQLiteBackend, con: sqlite3.Connection, batch: WriteBatch) -> None:
    """The writer's transaction (SQLiteBackend._write_now), on this thread."""
    con.execute("BEGIN IMMEDIATE")
    for kind, sql, rows in backend.batch_steps(batch):
        if kind == "rows":
            run_rows(con, sql, rows)
        elif kind == "many":
            con.executemany(sql, rows)
        else:
            con.execute(sql, rows[0])
    con.execute("COMMIT")


def replay(
    batches: list[WriteBatch], schema: int, *, drop: Sequence[str] = (), fk: bool = True,
    search: bool = True, work: Path, toggle: bool = False,
) -> int:  # fmt: skip
    """This thread's CPU nanoseconds to replay `batches` into a fresh store without `drop`
    (with `toggle`, callgrind's instrumentation is switched on around the replay only)."""
    path = _store(work / f"replay-{time.monotonic_ns()}.db", schema)
    migrations = MIGRATIONS[:schema]
    if not search:
        migrations = tuple(m for m in migrations if m.backfill != "search")
    backend = SQLiteBackend(path, migrations=migrations)  # never opened: builds the rows
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute(f"PRAGMA foreign_keys={'ON' if fk else 'OFF'}")
        for name in drop:
            con.execute(f"DROP INDEX {name}")
        if toggle:
            bench_callgrind.toggle(True)
        start = time.thread_time_ns()
        for batch in batches:
            _write_now(backend, con, batch)
        spent = time.thread_time_ns() - start
        if toggle:
            bench_callgrind.toggle(False)
    finally:
        con.close()
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)
    return spent


_ALL: Final = "ALL secondary indexes + FK"


def variants(schema: int) -> dict[str, dict[str, object]]:
    indexes = secondary_indexes(schema)
    out: dict[str, dict[str, object]] = {"full schema": {}}
    out.update({f"- {name}": {"drop": [name]} for name in indexes})
    out["- foreign key (PRAGMA off)"] = {"fk": False}
    out["- search documents"] = {"search": False}
    out[_ALL] = {"drop": indexes, "fk": False}
    return out


def _inner(spec: str) -> None:
    """Under callgrind: replay the pickled batches, instrumented around the replay only."""
    args = json.loads(spec)
    with open(args["batches"], "rb") as fh:
        batches: list[WriteBatch] = pickle.load(fh)
    replay(batches, args["schema"], work=Path(args["work"]), toggle=True, **args["variant"])


def _callgrind(batches_file: Path, schema: int, variant: dict[str, object], work: Path) -> float:
    spec = {"batches": str(batches_file), "schema": schema, "variant": variant, "work": str(work)}
    out = work / f"cg-{time.monotonic_ns()}"
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--inner", json.dumps(spec),
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, (str(_ROOT), os.environ.get("PYTHONPATH"))))
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": path})
    total = bench_callgrind._totals(out)
    out.unlink()
    return float(total)


def measure(
    kind: str, calls: int, reps: int, schema: int, *, callgrind: bool, only: str = ""
) -> dict[str, float]:
    """Per variant: CPU µs per call (median of `reps`), or instructions per call (callgrind)."""
    batches = capture_batches(kind, calls)
    n = sum(len(b.requests) for b in batches)
    chosen = {k: v for k, v in variants(schema).items() if k == "full schema" or only in k}
    samples: dict[str, list[float]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory(prefix="bench-indexes-") as tmp:
        work = Path(tmp)
        if callgrind:
            with (work / "batches.pickle").open("wb") as fh:
                pickle.dump(batches, fh)
            for name, variant in chosen.items():
                samples[name].append(_callgrind(work / "batches.pickle", schema, variant, work) / n)
        else:
            for _ in range(reps):  # variants interleaved, so drift hits all alike
                for name, variant in chosen.items():
                    spent = replay(batches, schema, work=work, **variant)  # type: ignore[arg-type]
                    samples[name].append(spent / 1000 / n)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--schema", type=int, default=len(MIGRATIONS), help="schema version")
    p.add_argument("--callgrind", action="store_true", help="instructions per call instead")
    p.add_argument("--only", default="", help="only the variants whose name contains this")
    p.add_argument("--inner", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        _inner(args.inner)
        return 0
    results = {
        k: measure(k, args.calls, args.reps, args.schema, callgrind=args.callgrind, only=args.only)
        for k in ("json", "sse")
    }
    unit = "instructions" if args.callgrind else "CPU µs"
    reps = "" if args.callgrind else f", median of {args.reps}"
    print(f"writer {unit} per call (schema {args.schema}, {args.calls} calls{reps}); vs full")
    for name in results["json"]:
        row = [f"{name:44}"]
        for kind in ("json", "sse"):
            v, full = results[kind][name], results[kind]["full schema"]
            row.append(f"{kind} {v:11,.1f} ({100 * (v - full) / full:+5.1f} %)")
        print("  ".join(row))
    print("JSON " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
