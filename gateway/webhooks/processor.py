"""The webhook processor: applies journalled provider events to their payments, from the journal.

Each pass leases pending events (`Store.lease_webhook_events`: FOR UPDATE SKIP LOCKED on
PostgreSQL, the write lock on SQLite, so replicas and workers split them and a dead one's are
taken over when its lease runs out), finds each event's payment and lets `rules.decide` say what
it does. A change is written with the payment's conditional write: a `StaleWrite` (a request,
the reconciler or another replica wrote the payment meanwhile) re-reads and decides again, so
nothing is ever overwritten. Each applied event writes its transaction-log line through the
outbox like every settlement (`PaymentService.commit`), then the event is marked done; a crash
in between applies it again on the next pass, which finds the payment settled and changes
nothing. An event for a payment we do not know (of a kind we act on) is kept as an `orphan` (ops line, metric,
`gateway webhooks orphans`), never dropped.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

import structlog

from domain.outcome import Outcome
from domain.types import ProviderResult
from domain.webhook import EventKind
from gateway import answers
from gateway.journal.errors import StaleWrite
from gateway.journal.records import PaymentRecord
from gateway.journal.webhook_events import WebhookEventRecord, WebhookState
from gateway.notifications.events import Settling
from gateway.orchestrator import STALE_RETRIES, PaymentService, payment_id_of
from gateway.webhooks.metrics import WebhookMetrics
from gateway.webhooks.rules import Decision, Effect, decide

BATCH = 100
LEASE_S = 60.0  # beyond a pass over BATCH events (a few journal writes each)


class WebhookProcessor:
    def __init__(self, service: PaymentService, metrics: WebhookMetrics, *,
                 log: structlog.typing.FilteringBoundLogger, interval_s: float = 1.0) -> None:
        self.service = service
        self.metrics = metrics
        self.log = log
        self.interval_s = interval_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.wake = asyncio.Event()  # set by the route when it journalled something new
        self._pass = asyncio.Lock()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # a bad pass must not end processing for good
                self.log.exception("webhook_pass_failed", error=type(exc).__name__)
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self.wake.clear()

    async def run_once(self) -> int:
        """Apply what can be applied now; returns how many events were done with (any state)."""
        async with self._pass:
            done = 0
            for event in await self.service.store.lease_webhook_events(self.owner, LEASE_S, limit=BATCH):
                try:
                    done += await self._process(event)
                except Exception as exc:  # one event's trouble must not stop the others
                    self.log.exception("webhook_event_failed", provider=event.provider, event_id=event.event_id,
                                       error=type(exc).__name__)
            return done

    async def _process(self, event: WebhookEventRecord) -> bool:
        """Decide and write; False when the event must wait (it stays pending, leased to us)."""
        reference = event.event.payment_reference or event.event.follow_up_reference
        payment_id = payment_id_of(reference) if reference else None
        for _ in range(STALE_RETRIES):
            record = await self.service.store.get_payment(payment_id) if payment_id else None
            if record is None and event.event.kind is EventKind.OTHER:
                return await self._finish(event, WebhookState.UNCHANGED, None, f"{event.event.type}: not acted on")
            if record is None:
                self.log.warning("webhook_orphan", provider=event.provider, event_id=event.event_id,
                                 type=event.event.type, reference=reference,
                                 provider_reference=event.event.provider_reference)
                return await self._finish(event, WebhookState.ORPHAN, None, "no such payment")
            if record.id in self.service.in_flight:
                return False  # a request of this process is writing it: after that
            before = Settling.of(record)  # the checkout is notified of what this event settles
            decision = decide(record, event.provider, event.event)
            if decision.effect is Effect.WAIT:
                return False
            if decision.alarm:
                self.log.error("webhook_contradicts_journal", provider=event.provider, event_id=event.event_id,
                               payment_id=record.id, status=record.status.value, detail=decision.outcome)
            if decision.effect is Effect.NONE:
                return await self._finish(event, WebhookState.UNCHANGED, record.id, decision.outcome)
            try:
                await self._commit(record, event, decision, before)
            except StaleWrite:
                continue  # written meanwhile: read it again and decide again
            return await self._finish(event, WebhookState.APPLIED, record.id, decision.outcome)
        return False

    async def _commit(self, record: PaymentRecord, event: WebhookEventRecord, decision: Decision,
                      before: Settling) -> None:
        """The one place a webhook changes a payment: the keys' answers, then the row with its
        transaction-log line and the merchant notification of what it settled (one
        transaction), as the reconciler settles."""
        svc = self.service
        record.updated_at = time.time()
        if decision.effect is Effect.SUSPECT:
            svc.suspect_duplicate(record, _suspicion(event))
        elif decision.effect is Effect.PAYMENT:
            await svc.store.complete_idempotency_for(record.id, answers.payment_answer(record).stored())
        elif decision.provider_key is not None:
            assert decision.operation is not None and decision.result is not None
            await svc.store.complete_idempotency_for(decision.provider_key, answers.follow_up_answer(
                record, decision.operation, decision.result).stored())
        extra: dict[str, object] = {"webhook": {"provider": event.provider, "event_id": event.event_id,
                                                "type": event.event.type, "outcome": decision.outcome}}
        if decision.operation is not None:
            extra["follow_up"] = {"operation": decision.operation.value, "amount": event.event.amount,
                                  "outcome": decision.result.outcome.value if decision.result else None}
        await svc.commit(record, "webhook", settled_from=before, **extra)

    async def _finish(self, event: WebhookEventRecord, state: WebhookState, payment_id: str | None,
                      outcome: str) -> bool:
        event.state, event.payment_id, event.outcome, event.processed_at = state, payment_id, outcome, time.time()
        await self.service.store.finish_webhook_event(event)
        self.metrics.processed.labels(event.provider, state.value).inc()
        return True


def _suspicion(event: WebhookEventRecord) -> ProviderResult:
    return ProviderResult(Outcome.UNKNOWN, message=f"{event.provider} notified a charge ({event.event.type})")
