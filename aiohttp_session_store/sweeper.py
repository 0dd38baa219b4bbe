"""The expiry sweeper: one task that runs a sweep every `interval` seconds on the app loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

__all__ = ("Sweeper",)

log: Final = logging.getLogger("aiohttp_session_store.manager")


class Sweeper:
    """Calls `sweep()` every `interval` seconds; a failed sweep is logged, counted, retried."""

    def __init__(self, sweep: Callable[[], Awaitable[object]], interval: float) -> None:
        self._sweep = sweep
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.errors = 0

    def start(self) -> None:
        """Start the timer on the running loop (idempotent; RuntimeError without a loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="aiohttp_session_store.sweeper"
            )

    def stop(self) -> None:
        """Stop the timer (idempotent); `close()` also waits for it to end."""
        if self._task is not None:
            self._task.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        self.stop()
        if self._task is not None:
            # wait(), not `await task`: the task's own cancellation is expected, while a
            # cancellation of close() itself must still propagate.
            await asyncio.wait({self._task})
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed sweep must not end the timer: the next one retries.
                self.errors += 1
                log.exception("session sweep failed; retrying in %ss", self.interval)
