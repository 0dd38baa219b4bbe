"""Prometheus metrics for one store, served in the text exposition format.

Per-call facts are observed where records reach the writer (see `WriteObserver`): a request
record leaves its path and model in a small bounded table keyed by request id, and the
response record of the same call takes them out again and counts the call, its tokens, its
duration and time to first byte. The request path only does a few dict operations; gauges
(queue depth and bytes) and the manager's counters are read when Prometheus scrapes.

`prometheus-client` is an optional extra (``pip install 'aiohttp-session-store[metrics]'``),
imported only when metrics are enabled.
"""

from __future__ import annotations

import hmac
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from .models import RequestRecord, ResponseRecord

if TYPE_CHECKING:
    from prometheus_client.metrics_core import HistogramMetricFamily, Metric
    from prometheus_client.registry import CollectorRegistry

    from .plugin import SessionStore

__all__ = (
    "COMMIT_BUCKETS",
    "DURATION_BUCKETS",
    "INSTALL_HINT",
    "OTHER_LABEL",
    "StoreMetrics",
    "create_metrics_app",
    "enable_metrics",
)

INSTALL_HINT: Final = "metrics need prometheus-client: pip install 'aiohttp-session-store[metrics]'"

#: Call duration and time-to-first-byte buckets, in seconds: LLM calls run from
#: milliseconds (cached, errors) to minutes (long generations).
DURATION_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
#: Writer commit latency buckets, in seconds.
COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

#: The label of a model or path past the label limits, and of a call that named no model.
OTHER_LABEL: Final = "other"
UNKNOWN_LABEL: Final = "unknown"
_MAX_LABEL_CHARS: Final = 100

_PREFIX: Final = "aiohttp_session_store_"

_METRICS_KEY: Final = web.AppKey("aiohttp_session_store.metrics", object)
_TOKEN_KEY: Final = web.AppKey("aiohttp_session_store.metrics.token", bytes)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return prometheus_client


class _Histogram:
    """Bucket counts per label set, kept as plain lists (cheap to observe, read at scrape)."""

    __slots__ = ("bounds", "les", "rows", "scale")

    def __init__(self, bounds: Sequence[float], scale: float) -> None:
        #: Bounds in the unit observed values come in (`scale` of them make one second).
        self.bounds = tuple(b * scale for b in bounds)
        self.les = (*(repr(float(b)) for b in bounds), "+Inf")
        self.scale = scale
        # Per label set: one count per bucket, the +Inf bucket, then the sum.
        self.rows: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        row = self.rows.get(labels)
        if row is None:
            row = self.rows[labels] = [0] * (len(self.bounds) + 2)
        # bisect_left: Prometheus buckets are `le`, so a value equal to a bound is in it.
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def family(self, name: str, doc: str, label_names: Sequence[str]) -> Metric:
        family: HistogramMetricFamily = _prometheus().metrics_core.HistogramMetricFamily(
            name, doc, labels=list(label_names)
        )
        for labels, row in list(self.rows.items()):
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for le, count in zip(self.les, row[:-1], strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(list(labels), buckets, row[-1] / self.scale)
        return family


class StoreMetrics:
    """The metrics of one store: a `WriteObserver` and a Prometheus collector in one.

    `max_inflight` bounds the request-to-response table (entries, each under ~200 bytes as
    it shares the record's id string and the interned labels); when a response never comes
    its entry is evicted oldest-first. `max_models` and `max_paths` bound label sets, since
    the model is whatever the client sent: past them a new value is counted as "other".
    """

    def __init__(
        self,
        store: SessionStore,
        registry: CollectorRegistry | None = None,
        *,
        max_inflight: int = 10_000,
        max_models: int = 64,
        max_paths: int = 32,
    ) -> None:
        prom = _prometheus()
        if max_inflight < 1 or max_models < 1 or max_paths < 1:
            raise ValueError("max_inflight, max_models and max_paths must be at least 1")
        self.store = store
        self.registry: CollectorRegistry = (
            registry if registry is not None else prom.CollectorRegistry(auto_describe=True)
        )
        self.max_inflight = max_inflight
        self._max_models = max_models
        self._max_paths = max_paths
        self._models: dict[str | None, str] = {None: UNKNOWN_LABEL}
        self._paths: dict[str, str] = {}
        self._inflight: dict[str, tuple[str, str]] = {}
        self.evicted = 0
        self.calls: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.duration = _Histogram(DURATION_BUCKETS, 1000)  # observed in milliseconds
        self.first_byte = _Histogram(DURATION_BUCKETS, 1000)
        self.commit = _Histogram(COMMIT_BUCKETS, 1)
        self.registry.register(self)

    # -- observing (the request path: no I/O, a few dict operations) -------------------

    def _label(self, known: dict[Any, str], value: str, limit: int) -> str:
        if len(known) >= limit:
            return OTHER_LABEL
        label = known[value] = value[:_MAX_LABEL_CHARS] or UNKNOWN_LABEL
        return label

    def request_queued(self, record: RequestRecord) -> None:
        model = self._models.get(record.model)
        if model is None:
            model = self._label(self._models, record.model or "", self._max_models + 1)
        path = self._paths.get(record.path)
        if path is None:
            path = self._label(self._paths, record.path, self._max_paths)
        inflight = self._inflight
        if len(inflight) >= self.max_inflight:
            # A response that never came (its call was lost): the oldest goes.
            del inflight[next(iter(inflight))]
            self.evicted += 1
        inflight[record.request_id] = (path, model)

    def response_queued(self, record: ResponseRecord) -> None:
        # Absent: evicted, or a second record for the same call (sync durability records
        # a stream before its end, then again): counted once, from the first.
        labels = self._inflight.pop(record.request_id, None)
        if labels is None:
            return
        path, model = labels
        key = (path, model, record.outcome)
        calls = self.calls
        calls[key] = calls.get(key, 0) + 1
        tokens = self.tokens
        if record.prompt_tokens:
            prompt = (model, "prompt")
            tokens[prompt] = tokens.get(prompt, 0) + record.prompt_tokens
        if record.completion_tokens:
            completion = (model, "completion")
            tokens[completion] = tokens.get(completion, 0) + record.completion_tokens
        self.duration.observe(labels, record.duration_ms)
        if record.first_byte_ms is not None:
            self.first_byte.observe(labels, record.first_byte_ms)

    def batch_committed(self, seconds: float) -> None:
        self.commit.observe((), seconds)

    @property
    def inflight(self) -> int:
        """Calls whose request was seen and whose response was not (yet)."""
        return len(self._inflight)

    # -- scraping ------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        core = _prometheus().metrics_core
        counter, gauge = core.CounterMetricFamily, core.GaugeMetricFamily
        manager = self.store.manager
        writer = manager.writer

        calls = counter(
            _PREFIX + "calls", "Calls recorded, by path, model and outcome.",
            labels=["path", "model", "outcome"],
        )  # fmt: skip
        for labels, n in list(self.calls.items()):
            calls.add_metric(list(labels), n)
        yield calls
        tokens = counter(
            _PREFIX + "tokens", "Tokens reported in usage, by model and kind.",
            labels=["model", "kind"],
        )  # fmt: skip
        for pair, n in list(self.tokens.items()):
            tokens.add_metric(list(pair), n)
        yield tokens
        names = ("path", "model")
        yield self.duration.family(
            _PREFIX + "call_duration_seconds", "Time from request to the end of the reply.", names
        )
        yield self.first_byte.family(
            _PREFIX + "time_to_first_byte_seconds", "Time from request to the first byte.", names
        )
        yield self.commit.family(
            _PREFIX + "writer_commit_seconds", "Time one batch commit took (successful).", ()
        )

        def one(kind: Any, name: str, doc: str, value: float) -> Metric:
            family: Metric = kind(_PREFIX + name, doc, value=value)
            return family

        yield one(gauge, "writer_queue_records", "Records waiting for a commit.", writer.pending)
        yield one(
            gauge, "writer_queue_bytes", "Bytes held for uncommitted records and sessions.",
            writer.pending_bytes,
        )  # fmt: skip
        yield one(counter, "records_written", "Records committed.", writer.records_written)
        yield one(
            counter, "records_dropped", "Records dropped (queue full while storage failed).",
            writer.records_dropped,
        )  # fmt: skip
        yield one(counter, "write_errors", "Failed commit attempts.", writer.write_errors)
        yield one(counter, "sessions_created", "Sessions created.", manager.total_created)
        yield one(counter, "sessions_expired", "Expired sessions swept.", manager.total_cleaned)
        yield one(counter, "sweep_errors", "Expiry sweeps that failed.", manager.sweep_errors)
        yield one(
            gauge, "metrics_inflight_calls", "Calls whose response is not yet recorded.",
            self.inflight,
        )  # fmt: skip
        yield one(
            counter, "metrics_evicted_calls",
            "Calls evicted from the request-to-response table unmatched.", self.evicted,
        )  # fmt: skip
        yield from self._lineage(one, counter, gauge)

    def _lineage(self, one: Any, counter: Any, gauge: Any) -> Iterator[Metric]:
        lineage = self.store.manager.lineage
        yield one(
            counter, "lineage_lookups", "Lineage lookups that queried storage.", lineage.queries
        )
        yield one(
            gauge, "lineage_cache_bytes", "Bytes of cached lineage nodes.", lineage.cached_bytes
        )
        yield one(gauge, "lineage_cache_nodes", "Cached lineage nodes.", len(lineage))

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry's metrics in the format `accept` asks for: (body, content type)."""
        encoder, content_type = _prometheus().exposition.choose_encoder(accept or "")
        body: bytes = encoder(self.registry)
        return body, content_type

    async def handler(self, request: web.Request) -> web.Response:
        """`GET /metrics` for `app.router.add_get` (no authentication of its own)."""
        body, content_type = self.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    def close(self) -> None:
        """Stop observing and leave the registry (idempotent)."""
        writer = self.store.manager.writer
        if writer.observer is self:
            writer.observer = None
        if self.store.metrics is self:
            self.store.metrics = None
            self.registry.unregister(self)


def enable_metrics(store: SessionStore, registry: CollectorRegistry | None = None) -> StoreMetrics:
    """Start collecting `store`'s metrics; the same object on a second call.

    They go to `registry`, by default a new `CollectorRegistry` of this store alone, so two
    stores (or two tests) never collide. Pass `prometheus_client.REGISTRY` to serve them
    with the process's other metrics. Raises ImportError naming the extra to install.
    """
    existing = store.metrics
    if existing is not None:
        if registry is not None and registry is not existing.registry:
            raise ValueError("metrics are already enabled for this store, in another registry")
        return existing
    metrics = StoreMetrics(store, registry)
    store.manager.writer.observer = metrics
    store.metrics = metrics
    return metrics


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    expected = request.app.get(_TOKEN_KEY)
    if expected is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken must not reveal how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), expected
        ):
            return web.json_response(
                {"error": {"message": "a valid bearer token is required",
                           "type": "authentication_error"}},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="aiohttp_session_store"'},
            )  # fmt: skip
    response: web.StreamResponse = await handler(request)
    return response


async def _serve(request: web.Request) -> web.Response:
    metrics = request.app[_METRICS_KEY]
    assert isinstance(metrics, StoreMetrics)
    return await metrics.handler(request)


def create_metrics_app(metrics: StoreMetrics, *, token: str | None = None) -> web.Application:
    """An app serving ``GET /metrics``, for ``app.add_subapp(prefix, ...)``.

    With `token` (at least 16 characters), every request needs ``Authorization: Bearer``
    with it (Prometheus: ``authorization: {credentials: ...}`` in the scrape config).
    """
    from .query import MIN_TOKEN_LENGTH

    app = web.Application(middlewares=[_guard])
    if token is not None:
        if not isinstance(token, str) or len(token.strip()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the metrics token must be at least {MIN_TOKEN_LENGTH} characters")
        if token != token.strip():
            raise ValueError("the metrics token must not start or end with whitespace")
        app[_TOKEN_KEY] = token.encode("utf-8")
    app[_METRICS_KEY] = metrics
    app.router.add_get("/metrics", _serve)
    return app
