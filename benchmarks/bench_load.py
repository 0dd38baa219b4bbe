"""A small HTTP load generator on aiohttp, for machines without `wrk`; run in its own process.

    python benchmarks/bench_load.py --url http://127.0.0.1:8101 --bodies /tmp/bodies.jsonl \\
        --connections 32 --duration 10

Keeps `--connections` keep-alive connections busy for `--duration` seconds, each POSTing the
next body of the file and reading the whole reply, then prints one `LOAD_JSON {...}` line with
the same fields as the wrk script's: requests, duration, errors and latency percentiles.
Being Python, it costs the machine more CPU per request than wrk does, so on a small machine
it lowers every throughput figure; the store/bare ratios stay comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ("main", "run_load")

_HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-bench-0123456789abcdef0123456789abcdef",
}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[idx]


async def run_load(
    url: str, bodies: list[bytes], *, connections: int, duration: float, path: str
) -> dict[str, Any]:
    """Drive the server for `duration` seconds; the figures as a dict (microseconds)."""
    latencies: list[float] = []
    errors = 0
    received = 0
    # One shared rotation: consecutive requests carry consecutive bodies, as with wrk.
    rotation = itertools.cycle(bodies)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    started = time.perf_counter()
    deadline = started + duration
    async with aiohttp.ClientSession(
        base_url=url, connector=connector, timeout=timeout, headers=_HEADERS
    ) as session:

        async def worker() -> None:
            nonlocal errors, received
            while time.perf_counter() < deadline:
                body = next(rotation)
                t0 = time.perf_counter()
                try:
                    async with session.post(path, data=body) as resp:
                        data = await resp.read()
                        if resp.status != 200:
                            errors += 1
                            continue
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1e6)
                received += len(data)

        await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": round(elapsed * 1e6),
        "bytes": received,
        "errors_status": errors,
        "p50_us": _percentile(latencies, 50),
        "p90_us": _percentile(latencies, 90),
        "p99_us": _percentile(latencies, 99),
        "mean_us": sum(latencies) / len(latencies) if latencies else 0.0,
        "max_us": latencies[-1] if latencies else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", type=Path, required=True, help="one JSON body per line")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--path", default="/v1/chat/completions")
    args = parser.parse_args(argv)
    bodies = [line for line in args.bodies.read_bytes().splitlines() if line]
    result = asyncio.run(
        run_load(
            args.url,
            bodies,
            connections=args.connections,
            duration=args.duration,
            path=args.path,
        )
    )
    print("LOAD_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
