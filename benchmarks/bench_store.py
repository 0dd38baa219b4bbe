"""Store part of the benchmark: SessionManager micro-benchmarks, the writer's sustained rate, scale.

- micro: awaited `create_session`, `get_session`, `update_parent_id`, timed call by call
  (median per op). With SQLite the manager serves sessions from its write-behind cache; the
  cold figure (`get_session` through a fresh manager, every call a cache miss that reads the
  database) is reported beside it.
- writer: request/response records handed to a `RecordWriter` as fast as it takes them,
  without ever going past `max_pending_records`; committed records per second.
- scale: a store of 1,000,000 sessions and 2,000,000 records, built directly with sqlite3 (or
  COPY for PostgreSQL) after the package's own migrations made the schema; cold `get_session`
  against it versus a 1,000-session store; then a sweep of its 100,000 expired sessions while a
  probe task measures the event loop's longest stall.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench_workload import AUTHORIZATION, conversation_bodies

from aiohttp_session_store import RequestRecord, ResponseRecord, SessionManager, StoreConfig
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.backends.columns import (
    REQUEST_COLUMNS,
    RESPONSE_COLUMNS,
    SESSION_COLUMNS,
)
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.models import now_ms
from aiohttp_session_store.writer import RecordWriter

__all__ = (
    "BackendFactory",
    "build_sqlite_store",
    "cold_get_session",
    "micro",
    "stall_during_sweep",
    "writer_sustained",
)

#: A fresh, unopened backend for each manager (a manager closes its backend on shutdown).
BackendFactory = Callable[[], Backend]

_DAY_MS: Final = 86_400_000
_HEADERS_JSON: Final = json.dumps(
    {
        "Host": "127.0.0.1:8101",
        "User-Agent": "bench/1.0",
        "Content-Type": "application/json",
        "Authorization": "[REDACTED]",
        "Content-Length": "734",
    }
)
_SCALE_REQUEST: Final = conversation_bodies(stream=False, conversations=3)[7].decode()
_SCALE_RESPONSE: Final = json.dumps(
    {
        "id": "chatcmpl-0",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * 40},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
    }
)
assert AUTHORIZATION not in _HEADERS_JSON  # stored redacted, as the middleware does


def session_id(n: int, prefix: str = "s") -> str:
    """A session id shaped like the middleware's (an MD5 hex digest)."""
    return hashlib.md5(f"{prefix} {n}".encode()).hexdigest()


def _us(ns: list[int]) -> dict[str, float]:
    ordered = sorted(ns)
    return {
        "median_us": statistics.median(ordered) / 1000,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
        "calls": len(ordered),
    }


async def _timed(
    fn: Callable[..., Awaitable[object]], calls: Iterable[tuple[object, ...]]
) -> list[int]:
    """Nanoseconds of each awaited `fn(*args)`, one call at a time."""
    out: list[int] = []
    clock = time.perf_counter_ns
    for args in calls:
        t0 = clock()
        await fn(*args)
        out.append(clock() - t0)
    return out


# -- micro-benchmarks ------------------------------------------------------------------------


async def micro(factory: BackendFactory, *, sessions: int, calls: int) -> dict[str, Any]:
    """Median per awaited call of the manager's hot-path methods (and create_session)."""
    ids = [session_id(i, "micro") for i in range(sessions)]
    parents = [f"msg-{k:08d}" for k in range(calls)]
    manager = SessionManager(factory())
    await manager.open()
    try:
        create = await _timed(manager.create_session, ((sid, None, "Hello world") for sid in ids))
        await manager.writer.flush()
        get = await _timed(manager.get_session, ((ids[k % sessions],) for k in range(calls)))
        update = await _timed(
            manager.update_parent_id, ((ids[k % sessions], parents[k]) for k in range(calls))
        )
        await manager.writer.flush()
    finally:
        await manager.shutdown()
    return {
        "create_session": _us(create),
        "get_session": _us(get),
        "update_parent_id": _us(update),
        "get_session_cold": await cold_get_session(factory, ids),
    }


async def cold_get_session(factory: BackendFactory, ids: list[str]) -> dict[str, float]:
    """`get_session` through a fresh manager: each id once, so every call reads the database."""
    manager = SessionManager(factory())
    await manager.open()
    try:
        found = 0

        async def get(sid: str) -> None:
            nonlocal found
            if await manager.get_session(sid) is not None:
                found += 1

        times = await _timed(get, ((sid,) for sid in ids))
        await manager.writer.flush()
    finally:
        await manager.shutdown()
    if found != len(ids):
        raise RuntimeError(f"cold get_session found {found} of {len(ids)} sessions")
    return _us(times)


# -- the writer ------------------------------------------------------------------------------


def _records(n: int, tag: str) -> tuple[list[RequestRecord], list[ResponseRecord]]:
    bodies = [b.decode() for b in conversation_bodies(stream=False, conversations=50)]
    now = now_ms()
    requests = []
    responses = []
    for i in range(n):
        rid = f"{tag}{i:024x}"
        sid = session_id(i % 1000, "writer")
        requests.append(
            RequestRecord(
                request_id=rid,
                session_id=sid,
                timestamp=now,
                method="POST",
                path="/v1/chat/completions",
                model="bench-model",
                stream=False,
                openai_request=bodies[i % len(bodies)],
                upstream_request=None,
                headers=_HEADERS_JSON,
                created_at=now,
            )
        )
        responses.append(
            ResponseRecord(
                response_id=f"r{rid}",
                request_id=rid,
                session_id=sid,
                timestamp=now,
                status_code=200,
                outcome="completed",
                openai_response=_SCALE_RESPONSE,
                upstream_response=None,
                parent_id=f"msg-{i}",
                prompt_tokens=50,
                completion_tokens=20,
                total_tokens=70,
                finish_reason="stop",
                error=None,
                duration_ms=3,
                first_byte_ms=1,
                created_at=now,
            )
        )
    return requests, responses


async def writer_sustained(backend: Backend, *, records: int) -> dict[str, Any]:
    """Committed records per second with the writer kept busy, never past max_pending."""
    config = StoreConfig()
    pairs = records // 2
    requests, responses = _records(pairs, "w")
    await backend.open()
    writer = RecordWriter(
        backend, flush_interval=config.flush_interval, max_pending=config.max_pending_records
    )
    writer.start()
    # Headroom below the cap: a record handed over past it would be dropped, not queued.
    ceiling = config.max_pending_records - 512
    try:
        started = time.perf_counter()
        i = 0
        while i < pairs:
            room = (ceiling - writer.pending) // 2
            if room <= 0:
                await asyncio.sleep(0.001)
                continue
            end = min(pairs, i + min(room, 1000))
            for j in range(i, end):
                writer.put_request(requests[j])
                writer.put_response(responses[j])
            i = end
            await asyncio.sleep(0)
        await writer.flush()
        elapsed = time.perf_counter() - started
    finally:
        await writer.close()
        await backend.close()
    if writer.records_dropped:
        raise RuntimeError(f"the writer dropped {writer.records_dropped} records")
    return {
        "records": writer.records_written,
        "seconds": elapsed,
        "records_per_second": writer.records_written / elapsed,
        "batches": writer.batches_committed,
    }


# -- scale -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleShape:
    sessions: int
    records: int  # request rows + response rows
    expired: int  # the first `expired` sessions are already past their expiry

    def live_ids(self, count: int, seed: int = 7) -> list[str]:
        rng = random.Random(seed)
        picks = rng.sample(range(self.expired, self.sessions), min(count, self.live))
        return [session_id(i, "scale") for i in picks]

    @property
    def live(self) -> int:
        return self.sessions - self.expired


def _session_rows(shape: ScaleShape, now: int) -> Iterator[tuple[object, ...]]:
    for i in range(shape.sessions):
        expires = now - 60_000 - i if i < shape.expired else now + _DAY_MS
        created = expires - 1_800_000
        yield (
            session_id(i, "scale"),
            f"chat-{i}",
            f"msg-{i}",
            f"Conversation {i}: please explain how SQLite's write-ahead log works.",
            3,
            created,
            created,
            expires,
        )


def _request_rows(shape: ScaleShape, now: int) -> Iterator[tuple[object, ...]]:
    for i in range(shape.records // 2):
        ts = now - _DAY_MS + i
        yield (
            f"q{i:031x}",
            session_id(i % shape.sessions, "scale"),
            ts,
            "POST",
            "/v1/chat/completions",
            "bench-model",
            0,
            _SCALE_REQUEST,
            None,
            _HEADERS_JSON,
            ts,
        )


def _response_rows(shape: ScaleShape, now: int) -> Iterator[tuple[object, ...]]:
    for i in range(shape.records // 2):
        ts = now - _DAY_MS + i
        yield (
            f"r{i:031x}",
            f"q{i:031x}",
            session_id(i % shape.sessions, "scale"),
            ts,
            200,
            "completed",
            _SCALE_RESPONSE,
            None,
            f"msg-{i}",
            50,
            20,
            70,
            "stop",
            None,
            3,
            1,
            ts,
        )


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


_SESSION_INSERT: Final = _insert("sessions", SESSION_COLUMNS)
_REQUEST_INSERT: Final = _insert("requests", REQUEST_COLUMNS)
_RESPONSE_INSERT: Final = _insert("responses", RESPONSE_COLUMNS)


async def _migrate_sqlite(path: Path) -> None:
    backend = SQLiteBackend(path)
    await backend.open()
    await backend.close()


def build_sqlite_store(path: Path, shape: ScaleShape) -> float:
    """Create a store of `shape` at `path` (replacing it); seconds taken.

    The schema comes from the package's migrations; rows go in through sqlite3 directly, in
    one transaction without a journal (a benchmark fixture, not the package's write path).
    """
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    started = time.perf_counter()
    asyncio.run(_migrate_sqlite(path))
    now = now_ms()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("PRAGMA cache_size=-1000000")
        con.execute("BEGIN")
        con.executemany(_SESSION_INSERT, _session_rows(shape, now))
        con.executemany(_REQUEST_INSERT, _request_rows(shape, now))
        con.executemany(_RESPONSE_INSERT, _response_rows(shape, now))
        con.execute("COMMIT")
        con.execute("ANALYZE")
        # Back to what the backend sets, so the store is opened as it would be in production.
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()
    return time.perf_counter() - started


async def build_postgres_store(url: str, schema: str, shape: ScaleShape) -> float:
    """The same store in a PostgreSQL schema (migrated by the package), filled with COPY."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    from aiohttp_session_store.backends.postgres import PostgresBackend

    started = time.perf_counter()
    backend = PostgresBackend(url, schema=schema)
    await backend.open()
    await backend.close()
    now = now_ms()
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        await conn.copy_records_to_table(
            "sessions",
            records=_session_rows(shape, now),
            columns=list(SESSION_COLUMNS),
        )
        await conn.copy_records_to_table(
            "requests",
            records=_request_rows(shape, now),
            columns=list(REQUEST_COLUMNS),
        )
        await conn.copy_records_to_table(
            "responses",
            records=_response_rows(shape, now),
            columns=list(RESPONSE_COLUMNS),
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def stall_during_sweep(factory: BackendFactory, *, expect: int) -> dict[str, Any]:
    """Run `cleanup()` while a task sleeping 1 ms at a time records how late it wakes."""
    manager = SessionManager(factory())
    await manager.open()
    lateness: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        interval = 0.001
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(interval)
            lateness.append(time.perf_counter() - t0 - interval)

    try:
        task = asyncio.create_task(probe())
        await asyncio.sleep(0.3)
        baseline = max(lateness, default=0.0)
        lateness.clear()
        started = time.perf_counter()
        deleted = await manager.cleanup()
        elapsed = time.perf_counter() - started
        stop.set()
        await task
    finally:
        await manager.shutdown()
    if deleted != expect:
        raise RuntimeError(f"the sweep deleted {deleted} sessions, expected {expect}")
    ordered = sorted(lateness)
    return {
        "deleted": deleted,
        "seconds": elapsed,
        "max_stall_ms": ordered[-1] * 1000 if ordered else 0.0,
        "p99_stall_ms": ordered[int(len(ordered) * 0.99)] * 1000 if ordered else 0.0,
        "baseline_max_stall_ms": baseline * 1000,
        "probes": len(ordered),
    }
