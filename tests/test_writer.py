"""RecordWriter: group commits, flush semantics, retries, bounded memory under failure."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.models import (
    LineageNode,
    RequestQuery,
    RequestRecord,
    ResponseRecord,
    Session,
    WriteBatch,
)
from aiohttp_session_store.writer import DELETED, RecordWriter


class FlakyBackend(SQLiteBackend):
    """A real SQLite backend whose commits can be made to fail on demand."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failing = False
        self.batches: list[int] = []
        self.committed = asyncio.Event()

    async def write_batch(self, batch: WriteBatch) -> None:
        if self.failing:
            raise OSError("disk I/O error (simulated)")
        self.batches.append(len(batch))
        await super().write_batch(batch)
        self.committed.set()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[FlakyBackend]:
    b = FlakyBackend(tmp_path / "w.db")
    await b.open()
    yield b
    await b.close()


def request_record(i: int = 0) -> RequestRecord:
    return RequestRecord(
        request_id=f"req-{i}-{uuid.uuid4().hex[:6]}",
        session_id=None,
        timestamp=1000 + i,
        method="POST",
        path="/v1/chat/completions",
        model="m",
        stream=False,
        openai_request="{}",
        upstream_request=None,
        headers="{}",
        created_at=1000 + i,
    )


def response_record(req: RequestRecord) -> ResponseRecord:
    return ResponseRecord(
        response_id=uuid.uuid4().hex,
        request_id=req.request_id,
        session_id=None,
        timestamp=req.timestamp,
        status_code=200,
        outcome="completed",
        openai_response="{}",
        upstream_response=None,
        parent_id=None,
        prompt_tokens=0,
        completion_tokens=0,
        total_tokens=0,
        finish_reason="stop",
        error=None,
        duration_ms=1,
        first_byte_ms=1,
        created_at=req.timestamp,
    )


async def stored(backend: SQLiteBackend) -> int:
    return await backend.count_requests(RequestQuery())


async def test_put_does_not_write_until_the_writer_commits(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend, flush_interval=10.0)
    writer.start()
    try:
        writer.put_request(request_record())
        await asyncio.sleep(0.01)
        assert backend.batches == []  # still lingering: batched, not per call
        await writer.flush()
        assert await stored(backend) == 1
    finally:
        await writer.close()


@pytest.mark.parametrize("during_a_linger", [False, True])
async def test_a_turn_is_committed_at_once_with_prompt_turns(
    backend: FlakyBackend, during_a_linger: bool
) -> None:
    # A shared store's writer: an hour's flush interval, yet a lineage node (a turn other
    # instances must see) is committed at once, with the record waiting before it.
    writer = RecordWriter(backend, flush_interval=3600.0, prompt_turns=True)
    writer.start()
    try:
        writer.put_request(request_record())
        if during_a_linger:
            await asyncio.sleep(0.01)
            assert backend.batches == []  # the record alone lingers
        node = LineageNode("h" * 64, "", "s1", "chat-1", "n1", None, 1, None, 1)
        assert writer.put_node(node)
        await asyncio.wait_for(backend.committed.wait(), 5)
        assert backend.batches == [2]
        assert [n.hash for n in await backend.get_lineage_nodes([node.hash])] == [node.hash]
    finally:
        await writer.close()


async def test_commits_within_flush_interval_without_flush(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend, flush_interval=0.02)
    writer.start()
    try:
        writer.put_request(request_record())
        for _ in range(100):
            if backend.batches:
                break
            await asyncio.sleep(0.005)
        assert await stored(backend) == 1
    finally:
        await writer.close()


async def test_group_commit_batches_many_records(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend, flush_interval=0.05)
    writer.start()
    try:
        for i in range(500):
            req = request_record(i)
            writer.put_request(req)
            writer.put_response(response_record(req))
        await writer.flush()
        assert await stored(backend) == 500
        assert len(backend.batches) <= 3
        assert writer.records_written == 1000
    finally:
        await writer.close()


async def test_flush_with_nothing_pending_returns_at_once(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend)
    writer.start()
    try:
        await asyncio.wait_for(writer.flush(), 0.5)
    finally:
        await writer.close()


async def test_lookup_sees_queued_and_inflight_session_state(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend, flush_interval=10.0)
    writer.start()
    try:
        s = Session("s1", None, None, "hi", 0, 1, 1, 10**15)
        writer.put_session(s)
        assert writer.lookup("s1") == s
        writer.delete_session("s1")
        assert writer.lookup("s1") is DELETED
        assert writer.lookup("other") is None
        await writer.flush()
        assert writer.lookup("s1") is None
        assert await backend.get_session("s1") is None
    finally:
        await writer.close()


async def test_storage_failure_retries_logs_once_and_recovers(
    backend: FlakyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    writer = RecordWriter(backend, flush_interval=0.01)
    writer.start()
    backend.failing = True
    caplog.set_level(logging.WARNING, logger="aiohttp_session_store.writer")
    try:
        for i in range(5):
            writer.put_request(request_record(i))
        for _ in range(200):
            if writer.write_errors >= 3:
                break
            await asyncio.sleep(0.01)
        assert writer.write_errors >= 3
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # once per burst, not once per retry
        backend.failing = False
        await asyncio.wait_for(writer.flush(), 5)
        assert await stored(backend) == 5
        assert any("recovered" in r.getMessage() for r in caplog.records)
    finally:
        await writer.close()


async def test_queue_is_bounded_while_storage_fails(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend, flush_interval=0.01, max_pending=10)
    writer.start()
    backend.failing = True
    try:
        writer.put_request(request_record(0))
        for _ in range(100):  # let the first batch be taken and start failing
            if writer.write_errors:
                break
            await asyncio.sleep(0.01)
        accepted = sum(writer.put_request(request_record(i)) for i in range(1, 51))
        assert accepted == 10
        assert writer.pending == 10
        assert writer.records_dropped == 40
        backend.failing = False
        await asyncio.wait_for(writer.flush(), 5)
        assert await stored(backend) == 11
    finally:
        await writer.close()


async def test_close_commits_everything_queued(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend, flush_interval=10.0)
    writer.start()
    for i in range(20):
        writer.put_request(request_record(i))
    await writer.close()
    assert await stored(backend) == 20
    assert not writer.running


async def test_close_gives_up_on_dead_storage_and_counts_the_loss(
    backend: FlakyBackend,
) -> None:
    writer = RecordWriter(backend, flush_interval=0.01, close_timeout=0.2)
    writer.start()
    backend.failing = True
    for i in range(3):
        writer.put_request(request_record(i))
    await asyncio.wait_for(writer.close(), 2)
    assert not writer.running
    assert writer.records_dropped == 3
    assert writer.write_errors > 0
    assert await stored(backend) == 0


async def test_flush_before_start_is_an_error(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend)
    writer.put_request(request_record())
    with pytest.raises(RuntimeError, match="not running"):
        await writer.flush()


# -- a poisoned batch, and the byte bounds ------------------------------------------------


async def test_a_poisoned_batch_is_salvaged_item_by_item(
    backend: FlakyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    writer = RecordWriter(backend, flush_interval=10.0)
    writer.start()
    caplog.set_level(logging.ERROR, logger="aiohttp_session_store.writer")
    try:
        good = [request_record(i) for i in range(3)]
        for req in good:
            writer.put_request(req)
            writer.put_response(response_record(req))
        # A response to a request that was never stored: a foreign-key violation, which
        # retrying cannot cure. It must not take the six good records down with it.
        orphan = response_record(request_record(99))
        writer.put_response(orphan)
        await writer.flush()
        exchanges = await backend.list_exchanges(RequestQuery())
        assert sorted(e.request.request_id for e in exchanges) == sorted(r.request_id for r in good)
        assert all(e.response is not None for e in exchanges)
        assert writer.records_written == 6
        assert writer.records_dropped == 1
        assert writer.write_errors == 2  # the batch, then the bad item alone
        assert any("item by item" in r.getMessage() for r in caplog.records)
    finally:
        await writer.close()


def big_request(i: int, body_bytes: int) -> RequestRecord:
    return dataclasses.replace(request_record(i), openai_request="x" * body_bytes)


async def test_queued_bytes_stay_bounded_while_storage_fails(backend: FlakyBackend) -> None:
    limit = 8 * 1024 * 1024
    writer = RecordWriter(backend, flush_interval=0.01, max_pending=10_000, max_pending_bytes=limit)
    writer.start()
    backend.failing = True
    try:
        accepted = 0
        for i in range(200):  # 100 MiB offered, far under the record count bound
            accepted += writer.put_request(big_request(i, 512 * 1024))
            assert writer.pending_bytes <= limit
            await asyncio.sleep(0)
        assert 0 < accepted <= limit // (512 * 1024)
        assert writer.records_dropped == 200 - accepted
        backend.failing = False
        await asyncio.wait_for(writer.flush(), 10)
        assert await stored(backend) == accepted
        assert writer.pending_bytes == 0
    finally:
        await writer.close()


async def test_a_batch_is_bounded_in_bytes(backend: FlakyBackend) -> None:
    writer = RecordWriter(backend, flush_interval=10.0, max_batch_bytes=300 * 1024)
    writer.start()
    try:
        for i in range(10):
            writer.put_request(big_request(i, 100 * 1024))
        await writer.flush()
        assert await stored(backend) == 10
        # Two records of ~100 KiB fit under 300 KiB, a third does not.
        assert backend.batches == [2, 2, 2, 2, 2]
    finally:
        await writer.close()


async def test_a_full_batch_does_not_linger(backend: FlakyBackend) -> None:
    # A long flush interval: only the byte bound can make this commit happen now.
    writer = RecordWriter(backend, flush_interval=30.0, max_batch_bytes=64 * 1024)
    writer.start()
    try:
        for i in range(4):
            writer.put_request(big_request(i, 32 * 1024))
        for _ in range(200):
            if backend.batches:
                break
            await asyncio.sleep(0.01)
        assert backend.batches, "a full batch waited for the flush interval"
    finally:
        await writer.close()


async def test_records_keep_their_order_across_byte_bounded_batches(
    backend: FlakyBackend,
) -> None:
    # A response is never committed before its request, whatever the batch boundaries.
    writer = RecordWriter(backend, flush_interval=10.0, max_batch_bytes=20 * 1024)
    writer.start()
    try:
        for i in range(12):
            req = big_request(i, 9 * 1024)
            writer.put_request(req)
            writer.put_upstream_request(req.request_id, '{"up": true}')
            writer.put_response(response_record(req))
        await writer.flush()
        assert writer.records_dropped == 0
        assert writer.write_errors == 0
        exchanges = await backend.list_exchanges(RequestQuery())
        assert len(exchanges) == 12
        assert all(e.response is not None for e in exchanges)
        assert all(e.request.upstream_request == '{"up": true}' for e in exchanges)
        assert len(backend.batches) > 1
    finally:
        await writer.close()
