"""The fleet contract with real processes: one writer per payment, one holder per follow-up, one
owner per orphan, when the writers are separate processes on one database (the SQLite file that
`serve --workers N` shares, and PostgreSQL).

Each child process opens its own store on the database, and the children meet at a barrier
before each step, so their reads and writes overlap for real. Each step's result comes back on
a queue; the parent checks the database afterwards.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from domain.outcome import PaymentStatus
from gateway.journal.records import ClaimKind
from gateway.journal.errors import StaleWrite
from tests.conftest import Database, payment, pg_schema

PROCESSES = 3
ORPHANS = 40
STEP_TIMEOUT_S = 30.0


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        yield Database("sqlite", str(tmp_path / "journal.db"))
    else:
        async with pg_schema() as dsn:
            yield Database("postgres", dsn)


def child(database: Database, number: int, payment_id: str, barrier: Any, results: Any) -> None:
    """One process of the fleet: read, wait for the others, write; claim; lease."""
    asyncio.run(_child(database, number, payment_id, barrier, results))


async def _child(database: Database, number: int, payment_id: str, barrier: Any, results: Any) -> None:
    store = database.store()
    await store.open()
    try:
        record = await store.get_payment(payment_id)
        assert record is not None
        record.status, record.provider = PaymentStatus.APPROVED, f"writer-{number}"
        barrier.wait(STEP_TIMEOUT_S)  # every process has read version 1
        try:
            await store.save_payment(record)
            results.put(("write", number, "ok"))
        except StaleWrite:
            results.put(("write", number, "stale"))

        barrier.wait(STEP_TIMEOUT_S)  # every write is done: read the row again, all at version 2
        current = await store.get_payment(payment_id)
        assert current is not None
        current.status = PaymentStatus.REFUND_PENDING  # a follow-up's claim: key and row in one write
        barrier.wait(STEP_TIMEOUT_S)
        now = time.time()
        try:
            claim = await store.claim_idempotency("checkout", f"refund-of-{number}", "f" * 64, f"refund-{number}",
                                                  now, now + 60, current)
            results.put(("follow_up", number, claim.kind is ClaimKind.NEW))
        except StaleWrite:
            results.put(("follow_up", number, False))

        barrier.wait(STEP_TIMEOUT_S)
        leased = await store.lease_unresolved(f"replica-{number}", 60, limit=ORPHANS)
        results.put(("lease", number, [r.id for r in leased]))
    finally:
        await store.close()


async def test_processes_on_one_database_have_one_writer_one_claimant_one_lease_owner(database: Database) -> None:
    store = database.store()
    await store.open()  # creates the schema once, before the children start
    record = payment()
    orphans = [payment(status=PaymentStatus.PENDING, updated_at=time.time() - 100 + i) for i in range(ORPHANS)]
    try:
        for r in (record, *orphans):
            await store.save_payment(r)
    finally:
        await store.close()

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=child, args=(database, n, record.id, barrier, results), name=f"fleet-{n}")
             for n in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [await asyncio.to_thread(results.get, True, STEP_TIMEOUT_S) for _ in range(3 * PROCESSES)]
        for proc in procs:
            await asyncio.to_thread(proc.join, STEP_TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES

    by_step: dict[str, dict[int, Any]] = {}
    for step, number, value in outcomes:
        by_step.setdefault(step, {})[number] = value
    writes = by_step["write"]
    [winner] = [n for n, value in writes.items() if value == "ok"]
    assert sorted(writes.values()) == ["ok"] + ["stale"] * (PROCESSES - 1)
    assert sum(by_step["follow_up"].values()) == 1
    leases = by_step["lease"].values()
    # The winning follow-up left the payment itself refund_pending: unresolved, leased like the orphans.
    assert sorted(sum(leases, [])) == sorted([record.id, *(r.id for r in orphans)]), "every row has exactly one owner"

    store = database.store()
    await store.open()
    try:
        got = await store.get_payment(record.id)
    finally:
        await store.close()
    # the one write, then the one follow-up claim that moved it on: version 3, the winner's provider kept
    assert got is not None and got.provider == f"writer-{winner}" and got.version == 3
    assert got.status is PaymentStatus.REFUND_PENDING
