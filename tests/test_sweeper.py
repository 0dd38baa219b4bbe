"""Sweeper: the periodic expiry task, its idempotent start/stop and its survival of failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from aiohttp_session_store.sweeper import Sweeper


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_sweeps_periodically_until_stopped() -> None:
    calls = 0

    async def sweep() -> None:
        nonlocal calls
        calls += 1

    sweeper = Sweeper(sweep, 0.01)
    assert not sweeper.running
    sweeper.start()
    sweeper.start()  # idempotent: one timer
    assert sweeper.running
    await until(lambda: calls >= 3)
    await sweeper.close()
    assert not sweeper.running
    stopped_at = calls
    await asyncio.sleep(0.05)
    assert calls == stopped_at
    sweeper.stop()  # idempotent after close too
    await sweeper.close()


async def test_a_failing_sweep_is_counted_logged_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def sweep() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk I/O error (simulated)")

    caplog.set_level(logging.ERROR, logger="aiohttp_session_store")
    sweeper = Sweeper(sweep, 0.01)
    sweeper.start()
    try:
        await until(lambda: calls >= 2)
        assert sweeper.errors == 1
        assert sweeper.running  # the timer survived the failure
        assert any("simulated" in (r.exc_text or "") for r in caplog.records)
    finally:
        await sweeper.close()


async def test_start_needs_a_running_loop() -> None:
    async def sweep() -> None:
        return None

    sweeper = Sweeper(sweep, 1.0)
    loop = asyncio.get_running_loop()
    with pytest.raises(RuntimeError):
        await loop.run_in_executor(None, sweeper.start)
    assert not sweeper.running


async def test_close_propagates_its_own_cancellation() -> None:
    async def sweep() -> None:
        await asyncio.sleep(10)  # a sweep that outlasts the caller

    sweeper = Sweeper(sweep, 0.001)
    sweeper.start()
    await asyncio.sleep(0.02)  # the timer is inside a sweep now
    closer = asyncio.ensure_future(sweeper.close())
    await asyncio.sleep(0)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    await sweeper.close()
    assert not sweeper.running
