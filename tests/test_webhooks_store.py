"""The journal's webhook events on both backends: one row per (provider, event id), leases that
split the pending events between owners (as between replicas or workers), only the redacted
parsed event stored."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from domain.webhook import EventKind, ProviderEvent
from gateway.journal.webhook_events import WebhookEventRecord, WebhookState
from tests.conftest import Backend, Database, pg_schema

CARD = "4111111145551142"


def event(event_id: str, provider: str = "adyen", reason: str | None = None,
          payment_reference: str = "pay_abc") -> WebhookEventRecord:
    return WebhookEventRecord(provider, ProviderEvent(event_id, EventKind.AUTHORISATION, "AUTHORISATION", True,
                                                      payment_reference, provider_reference="PSP1", amount=1299,
                                                      currency="EUR", reason=reason), time.time())


async def test_each_event_is_journalled_once_per_provider(backend: Backend) -> None:
    store = backend.store
    assert await store.journal_webhook_events([event("e1"), event("e2")]) == 2
    assert await store.journal_webhook_events([event("e2"), event("e3"), event("e3")]) == 1
    assert await store.journal_webhook_events([event("e1", provider="stripe")]) == 1  # another provider's e1
    assert sorted((e.provider, e.event_id) for e in await store.webhook_events()) == [
        ("adyen", "e1"), ("adyen", "e2"), ("adyen", "e3"), ("stripe", "e1")]


async def test_leases_split_pending_events_and_a_finished_one_is_never_leased_again(backend: Backend) -> None:
    store, replica = backend.store, backend.new_store()
    await replica.open()
    try:
        await store.journal_webhook_events([event(f"e{i}") for i in range(4)])
        mine = await store.lease_webhook_events("one", 60, limit=3)
        theirs = await replica.lease_webhook_events("two", 60)
        assert len(mine) == 3 and len(theirs) == 1
        assert {e.event_id for e in mine}.isdisjoint(e.event_id for e in theirs)
        assert len(await store.lease_webhook_events("one", 60)) == 3  # renewed, not doubled
        done = mine[0]
        done.state, done.payment_id, done.outcome, done.processed_at = (WebhookState.APPLIED, "pay_abc", "approved",
                                                                         time.time())
        await store.finish_webhook_event(done)
        await store.lease_webhook_events("one", 0)  # a lease that has run out...
        taken = await replica.lease_webhook_events("two", 60)  # ...is taken over
        assert sorted(e.event_id for e in taken) == sorted(e.event_id for e in mine[1:] + theirs)
        [applied] = await store.webhook_events(WebhookState.APPLIED)
        assert (applied.event_id, applied.payment_id, applied.outcome) == (done.event_id, "pay_abc", "approved")
        assert applied.event == done.event
    finally:
        await replica.close()


async def test_only_the_redacted_parsed_event_is_stored(backend: Backend) -> None:
    """The reason, and a reference the provider echoes that is not one of ours (an orphan's: the
    outside tester's signed `pay_unk_<card number>` was kept verbatim), are redacted."""
    await backend.store.journal_webhook_events([event("e1", reason=f"card {CARD} refused"),
                                                event("e2", payment_reference=f"pay_unk_{CARD}")])
    stored = {e.event_id: e for e in await backend.store.webhook_events()}
    assert CARD not in (stored["e1"].event.reason or "") and stored["e1"].event.reason
    assert CARD not in (stored["e2"].event.payment_reference or "") and stored["e2"].event.payment_reference
    assert stored["e1"].event.payment_reference == "pay_abc"  # one of ours: verbatim
    if backend.kind == "sqlite":  # every byte of the file (PostgreSQL's `stored` lists other tables)
        assert CARD.encode() not in await backend.stored()


# -- with real processes: the leases hold across the workers or replicas on one database ------------

PROCESSES = 3
EVENTS = 60
STEP_TIMEOUT_S = 30.0


def _lease_child(database: Database, number: int, barrier: Any, results: Any) -> None:
    asyncio.run(_lease(database, number, barrier, results))


async def _lease(database: Database, number: int, barrier: Any, results: Any) -> None:
    store = database.store()
    await store.open()
    try:
        barrier.wait(STEP_TIMEOUT_S)  # all open: lease together
        leased = await store.lease_webhook_events(f"worker-{number}", 60, limit=EVENTS)
        results.put((number, [e.event_id for e in leased]))
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_processes_leasing_together_get_disjoint_events(kind: str, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        where = str(tmp_path / "journal.db") if kind == "sqlite" else await stack.enter_async_context(pg_schema())
        database = Database(kind, where)
        store = database.store()
        await store.open()
        try:
            await store.journal_webhook_events([event(f"e{i}") for i in range(EVENTS)])
        finally:
            await store.close()
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_lease_child, args=(database, n, barrier, results)) for n in range(PROCESSES)]
        for proc in procs:
            proc.start()
        try:
            leased = [await asyncio.to_thread(results.get, True, STEP_TIMEOUT_S) for _ in range(PROCESSES)]
            for proc in procs:
                await asyncio.to_thread(proc.join, STEP_TIMEOUT_S)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
        assert [proc.exitcode for proc in procs] == [0] * PROCESSES
        every = sum((ids for _n, ids in leased), [])
        assert sorted(every) == sorted(f"e{i}" for i in range(EVENTS)), "each event has exactly one owner"
