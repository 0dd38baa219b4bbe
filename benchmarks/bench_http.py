"""HTTP part of the benchmark: the app bare and with the store, each in its own process, under load.

Servers are `bench_app.py` subprocesses on loopback ports; load comes from another process
(`wrk` when installed, else `bench_load.py`). Rounds alternate bare/store (the order flips every
round, so drift on a shared machine hits both sides alike) and each round yields one
store/bare ratio; the figure is the median of those ratios. Each round also reads the server's
CPU time from /proc, giving CPU microseconds per request: steadier than throughput when other
processes share the cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = (
    "LoadResult",
    "Server",
    "alternate_rounds",
    "choose_loader",
    "run_load",
    "servers",
)

HERE: Final = Path(__file__).resolve().parent
_READY_TIMEOUT: Final = 20.0
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class LoadResult:
    """One load run against one server."""

    requests: int
    seconds: float
    errors: int
    p50_us: float
    p99_us: float
    cpu_seconds: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_seconds is None or not self.requests:
            return None
        return self.cpu_seconds * 1e6 / self.requests


@dataclass
class Server:
    """A `bench_app.py` process: started, waited for, stopped with SIGTERM."""

    name: str
    args: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        cmd = [sys.executable, str(HERE / "bench_app.py"), "--port", str(self.port), *self.args]
        env = {**os.environ, **self.env}
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=HERE.parent
            )
        assert self.proc.stdout is not None
        # The server prints READY once it listens; a server that dies or hangs is reported.
        ready, _, _ = select.select([self.proc.stdout], [], [], _READY_TIMEOUT)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if line != "READY":
            self.stop()
            raise RuntimeError(f"{self.name} server did not start: {line!r}; see {self.log}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the whole process (every thread), from /proc."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # Fields 14 and 15 (utime, stime) of proc(5); index 11/12 after the command name.
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def stop(self) -> dict[str, Any]:
        proc = self.proc
        if proc is None:
            return self.stats
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("STATS "):
                self.stats = json.loads(line[len("STATS ") :])
        self.proc = None
        return self.stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def servers(specs: Sequence[Server]) -> Iterator[Sequence[Server]]:
    """Start every server, yield them, stop them all (also on error or Ctrl-C)."""
    started: list[Server] = []
    try:
        for spec in specs:
            spec.start()
            started.append(spec)
        yield specs
    finally:
        for spec in started:
            spec.stop()


def choose_loader(preference: str) -> str:
    """'wrk' when asked for or found on PATH (with 'auto'), else 'aiohttp'."""
    if preference == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("--loader wrk: wrk is not installed (Debian: apt-get install wrk)")
    if preference == "auto":
        return "wrk" if shutil.which("wrk") else "aiohttp"
    return preference


def _parse(prefix: str, output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith(prefix):
            parsed: dict[str, Any] = json.loads(line[len(prefix) :])
            return parsed
    raise RuntimeError(f"load generator printed no {prefix.strip()} line:\n{output[-2000:]}")


def run_load(
    loader: str,
    server: Server,
    bodies: Path,
    *,
    connections: int,
    duration: float,
) -> LoadResult:
    """One load run from a separate process; the server's CPU time is read around it."""
    if loader == "wrk":
        cmd = [
            "wrk",
            "-t1",
            f"-c{connections}",
            # wrk takes whole seconds only.
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(HERE / "chat.lua"),
            server.url,
            "--",
            str(bodies),
        ]
        prefix = "WRK_JSON "
    else:
        cmd = [
            sys.executable,
            str(HERE / "bench_load.py"),
            "--url",
            server.url,
            "--bodies",
            str(bodies),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ]
        prefix = "LOAD_JSON "
    cpu_before = server.cpu_seconds()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=False)
    cpu_after = server.cpu_seconds()
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    data = _parse(prefix, done.stdout)
    errors = sum(int(v) for k, v in data.items() if k.startswith("errors_"))
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return LoadResult(
        requests=int(data["requests"]),
        seconds=float(data["duration_us"]) / 1e6,
        errors=errors,
        p50_us=float(data["p50_us"]),
        p99_us=float(data["p99_us"]),
        cpu_seconds=cpu,
    )


@dataclass
class RoundsResult:
    """Alternating rounds of one endpoint at one concurrency: every run, and the medians."""

    endpoint: str
    connections: int
    runs: dict[str, list[LoadResult]]
    ratios: dict[str, list[float]]

    def median_ratio(self, key: str) -> float:
        return statistics.median(self.ratios[key])

    def median(self, name: str, attr: str) -> float:
        values: list[float] = [getattr(r, attr) for r in self.runs[name]]
        return statistics.median(v for v in values if v is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "connections": self.connections,
            "ratios": self.ratios,
            "runs": {
                name: [
                    {
                        "requests": r.requests,
                        "seconds": r.seconds,
                        "rps": r.rps,
                        "errors": r.errors,
                        "p50_us": r.p50_us,
                        "p99_us": r.p99_us,
                        "cpu_us_per_request": r.cpu_us_per_request,
                    }
                    for r in runs
                ]
                for name, runs in self.runs.items()
            },
        }


def alternate_rounds(
    loader: str,
    bare: Server,
    stores: Sequence[Server],
    bodies: Path,
    *,
    endpoint: str,
    connections: int,
    duration: float,
    rounds: int,
    ratio: Callable[[LoadResult, LoadResult], float],
    say: Callable[[str], None],
) -> RoundsResult:
    """`rounds` rounds, each running bare and every store once; per-round store/bare ratios."""
    runs: dict[str, list[LoadResult]] = {s.name: [] for s in (bare, *stores)}
    ratios: dict[str, list[float]] = {s.name: [] for s in stores}
    for r in range(rounds):
        order = [bare, *stores]
        if r % 2:
            order.reverse()
        got: dict[str, LoadResult] = {}
        for server in order:
            got[server.name] = run_load(
                loader, server, bodies, connections=connections, duration=duration
            )
            runs[server.name].append(got[server.name])
        parts = []
        for server in (bare, *stores):
            res = got[server.name]
            cpu = res.cpu_us_per_request
            parts.append(
                f"{server.name} {res.rps:8.0f} req/s p50 {res.p50_us / 1000:6.2f} ms"
                f" p99 {res.p99_us / 1000:6.2f} ms"
                + (f" cpu {cpu:6.0f} us/req" if cpu is not None else "")
                + (f" ERRORS {res.errors}" if res.errors else "")
            )
        for store in stores:
            ratios[store.name].append(ratio(got[store.name], got[bare.name]))
        ratio_text = "  ".join(f"{s.name}/bare {ratios[s.name][-1]:.3f}" for s in stores)
        say(f"  {endpoint} c={connections} round {r + 1}/{rounds}: " + " | ".join(parts))
        say(f"      ratio {ratio_text}")
    return RoundsResult(endpoint, connections, runs, ratios)
