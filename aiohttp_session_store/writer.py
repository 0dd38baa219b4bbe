"""The one task that commits records and session changes to the backend, in batches.

Callers hand items over with plain (non-async) method calls, so the request path never
awaits a database write; the writer commits whatever has accumulated in one transaction
(group commit). `flush()` waits until everything handed over before the call is committed,
which is how `durability="sync"` and shutdown get their guarantee.

A batch carries at most `max_batch_bytes` of records, taken in the order they were handed
over, and lingers only until its oldest item is half a `flush_interval` old, so a commit
never waits behind a large one. When storage fails the batch is retried with backoff while
new items keep queueing up to `max_pending` records and `max_pending_bytes`; past either
new records are dropped and counted, so a broken disk can neither take the proxy down nor
exhaust its memory. The error is logged once per burst.

A shared store's session changes (`put_change`) are merged per session and committed with
the batch by atomic SQL; reads of the instance that made them consult `change_of`. With
`prompt_turns` (a shared store) a turn, its change or its lineage node, is committed at
once instead of lingering: another instance learns of a turn only from its commit.

An optional `observer` (metrics) sees each record as it is handed over and the time each
commit took; with none set, the cost is one attribute test per call.

Session state waiting for a commit lives in `pending_sessions`. Slightly over the 400-line
guide as one concern: the record queue, its bounds in records and bytes, the batch it cuts
and the commit loop that settles waiters share state that only makes sense together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Final, NamedTuple, Protocol, TypeVar, Union

from .backends.base import Backend
from .errors import StoreWriteError
from .models import LineageNode, RequestRecord, ResponseRecord, Session, SessionChange, WriteBatch
from .pending_sessions import DELETED, PendingSessions, _Deleted
from .session_cache import str_bytes

__all__ = ("DELETED", "RecordWriter", "WriteObserver", "record_bytes")

log: Final = logging.getLogger("aiohttp_session_store.writer")


_MAX_BACKOFF: Final = 1.0

# A record object with its slots and small ints, beyond the strings it holds.
_RECORD_OVERHEAD: Final = 250


class _Upstream(NamedTuple):
    request_id: str
    body: str


_T = TypeVar("_T")
_Item = Union[RequestRecord, ResponseRecord, _Upstream, LineageNode]  # noqa: UP007 (runtime alias, 3.10)


# Every field of a record in one C call (`record_bytes` runs twice per call).
_REQUEST_FIELDS: Final = attrgetter(*RequestRecord.__slots__)
_RESPONSE_FIELDS: Final = attrgetter(*ResponseRecord.__slots__)


def record_bytes(record: RequestRecord | ResponseRecord) -> int:
    """Memory a queued record holds: its strings as CPython stores them, plus the object."""
    values = _REQUEST_FIELDS(record) if type(record) is RequestRecord else _RESPONSE_FIELDS(record)
    return _RECORD_OVERHEAD + sum([str_bytes(v) for v in values if type(v) is str])


class WriteObserver(Protocol):
    """Told on the loop, synchronously, what the writer is handed and how long commits take."""

    def request_queued(self, record: RequestRecord) -> None: ...

    def response_queued(self, record: ResponseRecord) -> None: ...

    def batch_committed(self, seconds: float) -> None: ...


class RecordWriter:
    def __init__(
        self,
        backend: Backend,
        *,
        flush_interval: float = 0.05,
        max_pending: int = 10_000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_batch_bytes: int = 2 * 1024 * 1024,
        close_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        prompt_turns: bool = False,
    ) -> None:
        self._backend = backend
        self._prompt_turns = prompt_turns
        self._prompt = False  # a turn is waiting: commit without lingering
        # Half the interval spent gathering leaves the other half for the commit itself,
        # so a record is committed within `flush_interval` of being handed over.
        self._linger = flush_interval / 2
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._max_batch_bytes = max_batch_bytes
        self._close_timeout = close_timeout
        self._clock = clock

        # Session snapshots and a shared store's changes, pending and in flight.
        self._sessions = PendingSessions(max_pending)
        # Records in the order they were handed over, with their sequence number and size:
        # a batch is a prefix of it, so a request is never committed after its response.
        self._queue: deque[tuple[int, _Item, int]] = deque()
        self._queued_records = 0  # requests, upstream bodies and responses in _queue
        self._queued_bytes = 0
        self._oldest = 0.0  # when the oldest item not yet taken was handed over (0: none)
        self._backlog = False  # items left over by the last batch's byte bound
        # What the current commit holds (its sessions: in `_sessions`).
        self._inflight_records = 0
        self._inflight_bytes = 0

        self._enqueued = 0  # sequence number of the last item handed over
        self._committed = 0  # every item up to this sequence number is settled
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False
        self._dropping = False

        self.records_written = 0
        self.batches_committed = 0
        self.write_errors = 0
        self.records_dropped = 0
        self.observer: WriteObserver | None = None
        self._observer_failed = False

    # -- handing items over (never awaits) -------------------------------------------

    @property
    def pending(self) -> int:
        """Records waiting for a commit (the commit in progress not included)."""
        return self._queued_records

    @property
    def pending_bytes(self) -> int:
        """Bytes held for records and session changes not yet committed (in-flight included)."""
        return self._queued_bytes + self._inflight_bytes + self._sessions.bytes

    def _drop(self, why: str) -> None:
        self.records_dropped += 1
        if not self._dropping:
            # Once per burst: the queue fills long before the first commit fails.
            self._dropping = True
            log.warning("record queue full (%s); dropping records until it drains", why)

    def _handed_over(self) -> None:
        if not self._oldest:
            self._oldest = self._clock()
        self._enqueued += 1
        self._wakeup.set()

    def _enqueue(self, item: _Item, size: int) -> bool:
        if self._queued_records >= self._max_pending:
            self._drop(f"{self._max_pending} records")
            return False
        if self.pending_bytes + size > self._max_pending_bytes:
            self._drop(f"{self._max_pending_bytes} bytes")
            return False
        self._handed_over()
        self._queue.append((self._enqueued, item, size))
        self._queued_records += 1
        self._queued_bytes += size
        if self._queued_bytes >= self._max_batch_bytes:
            self._urgent.set()  # a full batch is waiting: lingering would only delay it
        return True

    def put_session(self, session: Session) -> None:
        """Queue a full snapshot of a session (the newest snapshot of an id wins)."""
        if not self._sessions.put_snapshot(session):
            self.records_dropped += 1
            return
        self._handed_over()

    def delete_session(self, session_id: str) -> None:
        self._sessions.delete(session_id)
        self._handed_over()

    def put_change(self, change: SessionChange) -> bool:
        """Queue a shared store's session change, merged with the id's pending one.

        False when the queue is full for a new id (the caller then writes the change
        itself): unlike a record, a turn is never dropped.
        """
        if not self._sessions.put_change(change, self._max_pending_bytes - self.pending_bytes):
            return False
        self._handed_over()
        self._turn_handed_over()
        return True

    def _turn_handed_over(self) -> None:
        if self._prompt_turns:
            self._prompt = True
            self._urgent.set()  # ends a linger already under way

    def change_of(self, session_id: str) -> SessionChange | None:
        """The newest change of a session not known to be committed (pending or in flight)."""
        return self._sessions.change_of(session_id)

    def pending_turns(self, session_id: str) -> int:
        """Turns of a session queued and not yet sent: no row read from the database has them."""
        return self._sessions.pending_turns(session_id)

    def _observe(self, notify: Callable[[_T], None], value: _T) -> None:
        try:
            notify(value)
        except Exception:
            # Metrics must never turn a recorded call into a failed one; say so once.
            if not self._observer_failed:
                self._observer_failed = True
                log.exception("the write observer failed (further failures are not logged)")

    def put_request(self, record: RequestRecord) -> bool:
        """Queue a request record; False if it was dropped (its response must be too)."""
        queued = self._enqueue(record, record_bytes(record))
        if queued and self.observer is not None:
            self._observe(self.observer.request_queued, record)
        return queued

    def put_upstream_request(self, request_id: str, upstream_request: str) -> bool:
        item = _Upstream(request_id, upstream_request)
        return self._enqueue(item, _RECORD_OVERHEAD + str_bytes(upstream_request))

    def put_response(self, record: ResponseRecord) -> bool:
        # Observed even when dropped: the call happened, whether or not storage keeps up.
        if self.observer is not None:
            self._observe(self.observer.response_queued, record)
        return self._enqueue(record, record_bytes(record))

    def put_node(self, node: LineageNode) -> bool:
        """Queue a lineage node (committed with, or after, the records handed over before it)."""
        if not self._enqueue(node, _RECORD_OVERHEAD + len(node.hash) * 4):
            return False
        self._turn_handed_over()
        return True

    def lookup(self, session_id: str) -> Session | _Deleted | None:
        """The newest uncommitted state of a session: a snapshot, DELETED, or None."""
        return self._sessions.lookup(session_id)

    # -- committing ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer task on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="aiohttp_session_store.writer"
            )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def flush(self) -> None:
        """Wait until every item handed over before this call is committed.

        Raises StoreWriteError if they were dropped because storage kept failing while
        the writer was closing.
        """
        target = self._enqueued
        if self._committed >= target:
            return
        if not self.running:
            raise RuntimeError("the record writer is not running (was the store opened?)")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._urgent.set()
        self._wakeup.set()
        await fut

    async def close(self) -> None:
        """Commit everything queued (retrying for up to `close_timeout`), then stop."""
        if self._task is None:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self.flush(), self._close_timeout)
        except (asyncio.TimeoutError, StoreWriteError, RuntimeError):
            lost = self.pending + self._inflight_records
            turns = self._sessions.changes_held
            if lost or turns:
                log.error(
                    "closing with %d records and %d session changes not committed"
                    " (storage failing)",
                    lost,
                    turns,
                )
                self.records_dropped += lost
        task, self._task = self._task, None
        task.cancel()
        # wait(), not `await task`: the writer's cancellation is expected, while a
        # cancellation of close() itself must still propagate.
        await asyncio.wait({task})
        self._settle(self._enqueued, StoreWriteError("the record writer was closed"))

    def _take(self) -> tuple[WriteBatch, int]:
        """The next batch: every session change, and records up to `max_batch_bytes`."""
        sessions, deleted, changes = self._sessions.take()
        batch = WriteBatch(sessions=sessions, deleted_sessions=deleted)
        batch.changes = changes
        self._prompt = False
        queue, taken, size = self._queue, 0, 0
        while queue and (taken == 0 or size + queue[0][2] <= self._max_batch_bytes):
            _, item, item_size = queue.popleft()
            taken += 1
            size += item_size
            if isinstance(item, RequestRecord):
                batch.requests.append(item)
            elif isinstance(item, ResponseRecord):
                batch.responses.append(item)
            elif isinstance(item, LineageNode):
                batch.nodes.append(item)
            else:
                batch.upstream_requests.append((item.request_id, item.body))
        self._queued_records -= taken
        self._queued_bytes -= size
        self._inflight_records = taken
        self._inflight_bytes = size
        self._oldest = 0.0
        if queue:
            # What is left has waited already: commit it next, without lingering.
            self._backlog = True
            self._wakeup.set()
            return batch, queue[0][0] - 1
        return batch, self._enqueued

    def _settle(self, upto: int, error: BaseException | None = None) -> None:
        self._committed = max(self._committed, upto)
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._waiters:
            if target <= upto:
                if not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)
            else:
                keep.append((target, fut))
        self._waiters = keep
        if not keep:
            self._urgent.clear()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            # Linger so that one commit carries many calls, but only until the oldest
            # waiting item is `linger` old: time it spent behind the last commit counts.
            linger = self._oldest + self._linger - self._clock()
            if linger > 0 and not (self._backlog or self._prompt or self._urgent.is_set()):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), linger)
            self._wakeup.clear()
            self._backlog = False
            batch, upto = self._take()
            if len(batch):
                await self._commit(batch)
            self._sessions.settled()
            self._inflight_records = 0
            self._inflight_bytes = 0
            self._settle(upto)

    async def _commit(self, batch: WriteBatch) -> None:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                await self._backend.write_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.write_errors += 1
                if self._backend.is_permanent_error(exc):
                    await self._commit_one_by_one(batch, exc)
                    return
                if not self._failing:
                    self._failing = True
                    log.error(
                        "cannot commit %d records to %s (will retry): %s",
                        len(batch),
                        self._backend.name,
                        exc,
                    )
                attempt += 1
                await asyncio.sleep(min(0.01 * 2**attempt, _MAX_BACKOFF))
                continue
            if self.observer is not None:
                self._observe(self.observer.batch_committed, time.perf_counter() - started)
            self._dropping = False
            if self._failing:
                self._failing = False
                log.warning(
                    "storage recovered after %d failed commits; writing resumed",
                    self.write_errors,
                )
            self.records_written += len(batch.requests) + len(batch.responses)
            self.batches_committed += 1
            return

    async def _commit_one_by_one(self, batch: WriteBatch, first: Exception) -> None:
        """Salvage a batch a bad item poisoned: commit items singly, drop the bad ones."""
        log.error(
            "a batch of %d items was refused (%s); committing item by item", len(batch), first
        )
        for single in batch.singles():
            try:
                await self._backend.write_batch(single)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._backend.is_permanent_error(exc):
                    # Storage itself failing now: back to the retrying path for this item.
                    await self._commit(single)
                    continue
                self.write_errors += 1
                self.records_dropped += len(single)
                log.error("dropped a record the database refused: %s", exc)
            else:
                self.records_written += len(single.requests) + len(single.responses)
        self.batches_committed += 1
