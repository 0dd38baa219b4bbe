"""Prometheus metrics: what a scrape says after real calls, bounds, failures, the missing extra."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from proxy_apps import (
    CHAT_PATH,
    chat_body,
    completion,
    content_chunks,
    json_handler,
    make_app,
    sse_frames,
    sse_handler,
)
from pytest_aiohttp import AiohttpClient

from aiohttp_session_store import SessionManager, SessionStore, StoreConfig, mark_upstream_error
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.metrics import (
    INSTALL_HINT,
    OTHER_LABEL,
    StoreMetrics,
    enable_metrics,
)
from aiohttp_session_store.models import LineageNode, RequestRecord, ResponseRecord, WriteBatch

Client = TestClient[web.Request, web.Application]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SSE_PATH = "/v1/sse/chat/completions"
TOKEN = "metrics-token-0123456789"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
P = "aiohttp_session_store_"


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled series never observed (as PromQL sees it)."""
    return samples.get((P + name, frozenset(labels.items())), 0.0)


async def scrape(client: Client, prefix: str = "/admin", **headers: str) -> Samples:
    async with client.get(f"{prefix}/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        return parse(await resp.text())


async def metrics_client(
    aiohttp_client: AiohttpClient,
    routes: dict[str, Any],
    database: Path | SQLiteBackend,
    **config: Any,
) -> tuple[Client, SessionStore]:
    paths = tuple(routes)
    app, store = make_app(routes, db=database, config=StoreConfig(paths=paths, **config))  # type: ignore[arg-type]
    assert store is not None
    app.add_subapp("/admin", store.metrics_app())
    return await aiohttp_client(app), store


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout}s")
        await asyncio.sleep(0.005)


# -- real calls ---------------------------------------------------------------------------


async def test_json_and_sse_calls_are_counted_with_tokens_and_histograms(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    routes = {
        CHAT_PATH: json_handler(completion(usage=USAGE)),
        # The first byte leaves 60 ms in: below that no time-to-first-byte bucket counts it.
        SSE_PATH: sse_handler(sse_frames(content_chunks(usage=USAGE)), before_prepare=0.06),
    }
    client, store = await metrics_client(aiohttp_client, routes, db_path)
    for text in ("one", "two"):
        async with client.post(CHAT_PATH, json=chat_body(text, model="json-model")) as resp:
            assert resp.status == 200
    async with client.post(SSE_PATH, json=chat_body("three", model="sse-model", stream=True)) as r:
        assert r.status == 200
        await r.read()
    await store.flush()

    s = await scrape(client)
    json_call = {"path": CHAT_PATH, "model": "json-model"}
    sse_call = {"path": SSE_PATH, "model": "sse-model"}
    assert value(s, "calls_total", **json_call, outcome="completed") == 2
    assert value(s, "calls_total", **sse_call, outcome="completed") == 1
    assert value(s, "tokens_total", model="json-model", kind="prompt") == 22
    assert value(s, "tokens_total", model="json-model", kind="completion") == 14
    assert value(s, "tokens_total", model="sse-model", kind="completion") == 7
    assert value(s, "call_duration_seconds_count", **json_call) == 2
    assert value(s, "call_duration_seconds_count", **sse_call) == 1
    assert value(s, "call_duration_seconds_sum", **sse_call) >= 0.06
    assert value(s, "time_to_first_byte_seconds_bucket", **sse_call, le="0.05") == 0
    assert value(s, "time_to_first_byte_seconds_bucket", **sse_call, le="+Inf") == 1
    assert value(s, "time_to_first_byte_seconds_bucket", **json_call, le="+Inf") == 2
    # Every call was committed: the writer timed at least one commit, and counted the rows.
    assert value(s, "writer_commit_seconds_count") >= 1
    assert value(s, "records_written_total") == 6
    assert value(s, "writer_queue_records") == 0
    assert value(s, "sessions_created_total") == 3
    assert value(s, "sessions_expired_total") == 0
    assert value(s, "metrics_inflight_calls") == 0


async def test_upstream_error_handler_error_and_disconnect_are_outcomes(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    async def upstream_fails(request: web.Request) -> web.Response:
        await request.read()
        mark_upstream_error(request, "upstream answered 502")
        return web.json_response({"error": {"message": "bad gateway"}}, status=502)

    async def handler_fails(request: web.Request) -> web.Response:
        raise RuntimeError("bug in the proxy")

    slow = sse_handler(sse_frames(content_chunks(pieces=["w "] * 200)), delay=0.01)
    routes = {CHAT_PATH: upstream_fails, "/v1/broken": handler_fails, SSE_PATH: slow}
    client, store = await metrics_client(aiohttp_client, routes, db_path)
    async with client.post(CHAT_PATH, json=chat_body("a")) as resp:
        assert resp.status == 502
    async with client.post("/v1/broken", json=chat_body("b")) as resp:
        assert resp.status == 500
    resp = await client.post(SSE_PATH, json=chat_body("c", stream=True))
    await resp.content.readline()
    resp.close()  # the client leaves mid-stream
    metrics = store.metrics
    assert metrics is not None
    await wait_for(lambda: metrics.inflight == 0, "the disconnected call's response")

    s = await scrape(client)
    model = "test-model-1"
    assert value(s, "calls_total", path=CHAT_PATH, model=model, outcome="upstream_error") == 1
    assert value(s, "calls_total", path="/v1/broken", model=model, outcome="handler_error") == 1
    assert value(s, "calls_total", path=SSE_PATH, model=model, outcome="client_disconnected") == 1
    assert value(s, "calls_total", path=SSE_PATH, model=model, outcome="completed") == 0


class FailingSQLite(SQLiteBackend):
    """SQLite whose commits fail (transiently, as a full or locked disk does) while `failing`."""

    failing = False

    async def write_batch(self, batch: WriteBatch) -> None:
        if self.failing:
            raise sqlite3.OperationalError("database or disk is full")
        await super().write_batch(batch)


async def test_queue_gauges_and_drops_move_when_storage_fails(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    backend = FailingSQLite(db_path)
    client, store = await metrics_client(
        aiohttp_client,
        {CHAT_PATH: json_handler(completion())},
        backend,
        max_pending_records=6,
        flush_interval=0.01,
    )
    s = await scrape(client)
    assert value(s, "writer_queue_records") == 0
    assert value(s, "records_dropped_total") == 0
    backend.failing = True
    for i in range(10):
        async with client.post(CHAT_PATH, json=chat_body(f"during {i}")) as resp:
            assert resp.status == 200
    writer = store.manager.writer
    await wait_for(lambda: writer.write_errors > 0, "a failed commit")

    s = await scrape(client)
    assert 0 < value(s, "writer_queue_records") <= 6
    assert value(s, "writer_queue_bytes") > 1000
    assert value(s, "records_dropped_total") > 0
    assert value(s, "write_errors_total") > 0
    # Calls are counted even while their records cannot be kept.
    assert value(s, "calls_total", path=CHAT_PATH, model="test-model-1", outcome="completed") > 0

    backend.failing = False
    await store.flush()
    s = await scrape(client)
    assert value(s, "writer_queue_records") == 0
    assert value(s, "writer_queue_bytes") == 0


async def test_bearer_token_guards_the_metrics_app(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    app, store = make_app({CHAT_PATH: json_handler(completion())}, db=db_path)
    assert store is not None
    app.add_subapp("/ops", store.metrics_app(token=TOKEN))
    client = await aiohttp_client(app)
    async with client.get("/ops/metrics") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    async with client.get("/ops/metrics", headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    s = await scrape(client, "/ops", Authorization=f"Bearer {TOKEN}")
    assert value(s, "records_dropped_total") == 0
    with pytest.raises(ValueError, match="at least 16"):
        store.metrics_app(token="short")


async def test_handler_route_and_openmetrics_negotiation(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    app, store = make_app({CHAT_PATH: json_handler(completion())}, db=db_path)
    assert store is not None
    app.router.add_get("/metrics", enable_metrics(store).handler)
    client = await aiohttp_client(app)
    async with client.post(CHAT_PATH, json=chat_body()) as resp:
        assert resp.status == 200
    s = await scrape(client, "")
    assert value(s, "calls_total", path=CHAT_PATH, model="test-model-1", outcome="completed") == 1
    accept = "application/openmetrics-text; version=1.0.0"
    async with client.get("/metrics", headers={"Accept": accept}) as resp:
        assert resp.content_type == "application/openmetrics-text"
        assert (await resp.text()).endswith("# EOF\n")


# -- the collector alone --------------------------------------------------------------------


def request_record(n: int, model: str | None = "m") -> RequestRecord:
    return RequestRecord(
        request_id=f"req-{n}", session_id=None, timestamp=0, method="POST", path=CHAT_PATH,
        model=model, stream=False, openai_request=None, upstream_request=None, headers=None,
        created_at=0,
    )  # fmt: skip


def response_record(n: int, duration_ms: int = 5) -> ResponseRecord:
    return ResponseRecord(
        response_id=f"resp-{n}", request_id=f"req-{n}", session_id=None, timestamp=0,
        status_code=200, outcome="completed", openai_response=None, upstream_response=None,
        parent_id=None, prompt_tokens=None, completion_tokens=None, total_tokens=None,
        finish_reason=None, error=None, duration_ms=duration_ms, first_byte_ms=None,
        created_at=0,
    )  # fmt: skip


@pytest.fixture
def store(db_path: Path) -> SessionStore:
    """A store that is never opened: the collector only reads its counters."""
    return SessionStore(SessionManager(db_path))


def calls(metrics: StoreMetrics, model: str = "m") -> int:
    return metrics.calls.get((CHAT_PATH, model, "completed"), 0)


def test_the_request_to_response_table_stays_bounded(store: SessionStore) -> None:
    metrics = StoreMetrics(store, max_inflight=3)
    for n in range(1000):
        metrics.request_queued(request_record(n))
        assert metrics.inflight <= 3
    assert metrics.evicted == 997
    # The newest are kept; a response whose request was evicted is not counted.
    metrics.response_queued(response_record(999))
    metrics.response_queued(response_record(0))
    assert calls(metrics) == 1
    assert metrics.inflight == 2
    # A second record of the same call (sync durability re-records a stream) counts once.
    metrics.response_queued(response_record(999))
    assert calls(metrics) == 1


def test_client_chosen_models_cannot_grow_the_label_set(store: SessionStore) -> None:
    metrics = StoreMetrics(store, max_models=2)
    for n in range(50):
        metrics.request_queued(request_record(n, model=f"model-{n}"))
        metrics.response_queued(response_record(n))
    metrics.request_queued(request_record(99, model=None))
    metrics.response_queued(response_record(99))
    labels = {model for _, model, _ in metrics.calls}
    assert labels == {"model-0", "model-1", OTHER_LABEL, "unknown"}
    assert calls(metrics, OTHER_LABEL) == 48


def test_duration_buckets_are_cumulative_and_inclusive(store: SessionStore) -> None:
    metrics = StoreMetrics(store)
    for n, ms in enumerate((10, 11, 400, 10 * 60_000)):
        metrics.request_queued(request_record(n))
        metrics.response_queued(response_record(n, duration_ms=ms))
    s = parse(metrics.exposition()[0].decode())
    call = {"path": CHAT_PATH, "model": "m"}
    assert value(s, "call_duration_seconds_bucket", **call, le="0.01") == 1  # le: 10 ms is in
    assert value(s, "call_duration_seconds_bucket", **call, le="0.025") == 2
    assert value(s, "call_duration_seconds_bucket", **call, le="0.5") == 3
    assert value(s, "call_duration_seconds_bucket", **call, le="300.0") == 3
    assert value(s, "call_duration_seconds_bucket", **call, le="+Inf") == 4
    assert value(s, "call_duration_seconds_sum", **call) == pytest.approx(600.421)


def test_each_store_has_its_own_registry(db_path: Path, tmp_path: Path) -> None:
    one = SessionStore(SessionManager(db_path))
    two = SessionStore(SessionManager(tmp_path / "two.db"))
    first = enable_metrics(one)
    assert enable_metrics(one) is first
    assert enable_metrics(two).registry is not first.registry
    first.request_queued(request_record(1))
    first.response_queued(response_record(1))
    assert calls(first) == 1
    assert two.metrics is not None
    assert calls(two.metrics) == 0
    with pytest.raises(ValueError, match="another registry"):
        enable_metrics(one, registry=two.metrics.registry)
    first.close()
    assert one.metrics is None
    assert one.manager.writer.observer is None


async def test_lineage_figures_are_reported(store: SessionStore) -> None:
    await store.open()
    metrics = StoreMetrics(store)
    s = parse(metrics.exposition()[0].decode())
    assert value(s, "lineage_cache_nodes") == 0
    store.manager.lineage.record(LineageNode("h" * 64, "", "s", "c", "n", None, 2, None, 1))
    assert await store.manager.lineage.find(["x" * 64]) is None  # a cold lookup: one query
    s = parse(metrics.exposition()[0].decode())
    assert value(s, "lineage_lookups_total") == 1
    assert value(s, "lineage_cache_bytes") > 0
    assert value(s, "lineage_cache_nodes") == 1
    await store.close()


async def test_a_failing_observer_never_fails_the_call(
    aiohttp_client: AiohttpClient, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, store = await metrics_client(
        aiohttp_client, {CHAT_PATH: json_handler(completion())}, db_path
    )
    metrics = store.metrics
    assert metrics is not None

    def explode(record: object) -> None:
        raise RuntimeError("observer bug")

    metrics.response_queued = explode  # type: ignore[method-assign]
    for text in ("a", "b"):
        async with client.post(CHAT_PATH, json=chat_body(text)) as resp:
            assert resp.status == 200
    await store.flush()
    assert store.manager.writer.records_written == 4  # both calls recorded regardless
    assert sum("write observer failed" in r.getMessage() for r in caplog.records) == 1


def test_a_missing_extra_names_the_install_command(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import prometheus_client` raise ImportError.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'aiohttp-session-store\[metrics\]'"):
        store.metrics_app()
    with pytest.raises(ImportError) as info:
        enable_metrics(store)
    assert str(info.value) == INSTALL_HINT
    assert store.metrics is None
