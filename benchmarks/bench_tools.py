"""The operator's tools on a big generated store: search p50, export and stats wall time.

    python benchmarks/bench_tools.py                       # 200k calls in a temporary SQLite file
    python benchmarks/bench_tools.py --calls 1000000 --keep /tmp/big.db
    python benchmarks/bench_tools.py --db /tmp/big.db      # reuse a store made with --keep
    python benchmarks/bench_tools.py --pg postgresql://127.0.0.1/test --calls 100000

Run it from the repository root with `PYTHONPATH=.`, or Python imports whichever copy
of the package is installed rather than the checkout's. A reused store of an older schema
is migrated when opened (`open_s`); `stats_s` lists three consecutive reports.

The store is generated at the latest schema with bulk statements (as the writer would
leave it: one request, one response and one search document per call, 2 calls per
session), so generation is quick and the figures measure only the tools:

- search: the p50 and p95 of `backend.search` over words of every frequency (common, rare,
  absent), phrases and a session filter, limit 20;
- export: `export --format exchanges -o FILE` of every call, through the CLI;
- stats: `backend.response_stats` over every response (what `stats` runs).

Targets (issue 15): search p50 under 50 ms on 1M records, export of 300k requests under
60 s, stats over 1M responses under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from aiohttp_session_store.backends import backend_from_url
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.backends.searchtext import prompt_text, reply_text
from aiohttp_session_store.cli import main as cli_main
from aiohttp_session_store.models import RequestQuery

T0: Final = 1_760_000_000_000
WORDS: Final = [f"w{i}" for i in range(5000)]  # a Zipf-ish vocabulary: w0 is everywhere
TOPICS: Final = ["refund", "invoice", "password", "shipping", "upgrade", "haiku", "python"]
QUERIES: Final = [
    "refund",
    "invoice delayed",
    '"reset my password"',
    "w0",
    "w1 w2",
    "w4999",
    "w3000 w10",
    "zebra",
    "shipping w7",
    "timeout",
]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(WORDS[min(int(rng.paretovariate(1.1)) - 1, 4999)] for _ in range(n))


def _calls(n: int, seed: int = 1) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...], str]]:
    """(request row, response row, session id) per call, oldest first."""
    rng = random.Random(seed)
    for i in range(n):
        sid = f"{(i // 2) * 2654435761 % 2**64:016x}{i // 2:016x}"
        ts = T0 + i * 50
        topic = TOPICS[i % len(TOPICS)]
        user = f"Hello, {topic} question: {_words(rng, 12)}"
        if i % 97 == 0:
            user += " please reset my password"
        body = json.dumps(
            {
                "model": f"model-{i % 3}",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": user},
                ],
            }
        )
        failed = i % 50 == 0
        reply = None if failed else f"About your {topic}: {_words(rng, 30)}"
        response = (
            None
            if failed
            else json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
        )
        request = (
            f"req-{i:012d}",
            sid,
            ts,
            "POST",
            "/v1/chat/completions",
            f"model-{i % 3}",
            i % 2,
            body,
            None,
            "{}",
            ts,
        )
        resp = (
            f"resp-{i:012d}",
            f"req-{i:012d}",
            sid,
            ts + 900,
            502 if failed else 200,
            "upstream_error" if failed else "completed",
            response,
            None,
            None,
            None if failed else 40 + i % 17,
            None if failed else 100 + i % 101,
            None if failed else 140 + i % 17 + i % 101,
            None if failed else "stop",
            "upstream timeout" if failed else None,
            300 + (i * 7919) % 4000,
            None if failed else 50 + (i * 104729) % 700,
            ts + 900,
        )
        yield request, resp, sid


_INSERTS: tuple[str, str, str, str, str] = ("", "", "", "", "")


async def _write_chunk(
    d: Any, sess: list[Any], reqs: list[Any], resps: list[Any], texts: list[Any], conn: Any
) -> None:
    ins_sess, ins_req, ins_resp, docs, set_models = _INSERTS
    await conn.insert_rows(ins_sess, sess)
    await conn.insert_rows(ins_req, reqs)
    await conn.insert_rows(ins_resp, resps)
    # As the writer does: each response carries its request's model (what stats group by).
    await conn.execute(set_models, (d.list_param([r[0] for r in resps]),))
    # The documents are keyed by the requests' own ids, read back in one range query.
    rows = await conn.fetch(
        f"SELECT request_id, id FROM requests WHERE request_id >= {d.placeholder(1)}"
        f" AND request_id <= {d.placeholder(2)}",
        (reqs[0][0], reqs[-1][0]),
    )
    ids = {str(r[0]): int(r[1]) for r in rows}
    await conn.insert_rows(docs, [(ids[rid], p, r) for rid, p, r in texts])


async def generate(backend: Backend, n: int) -> None:
    """Bulk rows through the backend's own connection, one transaction per chunk."""
    from aiohttp_session_store.backends.codecs import REQUESTS, RESPONSES
    from aiohttp_session_store.backends.reads import search_docs_for
    from aiohttp_session_store.backends.sql import SQLBackend

    assert isinstance(backend, SQLBackend)
    d = backend.dialect
    global _INSERTS
    ins_req = f"INSERT INTO requests ({REQUESTS.names}) VALUES ({d.values(len(REQUESTS.columns))})"
    ins_resp = (
        f"INSERT INTO responses ({RESPONSES.names}) VALUES ({d.values(len(RESPONSES.columns))})"
    )
    ins_sess = (
        "INSERT INTO sessions (id, chat_id, parent_id, first_user_message, message_count,"
        f" created_at, last_accessed, expires_at) VALUES ({d.values(8)})"
    )
    _INSERTS = (
        ins_sess,
        ins_req,
        ins_resp,
        search_docs_for(d).backfill_insert,
        backend._q.set_response_models,
    )
    chunk = 20_000
    calls = _calls(n)
    done = 0
    while done < n:
        reqs, resps, sess, texts = [], [], [], []
        for request, resp, sid in (next(calls) for _ in range(min(chunk, n - done))):
            reqs.append(request)
            resps.append(resp)
            if request[0].endswith(("0", "2", "4", "6", "8")):
                sess.append((sid, None, None, "hello", 0, request[2], request[2], request[2] + 1))
            texts.append((request[0], prompt_text(request[7]), reply_text(resp[6], resp[13])))

        await backend._run(
            functools.partial(_write_chunk, d, sess, reqs, resps, texts),
            write=True,
            retry=False,
        )
        done += len(reqs)
        print(f"  generated {done}/{n}", file=sys.stderr, end="\r")
    print(file=sys.stderr)


async def bench_search(backend: Backend, rounds: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {q: [] for q in QUERIES}
    session = next(iter(await backend.find_id_prefix("session", "0")), None)
    for _ in range(rounds):
        for q in QUERIES:
            start = time.perf_counter()
            await backend.search(q, limit=20)
            times[q].append(time.perf_counter() - start)
    if session is not None:
        times["w0 (one session)"] = []
        for _ in range(rounds):
            start = time.perf_counter()
            await backend.search("w0", limit=20, session_id=session)
            times["w0 (one session)"].append(time.perf_counter() - start)
    every = sorted(t for ts in times.values() for t in ts)
    return {
        "p50_ms": round(statistics.median(every) * 1000, 2),
        "p95_ms": round(every[int(len(every) * 0.95)] * 1000, 2),
        "per_query_p50_ms": {q: round(statistics.median(t) * 1000, 2) for q, t in times.items()},
    }


async def bench_stats(backend: Backend, runs: int = 3) -> list[float]:
    """Wall seconds of each of `runs` full reports (the first is what one `stats` costs)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        stats = await backend.response_stats(RequestQuery())
        times.append(round(time.perf_counter() - start, 3))
    print(f"  stats: {stats.overall.requests} responses", file=sys.stderr)
    return times


def bench_export(db: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export.jsonl"
        start = time.perf_counter()
        code = cli_main(["--db", db, "export", "-o", str(out)])
        elapsed = time.perf_counter() - start
        assert code == 0
        with out.open() as f:
            lines = sum(1 for _ in f)
        assert lines == n, (lines, n)
    return elapsed


async def run(db: str, calls: int, fresh: bool, rounds: int) -> dict[str, Any]:
    backend = backend_from_url(db)
    start = time.perf_counter()
    await backend.open()  # a reused store of an older schema is migrated here
    open_s = round(time.perf_counter() - start, 1)
    try:
        if fresh:
            start = time.perf_counter()
            await generate(backend, calls)
            print(f"  generation took {time.perf_counter() - start:.1f} s", file=sys.stderr)
        n = await backend.count_requests(RequestQuery())
        search = await bench_search(backend, rounds)
        stats_s = await bench_stats(backend)
    finally:
        await backend.close()
    return {
        "backend": backend.name,
        "calls": n,
        "open_s": open_s,
        "search": search,
        "stats_s": stats_s,
    }


async def run_pg(dsn: str, calls: int, rounds: int) -> dict[str, Any]:
    """The same in a fresh PostgreSQL schema, dropped afterwards (export is SQLite's here)."""
    from aiohttp_session_store.backends.postgres import PostgresBackend

    schema = f"bench_{os.getpid()}"
    backend = PostgresBackend(dsn, schema=schema)
    await backend.open()
    try:
        start = time.perf_counter()
        await generate(backend, calls)
        print(f"  generation took {time.perf_counter() - start:.1f} s", file=sys.stderr)
        await backend._run(lambda c: c.execute("ANALYZE"), write=True, retry=False)
        search = await bench_search(backend, rounds)
        stats_s = await bench_stats(backend)
    finally:
        await backend._run(
            lambda c: c.execute(f'DROP SCHEMA "{schema}" CASCADE'), write=True, retry=False
        )
        await backend.close()
    return {"backend": backend.name, "calls": calls, "search": search, "stats_s": stats_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--db", help="an existing generated SQLite store to reuse")
    parser.add_argument("--keep", help="generate into this SQLite path and keep it")
    parser.add_argument("--pg", help="generate into a fresh schema of this PostgreSQL DSN")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.pg:
            print(json.dumps(asyncio.run(run_pg(args.pg, args.calls, args.rounds)), indent=2))
            return
        if args.db:
            db, fresh = args.db, False
        else:
            db, fresh = args.keep or str(Path(tmp) / "big.db"), True
            if os.path.exists(db):
                sys.exit(f"{db} exists; pass it as --db to reuse it")
        result = asyncio.run(run(db, args.calls, fresh, args.rounds))
        if not args.no_export:
            result["export_s"] = round(bench_export(db, result["calls"]), 1)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
