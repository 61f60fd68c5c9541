"""A journal that cannot take more work sheds the request: 503 with Retry-After and
`{"code": "overloaded"}`, counted in `gateway_shed_total{reason="journal"}`, nothing half-done.

Real SQLite: the test holds the database's write lock from a connection of its own, so the
store's writer thread waits on it, and fills the store's (configured, tiny) write queue through
the store's own API until the store refuses; then a payment comes in.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.app_keys import STORE
from gateway.journal.errors import StoreOverloaded
from gateway.journal.store import Store
from tests.conftest import AUTH, card_payment

QUEUE_SIZE = 2


@asynccontextmanager
async def write_lock(path: Path) -> AsyncIterator[None]:
    """Another writer holding the database (the writer thread's BEGIN IMMEDIATE waits on it,
    up to its busy timeout of 5 s: far longer than the test needs)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
        yield
        await asyncio.to_thread(conn.execute, "ROLLBACK")
    finally:
        await asyncio.to_thread(conn.close)


async def fill(store: Store) -> list[asyncio.Task[object]]:
    """Reads queued until the store refuses one: the writer thread holds one batch, blocked on
    the lock, and the queue is full behind it."""
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

    async with write_lock(Path(config.storage.sqlite_path)):
        queued = await fill(client.app[STORE])
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
