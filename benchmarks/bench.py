"""The store's overhead, measured: one command prints every figure of the performance targets.

    python benchmarks/bench.py                 # the full run (about 5 minutes on 2 cores)
    python benchmarks/bench.py --quick         # a short run: fewer, shorter rounds, 100k scale
    python benchmarks/bench.py --postgres postgresql://postgres@127.0.0.1:5432/test

Parts (each can be skipped): HTTP load on the same app bare and with `setup()` (throughput at
32 connections, latency at one), main-thread instructions added per call under callgrind
(bench_callgrind: deterministic, the figure to optimise on a shared machine), the example
proxy calling a fake upstream over HTTP bare and with the store (bench_proxy: the overhead a
real proxy sees), SessionManager micro-benchmarks, the writer's sustained rate, and scale
(1M sessions / 2M records; a 100k-session sweep with a loop-stall probe).
Ends with a table of figure, measured, target and PASS/MISS, and writes every raw number as
JSON (`--output`, /tmp by default). A benchmark, not a test: nothing fails on a MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import bench_callgrind
import bench_http
import bench_proxy
import bench_store
from bench_http import LoadResult, RoundsResult, Server
from bench_workload import conversation_bodies, write_bodies

from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.backends.sqlite import SQLiteBackend

HERE: Final = Path(__file__).resolve().parent
SQLITE: Final = "sqlite"
POSTGRES: Final = "postgresql"


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    target: float | None  # None: reported, no target
    higher_is_better: bool
    unit: str
    fmt: str = "{:.3f}"
    #: PostgreSQL's own target where it differs (a network round trip per awaited call).
    pg_target: float | None = None

    def goal(self, column: str) -> float | None:
        return self.pg_target if column == POSTGRES and self.pg_target is not None else self.target

    def text(self, value: float) -> str:
        return self.fmt.format(value) + (f" {self.unit}" if self.unit else "")

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        sign = ">=" if self.higher_is_better else "<="
        text = f"{sign} {self.fmt.format(self.target)}"
        if self.pg_target is not None:
            text += f" (pg {self.fmt.format(self.pg_target)})"
        return text + (f" {self.unit}" if self.unit else "")

    def verdict(self, value: float | None, column: str = SQLITE) -> str:
        if value is None:
            return "n/a"
        goal = self.goal(column)
        if goal is None:
            return "info"
        ok = value >= goal if self.higher_is_better else value <= goal
        return "PASS" if ok else "MISS"


TARGETS: Final = (
    Target("sse_ratio", "SSE throughput, store/bare (32 conns)", 0.75, True, "", pg_target=0.60),
    Target("json_ratio", "JSON throughput, store/bare (32 conns)", 0.70, True, "", pg_target=0.35),
    Target("sse_instr_pct", "main-thread instructions added, SSE call", 20, False, "%", "{:+.1f}"),
    Target(
        "json_instr_pct", "main-thread instructions added, JSON call", 35, False, "%", "{:+.1f}"
    ),
    Target("p50_json_ratio", "p50 latency 1 conn, JSON, store/bare", 1.10, False, ""),
    Target("p50_sse_ratio", "p50 latency 1 conn, SSE, store/bare", 1.10, False, ""),
    Target("get_session_us", "get_session median (cached)", 50, False, "us", "{:.1f}"),
    Target("update_parent_id_us", "update_parent_id median", 50, False, "us", "{:.1f}"),
    Target("writer_rps", "writer sustained", 50_000, True, "records/s", "{:,.0f}"),
    Target("scale_ratio", "get_session cold at 1M vs 1k sessions", 1.5, False, "x", "{:.2f}"),
    Target("sweep_stall_ms", "longest loop stall, 100k-session sweep", 20, False, "ms", "{:.1f}"),
    # Not a speed: records the writer dropped (queue full) while the HTTP rounds ran.
    Target("records_dropped", "records dropped under HTTP load", 0, False, "", "{:,.0f}"),
    # Reported beside the targets: what they depend on.
    Target("proxy_sse_ratio", "example proxy + upstream, SSE, store/bare", None, True, ""),
    Target("proxy_json_ratio", "example proxy + upstream, JSON, store/bare", None, True, ""),
    Target("sse_instr", "instructions added per SSE call", None, False, "", "{:,.0f}"),
    Target("json_instr", "instructions added per JSON call", None, False, "", "{:,.0f}"),
    Target(
        "sse_lineage_instr", "  of which lineage resolve+complete, SSE", None, False, "", "{:,.0f}"
    ),
    Target(
        "json_lineage_instr",
        "  of which lineage resolve+complete, JSON",
        None,
        False,
        "",
        "{:,.0f}",
    ),
    Target("get_session_cold_us", "get_session median (cache miss)", None, False, "us", "{:.1f}"),
    Target("create_session_us", "create_session median (new id)", None, False, "us", "{:.1f}"),
    Target("scale_cold_1m_us", "get_session cold median at 1M", None, False, "us", "{:.1f}"),
    Target("scale_cold_1k_us", "get_session cold median at 1k", None, False, "us", "{:.1f}"),
    Target("sweep_seconds", "100k-session sweep duration", None, False, "s", "{:.2f}"),
    Target("json_cpu_ratio", "server CPU per JSON request, store/bare", None, False, ""),
    Target("sse_cpu_ratio", "server CPU per SSE request, store/bare", None, False, ""),
    Target("p99_json_ratio", "p99 latency 1 conn, JSON, store/bare", None, False, ""),
    Target("p99_sse_ratio", "p99 latency 1 conn, SSE, store/bare", None, False, ""),
)


@dataclass
class Plan:
    rounds: int
    duration: float
    latency_rounds: int
    latency_duration: float
    warmup: float
    connections: int
    micro_calls: int
    micro_sessions: int
    writer_records: int
    writer_repeats: int
    scale_sessions: int
    scale_records: int
    scale_expired: int
    scale_probes: int
    callgrind_calls: int
    proxy_connections: int


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(
        rounds=args.rounds or (2 if quick else 5),
        duration=args.duration or (2.0 if quick else 5.0),
        latency_rounds=args.latency_rounds or (2 if quick else 3),
        latency_duration=args.latency_duration or (2.0 if quick else 3.0),
        warmup=1.0 if quick else 2.0,
        connections=args.connections,
        micro_calls=5_000 if quick else 20_000,
        micro_sessions=1_000,
        writer_records=60_000 if quick else 200_000,
        writer_repeats=1 if quick else 3,
        scale_sessions=args.scale_sessions or (100_000 if quick else 1_000_000),
        scale_records=args.scale_records or (200_000 if quick else 2_000_000),
        scale_expired=args.scale_expired or (10_000 if quick else 100_000),
        scale_probes=1_000,
        callgrind_calls=100 if quick else 200,
        proxy_connections=16,
    )


# -- HTTP ------------------------------------------------------------------------------------


def _ratio_rps(store: LoadResult, bare: LoadResult) -> float:
    return store.rps / bare.rps if bare.rps else float("nan")


def _ratio_p50(store: LoadResult, bare: LoadResult) -> float:
    return store.p50_us / bare.p50_us if bare.p50_us else float("nan")


def _ratio_p99(store: LoadResult, bare: LoadResult) -> float:
    return store.p99_us / bare.p99_us if bare.p99_us else float("nan")


def _cpu_ratio(rounds: RoundsResult, store: str) -> float | None:
    try:
        return rounds.median(store, "cpu_us_per_request") / rounds.median(
            "bare", "cpu_us_per_request"
        )
    except statistics.StatisticsError:
        return None


def _sqlite_counts(path: Path) -> tuple[int, int]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        requests = con.execute("SELECT count(*) FROM requests").fetchone()[0]
        responses = con.execute("SELECT count(*) FROM responses").fetchone()[0]
    finally:
        con.close()
    return int(requests), int(responses)


async def _pg_counts(url: str, schema: str) -> tuple[int, int]:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        requests = await conn.fetchval("SELECT count(*) FROM requests")
        responses = await conn.fetchval("SELECT count(*) FROM responses")
    finally:
        await conn.close()
    return int(requests), int(responses)


def http_part(
    args: argparse.Namespace,
    plan: Plan,
    work: Path,
    pg_schemas: list[str],
    figures: dict[str, dict[str, float | None]],
    raw: dict[str, Any],
) -> None:
    loader = bench_http.choose_loader(args.loader)
    say(f"== HTTP: load from a separate process ({loader}), servers in their own processes")
    if loader == "aiohttp":
        say("   wrk not found: the aiohttp load generator is used (install wrk for less noise)")
    json_bodies = write_bodies(work / "bodies-json.jsonl", conversation_bodies(stream=False))
    sse_bodies = write_bodies(work / "bodies-sse.jsonl", conversation_bodies(stream=True))
    db = work / "http-store.db"
    bare = Server("bare", ["--mode", "bare"], bench_http.free_port(), work / "bare.log")
    stores = [
        Server(
            SQLITE,
            ["--mode", "store", "--db", str(db)],
            bench_http.free_port(),
            work / "store-sqlite.log",
        )
    ]
    pg_schema = None
    if args.postgres:
        pg_schema = f"bench_http_{uuid.uuid4().hex[:12]}"
        pg_schemas.append(pg_schema)
        stores.append(
            Server(
                POSTGRES,
                ["--mode", "store", "--postgres", args.postgres, "--schema", pg_schema],
                bench_http.free_port(),
                work / "store-postgresql.log",
            )
        )
    with bench_http.servers([bare, *stores]):
        phases: list[tuple[str, str, Path, int, float, int]] = [
            ("json", "json", json_bodies, plan.connections, plan.duration, plan.rounds),
            ("sse", "sse", sse_bodies, plan.connections, plan.duration, plan.rounds),
            ("json", "latency_json", json_bodies, 1, plan.latency_duration, plan.latency_rounds),
            ("sse", "latency_sse", sse_bodies, 1, plan.latency_duration, plan.latency_rounds),
        ]
        for endpoint, key, bodies, conns, duration, rounds in phases:
            for server in (bare, *stores):  # warm-up: imports, caches, first sessions
                bench_http.run_load(loader, server, bodies, connections=conns, duration=plan.warmup)
            is_latency = key.startswith("latency")
            result = bench_http.alternate_rounds(
                loader,
                bare,
                stores,
                bodies,
                endpoint=endpoint,
                connections=conns,
                duration=duration,
                rounds=rounds,
                ratio=_ratio_p50 if is_latency else _ratio_rps,
                say=say,
            )
            raw[key] = result.to_json()
            for store in stores:
                col = figures.setdefault(store.name, {})
                if is_latency:
                    col[f"p50_{endpoint}_ratio"] = result.median_ratio(store.name)
                    col[f"p99_{endpoint}_ratio"] = statistics.median(
                        _ratio_p99(s, b)
                        for s, b in zip(result.runs[store.name], result.runs["bare"], strict=True)
                    )
                    say(
                        f"   {endpoint} latency at 1 connection, median of {rounds} rounds:"
                        f" bare p50 {result.median('bare', 'p50_us') / 1000:.2f} ms"
                        f" p99 {result.median('bare', 'p99_us') / 1000:.2f} ms;"
                        f" {store.name} p50 {result.median(store.name, 'p50_us') / 1000:.2f} ms"
                        f" p99 {result.median(store.name, 'p99_us') / 1000:.2f} ms"
                    )
                    say(
                        f"   => p50 latency {endpoint}, {store.name}/bare, median of per-round"
                        f" ratios: {col[f'p50_{endpoint}_ratio']:.3f}"
                    )
                else:
                    col[f"{endpoint}_ratio"] = result.median_ratio(store.name)
                    col[f"{endpoint}_cpu_ratio"] = _cpu_ratio(result, store.name)
                    say(
                        f"   {endpoint} at {conns} connections, median of {rounds} rounds:"
                        f" bare {result.median('bare', 'rps'):.0f} req/s,"
                        f" {store.name} {result.median(store.name, 'rps'):.0f} req/s"
                    )
                    say(
                        f"   => {endpoint} throughput, {store.name}/bare, median of per-round"
                        f" ratios: {col[f'{endpoint}_ratio']:.3f}"
                    )
    # Servers stopped: every record committed. Check nothing was lost on the way.
    for store in stores:
        stats = store.stats
        if store.name == SQLITE:
            rows = _sqlite_counts(db)
        else:
            assert pg_schema is not None
            rows = asyncio.run(_pg_counts(args.postgres, pg_schema))
        served = stats.get("served")
        dropped = stats.get("records_dropped")
        raw.setdefault("recorded", {})[store.name] = {
            **stats,
            "request_rows": rows[0],
            "response_rows": rows[1],
        }
        ok = rows[0] == rows[1] and rows[0] >= (served or 0) and not dropped
        figures.setdefault(store.name, {})["records_dropped"] = float(
            max(dropped or 0, (served or 0) - rows[0])
        )
        say(
            f"   {store.name} store: {served} calls served; {rows[0]} request rows,"
            f" {rows[1]} response rows; {dropped} records dropped"
            + ("" if ok else "  <-- WARNING: records missing")
        )


def callgrind_part(
    args: argparse.Namespace,
    plan: Plan,
    work: Path,
    figures: dict[str, dict[str, float | None]],
    raw: dict[str, Any],
) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        say("== Instructions per call: valgrind not found, skipped")
        return
    say(
        f"== Instructions per call under callgrind ({plan.callgrind_calls} calls per mode,"
        " SQLite; bare, store, store without lineage)"
    )
    results = bench_callgrind.measure(plan.callgrind_calls, work / "callgrind")
    raw["callgrind"] = results
    for line in bench_callgrind.report(results, plan.callgrind_calls):
        say("   " + line)
    col = figures.setdefault(SQLITE, {})
    for kind in ("sse", "json"):
        col[f"{kind}_instr_pct"] = results[kind]["added_pct"]
        col[f"{kind}_instr"] = results[kind]["added"]
        col[f"{kind}_lineage_instr"] = results[kind]["lineage"]


def proxy_part(
    args: argparse.Namespace,
    plan: Plan,
    work: Path,
    figures: dict[str, dict[str, float | None]],
    raw: dict[str, Any],
) -> None:
    say(
        "== The example proxy (stateful mode) calling the fake upstream over HTTP, bare and"
        f" with the store (SQLite), {plan.proxy_connections} conversations at a time"
    )
    results = bench_proxy.measure(
        rounds=plan.rounds,
        duration=plan.duration,
        connections=plan.proxy_connections,
        turns=4,
        work=work,
        say=say,
    )
    raw["proxy"] = results
    col = figures.setdefault(SQLITE, {})
    for kind in ("sse", "json"):
        col[f"proxy_{kind}_ratio"] = results[kind]["ratio"]


# -- the store: micro, writer, scale ---------------------------------------------------------


def _sqlite_factory(path: Path) -> Callable[[], Backend]:
    return lambda: SQLiteBackend(path)


def _pg_factory(url: str, schema: str) -> Callable[[], Backend]:
    from aiohttp_session_store.backends.postgres import PostgresBackend

    return lambda: PostgresBackend(url, schema=schema)


def _backends(
    args: argparse.Namespace, work: Path, pg_schemas: list[str], tag: str
) -> list[tuple[str, Callable[[], Backend]]]:
    out: list[tuple[str, Callable[[], Backend]]] = [(SQLITE, _sqlite_factory(work / f"{tag}.db"))]
    if args.postgres:
        schema = f"bench_{tag}_{uuid.uuid4().hex[:12]}"
        pg_schemas.append(schema)
        out.append((POSTGRES, _pg_factory(args.postgres, schema)))
    return out


def micro_part(
    args: argparse.Namespace,
    plan: Plan,
    work: Path,
    pg_schemas: list[str],
    figures: dict[str, dict[str, float | None]],
    raw: dict[str, Any],
) -> None:
    say("== SessionManager micro-benchmarks (awaited calls, median per op)")
    for name, factory in _backends(args, work, pg_schemas, "micro"):
        result = asyncio.run(
            bench_store.micro(factory, sessions=plan.micro_sessions, calls=plan.micro_calls)
        )
        raw.setdefault("micro", {})[name] = result
        col = figures.setdefault(name, {})
        col["get_session_us"] = result["get_session"]["median_us"]
        col["update_parent_id_us"] = result["update_parent_id"]["median_us"]
        col["create_session_us"] = result["create_session"]["median_us"]
        col["get_session_cold_us"] = result["get_session_cold"]["median_us"]
        for op in ("get_session", "update_parent_id", "create_session", "get_session_cold"):
            r = result[op]
            say(
                f"   {name:10s} {op:17s} median {r['median_us']:8.1f} us"
                f"  p99 {r['p99_us']:8.1f} us  ({r['calls']} calls)"
            )


def writer_part(
    args: argparse.Namespace,
    plan: Plan,
    work: Path,
    pg_schemas: list[str],
    figures: dict[str, dict[str, float | None]],
    raw: dict[str, Any],
) -> None:
    say(
        f"== Writer: {plan.writer_records:,} records (request + response rows) handed over"
        f" as fast as it takes them, median of {plan.writer_repeats}"
    )
    for name, _ in _backends(args, work, [], "writer"):
        rates = []
        for rep in range(plan.writer_repeats):
            if name == SQLITE:
                backend: Backend = SQLiteBackend(work / f"writer-{rep}.db")
            else:
                schema = f"bench_writer_{uuid.uuid4().hex[:12]}"
                pg_schemas.append(schema)
                backend = _pg_factory(args.postgres, schema)()
            result = asyncio.run(bench_store.writer_sustained(backend, records=plan.writer_records))
            raw.setdefault("writer", {}).setdefault(name, []).append(result)
            rates.append(result["records_per_second"])
            say(
                f"   {name:10s} run {rep + 1}: {result['records_per_second']:10,.0f} records/s"
                f" ({result['records']:,} in {result['seconds']:.2f} s,"
                f" {result['batches']} batches)"
            )
        figures.setdefault(name, {})["writer_rps"] = statistics.median(rates)


def scale_part(
    args: argparse.Namespace,
    plan: Plan,
    work: Path,
    pg_schemas: list[str],
    figures: dict[str, dict[str, float | None]],
    raw: dict[str, Any],
) -> None:
    big = bench_store.ScaleShape(plan.scale_sessions, plan.scale_records, plan.scale_expired)
    small = bench_store.ScaleShape(1_000, 2_000, 0)
    say(
        f"== Scale: {big.sessions:,} sessions ({big.expired:,} expired) and {big.records:,}"
        f" records, versus {small.sessions:,} sessions"
    )
    targets: list[tuple[str, Callable[[], Backend], Callable[[], Backend]]] = []
    t = bench_store.build_sqlite_store(work / "scale-big.db", big)
    size = (work / "scale-big.db").stat().st_size / 1e6
    say(f"   sqlite     built in {t:.1f} s ({size:,.0f} MB)")
    bench_store.build_sqlite_store(work / "scale-small.db", small)
    raw.setdefault("scale", {})[SQLITE] = {"build_seconds": t, "file_mb": size}
    targets.append(
        (SQLITE, _sqlite_factory(work / "scale-big.db"), _sqlite_factory(work / "scale-small.db"))
    )
    if args.postgres:
        big_schema = f"bench_scale_{uuid.uuid4().hex[:12]}"
        small_schema = f"bench_scale_{uuid.uuid4().hex[:12]}"
        pg_schemas.extend((big_schema, small_schema))
        t = asyncio.run(bench_store.build_postgres_store(args.postgres, big_schema, big))
        asyncio.run(bench_store.build_postgres_store(args.postgres, small_schema, small))
        say(f"   postgresql built in {t:.1f} s")
        raw["scale"][POSTGRES] = {"build_seconds": t}
        targets.append(
            (
                POSTGRES,
                _pg_factory(args.postgres, big_schema),
                _pg_factory(args.postgres, small_schema),
            )
        )
    for name, big_factory, small_factory in targets:
        col = figures.setdefault(name, {})
        probes = plan.scale_probes
        cold_big = asyncio.run(bench_store.cold_get_session(big_factory, big.live_ids(probes)))
        cold_small = asyncio.run(
            bench_store.cold_get_session(small_factory, small.live_ids(probes))
        )
        col["scale_cold_1m_us"] = cold_big["median_us"]
        col["scale_cold_1k_us"] = cold_small["median_us"]
        col["scale_ratio"] = cold_big["median_us"] / cold_small["median_us"]
        say(
            f"   {name:10s} get_session cold median: {cold_big['median_us']:.1f} us at"
            f" {big.sessions:,}, {cold_small['median_us']:.1f} us at {small.sessions:,}"
            f" => {col['scale_ratio']:.2f}x"
        )
        sweep = asyncio.run(bench_store.stall_during_sweep(big_factory, expect=big.expired))
        col["sweep_stall_ms"] = sweep["max_stall_ms"]
        col["sweep_seconds"] = sweep["seconds"]
        say(
            f"   {name:10s} sweep: {sweep['deleted']:,} expired sessions deleted in"
            f" {sweep['seconds']:.2f} s; longest loop stall {sweep['max_stall_ms']:.1f} ms"
            f" (p99 {sweep['p99_stall_ms']:.2f} ms, idle baseline"
            f" {sweep['baseline_max_stall_ms']:.2f} ms)"
        )
        raw["scale"][name].update(cold_big=cold_big, cold_small=cold_small, sweep=sweep)


async def _drop_schemas(url: str, schemas: Sequence[str]) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await asyncpg.connect(url)
    try:
        for schema in schemas:
            # Names are generated here (bench_<tag>_<hex>), never taken from input.
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# -- report ----------------------------------------------------------------------------------


def table(figures: dict[str, dict[str, float | None]]) -> list[str]:
    columns = [c for c in (SQLITE, POSTGRES) if c in figures]
    head = f"{'figure':44s} {'target':>16s}"
    for c in columns:
        head += f" {c:>18s} {'':4s}"
    lines = [head, "-" * len(head)]
    for t in TARGETS:
        values = [figures[c].get(t.key) for c in columns]
        if all(v is None for v in values):
            continue
        row = f"{t.label:44s} {t.target_text():>16s}"
        for c, v in zip(columns, values, strict=True):
            row += f" {t.text(v) if v is not None else '-':>18s} {t.verdict(v, c):4s}"
        lines.append(row)
    return lines


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "loadavg": load,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "aiohttp": aiohttp.__version__,
        "wrk": shutil.which("wrk") is not None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p.add_argument("--rounds", type=int, help="throughput rounds (default 5; quick 2)")
    p.add_argument("--duration", type=float, help="seconds per throughput run (default 5)")
    p.add_argument("--latency-rounds", type=int, help="latency rounds (default 3)")
    p.add_argument("--latency-duration", type=float, help="seconds per latency run (default 3)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--loader", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--postgres", metavar="URL", help="also measure PostgreSQL (fresh schemas)")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--skip-callgrind", action="store_true")
    p.add_argument("--skip-proxy", action="store_true")
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--skip-writer", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--scale-sessions", type=int)
    p.add_argument("--scale-records", type=int)
    p.add_argument("--scale-expired", type=int)
    p.add_argument("--workdir", type=Path, help="where databases go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--output",
        type=Path,
        default=Path(tempfile.gettempdir()) / "aiohttp_session_store_bench.json",
        help="JSON results file (default: %(default)s)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    info = machine()
    say(
        f"aiohttp_session_store benchmark: {info['cpus']} CPUs, load average"
        f" {info['loadavg'][0]:.2f}, Python {info['python']}, aiohttp {info['aiohttp']},"
        f" SQLite {info['sqlite']}"
    )
    say(
        "The server, its SQLite thread and the load generator share these CPUs: figures are"
        " ratios measured in the same run, not absolute capacity."
    )
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="aiohttp_session_store_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, float | None]] = {SQLITE: {}}
    if args.postgres:
        figures[POSTGRES] = {}
    raw: dict[str, Any] = {"machine": info, "plan": plan.__dict__, "argv": sys.argv[1:]}
    pg_schemas: list[str] = []
    try:
        if not args.skip_http:
            http_part(args, plan, work, pg_schemas, figures, raw)
        if not args.skip_callgrind:
            (work / "callgrind").mkdir(exist_ok=True)
            callgrind_part(args, plan, work, figures, raw)
        if not args.skip_proxy:
            proxy_part(args, plan, work, figures, raw)
        if not args.skip_micro:
            micro_part(args, plan, work, pg_schemas, figures, raw)
        if not args.skip_writer:
            writer_part(args, plan, work, pg_schemas, figures, raw)
        if not args.skip_scale:
            scale_part(args, plan, work, pg_schemas, figures, raw)
    finally:
        if args.postgres and pg_schemas:
            asyncio.run(_drop_schemas(args.postgres, pg_schemas))
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    raw["figures"] = figures
    raw["seconds"] = elapsed
    args.output.write_text(json.dumps(raw, indent=2, default=str))
    say()
    say(f"== Results ({elapsed:.0f} s; raw numbers in {args.output})")
    for line in table(figures):
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
