"""Bounded concurrency per provider with a bounded wait queue.

A provider that slows down must not soak up every coroutine of the gateway: past
`max_concurrent` calls, up to `max_queue` wait; beyond that the provider counts as unavailable
for this payment and the router fails over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class BulkheadFull(Exception):
    """No slot and no room to wait: nothing was sent."""


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
    async def slot(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise BulkheadFull(f"{self.active} calls running, {self.waiting} waiting")
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._sem.release()
