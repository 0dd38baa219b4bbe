"""The one task that commits records and session changes to the backend, in batches.

Callers hand items over with plain (non-async) method calls, so the request path never
awaits a database write; the writer commits whatever has accumulated in one transaction
(group commit). `flush()` waits until everything handed over before the call is committed,
which is how `durability="sync"` and shutdown get their guarantee.

When storage fails the batch is retried with backoff while new items keep queueing up to
`max_pending`; past that new records are dropped and counted, so a broken disk can neither
take the proxy down nor exhaust its memory. The error is logged once per burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from .backends.base import Backend
from .errors import StoreWriteError
from .models import LineageNode, RequestRecord, ResponseRecord, Session, WriteBatch

__all__ = ("DELETED", "RecordWriter")

log: Final = logging.getLogger("aiohttp_session_store.writer")


class _Deleted:
    """Marks a session id whose deletion is pending (distinct from "not known here")."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETED"


DELETED: Final = _Deleted()

_MAX_BACKOFF: Final = 1.0


class RecordWriter:
    def __init__(
        self,
        backend: Backend,
        *,
        flush_interval: float = 0.05,
        max_pending: int = 10_000,
        close_timeout: float = 10.0,
    ) -> None:
        self._backend = backend
        # Half the interval spent gathering leaves the other half for the commit itself,
        # so a record is committed within `flush_interval` of being handed over.
        self._linger = flush_interval / 2
        self._max_pending = max_pending
        self._close_timeout = close_timeout

        self._sessions: dict[str, Session | _Deleted] = {}
        self._requests: list[RequestRecord] = []
        self._upstream: list[tuple[str, str]] = []
        self._responses: list[ResponseRecord] = []
        self._nodes: list[LineageNode] = []
        # What the current commit holds, so reads still see it while the commit runs.
        self._inflight_sessions: dict[str, Session | _Deleted] = {}
        self._inflight_records = 0

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

    # -- handing items over (never awaits) -------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._requests) + len(self._responses) + len(self._upstream) + len(self._nodes)

    def _accept(self) -> bool:
        if self.pending >= self._max_pending:
            self.records_dropped += 1
            if not self._dropping:
                # Once per burst: the queue fills long before the first commit fails.
                self._dropping = True
                log.warning(
                    "record queue full (%d); dropping records until it drains", self._max_pending
                )
            return False
        return True

    def _handed_over(self) -> None:
        self._enqueued += 1
        self._wakeup.set()

    def put_session(self, session: Session) -> None:
        """Queue a full snapshot of a session (the newest snapshot of an id wins)."""
        if session.id not in self._sessions and len(self._sessions) >= self._max_pending:
            self.records_dropped += 1
            return
        self._sessions[session.id] = session
        self._handed_over()

    def delete_session(self, session_id: str) -> None:
        self._sessions[session_id] = DELETED
        self._handed_over()

    def put_request(self, record: RequestRecord) -> bool:
        """Queue a request record; False if it was dropped (its response must be too)."""
        if not self._accept():
            return False
        self._requests.append(record)
        self._handed_over()
        return True

    def put_upstream_request(self, request_id: str, upstream_request: str) -> bool:
        if not self._accept():
            return False
        self._upstream.append((request_id, upstream_request))
        self._handed_over()
        return True

    def put_response(self, record: ResponseRecord) -> bool:
        if not self._accept():
            return False
        self._responses.append(record)
        self._handed_over()
        return True

    def put_node(self, node: LineageNode) -> bool:
        """Queue a lineage node (committed with the records handed over with it)."""
        if not self._accept():
            return False
        self._nodes.append(node)
        self._handed_over()
        return True

    def lookup(self, session_id: str) -> Session | _Deleted | None:
        """The newest uncommitted state of a session: a snapshot, DELETED, or None."""
        found = self._sessions.get(session_id)
        if found is None:
            found = self._inflight_sessions.get(session_id)
        return found

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
            if lost:
                log.error("closing with %d records not committed (storage failing)", lost)
                self.records_dropped += lost
        task, self._task = self._task, None
        task.cancel()
        # wait(), not `await task`: the writer's cancellation is expected, while a
        # cancellation of close() itself must still propagate.
        await asyncio.wait({task})
        self._settle(self._enqueued, StoreWriteError("the record writer was closed"))

    def _take(self) -> tuple[WriteBatch, int]:
        batch = WriteBatch(
            sessions=[s for s in self._sessions.values() if isinstance(s, Session)],
            deleted_sessions=[k for k, s in self._sessions.items() if s is DELETED],
            requests=self._requests,
            upstream_requests=self._upstream,
            responses=self._responses,
            nodes=self._nodes,
        )
        self._inflight_sessions = self._sessions
        self._inflight_records = (
            len(batch.requests) + len(batch.upstream_requests) + len(batch.responses)
        )
        self._sessions = {}
        self._requests, self._upstream, self._responses, self._nodes = [], [], [], []
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
            if not self._urgent.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._linger)
            self._wakeup.clear()
            batch, upto = self._take()
            if len(batch):
                await self._commit(batch)
            self._inflight_sessions = {}
            self._inflight_records = 0
            self._settle(upto)

    async def _commit(self, batch: WriteBatch) -> None:
        attempt = 0
        while True:
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
        singles = [
            *(WriteBatch(sessions=[s]) for s in batch.sessions),
            *(WriteBatch(deleted_sessions=[d]) for d in batch.deleted_sessions),
            *(WriteBatch(requests=[r]) for r in batch.requests),
            *(WriteBatch(upstream_requests=[u]) for u in batch.upstream_requests),
            *(WriteBatch(responses=[r]) for r in batch.responses),
            *(WriteBatch(nodes=[n]) for n in batch.nodes),
        ]
        for single in singles:
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
