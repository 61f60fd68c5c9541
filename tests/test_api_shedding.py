"""A journal that cannot take more work sheds the request: 503 with Retry-After and
`{"code": "overloaded"}`, counted in `gateway_shed_total{reason="journal"}`, nothing half-done.

Real SQLite: the test keeps the store's writer thread busy with one slow operation, fills the
store's (configured, tiny) write queue through the store's own API until the store refuses;
then a payment comes in.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.app_keys import STORE
from gateway.journal.errors import StoreOverloaded
from gateway.journal.sqlite import SqliteStore
from gateway.journal.store import Store
from tests.conftest import AUTH, card_payment

QUEUE_SIZE = 2


@asynccontextmanager
async def writer_busy(store: SqliteStore) -> AsyncIterator[None]:
    """The store's writer thread busy with one operation that waits for the test (like a slow
    disk), known to have started: whatever is queued behind it stays queued until the block ends.
    (Holding the file's write lock instead leaves a race: the queue can look full to the test
    a moment before the writer takes it as its next batch.)"""
    started, release = threading.Event(), threading.Event()

    def hold(_conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    held = asyncio.ensure_future(store._submit(hold))
    assert await asyncio.to_thread(started.wait, 5)
    try:
        yield
    finally:
        release.set()
        await held


async def fill(store: Store) -> list[asyncio.Task[object]]:
    """Reads queued until the store refuses one: the writer thread is busy, and the queue is
    full behind it."""
    queued: list[asyncio.Task[object]] = []
    for _ in range(100):
        task = asyncio.create_task(store.get_payment("pay_filler"))
        await asyncio.sleep(0)  # run it up to its put on the queue
        if task.done() and isinstance(task.exception(), StoreOverloaded):
            return queued
        queued.append(task)
    raise AssertionError("the write queue never filled")


async def test_a_full_journal_answers_503_with_retry_after(make_config, start_gateway, emulators) -> None:
    config = make_config(storage={"sqlite_queue_size": QUEUE_SIZE})
    client = await start_gateway(config)
    headers = {**AUTH, "Idempotency-Key": str(uuid.uuid4())}

    store = client.app[STORE]
    assert isinstance(store, SqliteStore)
    async with writer_busy(store):
        queued = await fill(store)
        resp = await client.post("/v1/payments", json=card_payment(), headers=headers)

        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        doc = await resp.json()
        assert doc == {"code": "overloaded", "message": doc["message"], "field": None}

    assert await asyncio.gather(*queued) == [None] * len(queued)  # the queued work still ran
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_shed_total{reason="journal"} 1.0' in metrics
    assert emulators["stripe"].emulator.ledger.charges() == []
    # nothing was claimed: the caller's retry with the same key is a new payment
    retry = await client.post("/v1/payments", json=card_payment(), headers=headers)
    assert retry.status == 201
    assert len(emulators["stripe"].emulator.ledger.charges()) == 1
