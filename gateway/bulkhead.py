"""Bounded concurrency per provider with a bounded wait queue.

A provider that slows down must not soak up every coroutine of the gateway: past
`max_concurrent` calls, up to `max_queue` wait; beyond that the provider counts as unavailable
for this payment and the router fails over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class BulkheadFull(Exception):
    """No slot and no room to wait: nothing was sent."""


class BulkheadTimeout(Exception):
    """No slot freed up before the request's deadline: nothing was sent."""


class Bulkhead:
    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._sem = asyncio.Semaphore(max_concurrent)
        self.active = 0
        self.waiting = 0

    @property
    def full(self) -> bool:
        return self.active >= self.max_concurrent and self.waiting >= self.max_queue

    @asynccontextmanager
    async def slot(self, deadline: float) -> AsyncIterator[None]:
        """A slot, waiting at most until `deadline` (event-loop time, as time.monotonic)."""
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise BulkheadFull(f"{self.active} calls running, {self.waiting} waiting")
        self.waiting += 1
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
                await self._sem.acquire()
        except TimeoutError:
            raise BulkheadTimeout(f"no slot before the deadline ({self.active} calls running)") from None
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._sem.release()
