"""The reconciler: owns every payment left `attempting` (a crash) or `pending` (an unknown
outcome), settles it with a status query at the provider that holds the attempt, and stores
the final answer for the caller's idempotency key.

Runs once at start (after a crash) and then periodically. Card data is never journalled, so a
payment the provider never saw is closed as `failed` (nothing charged) rather than re-sent.
"""

from __future__ import annotations

import asyncio
import time

from gateway.executor import MIN_TRY_S, attempt_outcome
from gateway.journal.records import Attempt
from gateway.outcome import Outcome, PaymentStatus
from gateway.orchestrator import PaymentService
from gateway.payment_view import payment_answer
from providers.base import FollowUp, Operation
from providers.classify import result_from_transport_error
from providers.errors import TransportError


class Reconciler:
    """`abandoned_after_s` must exceed the longest time any replica may still be working on a
    payment (the request deadline plus a margin): before that, a `received` or `attempting`
    row may belong to a live request elsewhere, and settling it could race that request."""

    def __init__(self, service: PaymentService, *, abandoned_after_s: float, interval_s: float = 5.0,
                 min_age_s: float = 2.0) -> None:
        self.service = service
        self.abandoned_after_s = abandoned_after_s
        self.interval_s = interval_s
        self.min_age_s = min_age_s
        self.wake = asyncio.Event()

    async def run_forever(self) -> None:
        while True:
            await self.run_once()
            await self.service.store.purge_expired_idempotency(time.time())
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self.wake.clear()

    async def run_once(self, *, min_age_s: float | None = None, abandoned_after_s: float | None = None) -> int:
        """Settle what can be settled now; returns how many payments reached a final state."""
        age = self.min_age_s if min_age_s is None else min_age_s
        abandoned = self.abandoned_after_s if abandoned_after_s is None else abandoned_after_s
        settled = 0
        now = time.time()
        for record in await self.service.store.unresolved_payments():
            if record.id in self.service.in_flight:
                continue
            if record.status is PaymentStatus.PENDING:
                if now - record.updated_at < age:
                    continue
            elif now - record.created_at < abandoned:
                # Received or attempting: another replica (or this one's request) may still be
                # working on it. Only past its deadline is its process known to be gone.
                continue
            if await self._settle(record):
                settled += 1
        return settled

    async def _settle(self, record) -> bool:  # type: ignore[no-untyped-def]
        svc = self.service
        if record.provider is None:
            record.status, record.error_code = PaymentStatus.FAILED, "interrupted_before_provider_call"
        else:
            handle = svc.pool[record.provider]
            attempt = Attempt(provider=record.provider, try_number=0, operation=Operation.STATUS.value,
                              idempotency_key=None, started_at=time.time(), breaker_state=handle.breaker.state)
            started = time.monotonic()
            request = handle.mapping.build(Operation.STATUS, FollowUp(record.id, record.provider_reference), None)
            try:
                response = await handle.transport.send(request, max(handle.timeout_s, MIN_TRY_S))
                result = handle.mapping.parse(Operation.STATUS, response)
            except TransportError as exc:
                result = result_from_transport_error(exc)
            attempt.outcome, attempt.raw_code, attempt.http_status = attempt_outcome(result), result.raw_code, result.http_status
            attempt.latency_ms = round((time.monotonic() - started) * 1000, 3)
            record.attempts.append(attempt)
            if not result.found:
                record.status, record.error_code = PaymentStatus.FAILED, "not_charged"
            elif result.outcome is Outcome.APPROVED:
                record.status, record.provider_reference = PaymentStatus.APPROVED, result.reference
                record.outcome = result.outcome.value
                if record.capture:
                    record.captured_amount = record.amount
            elif result.outcome.is_decline:
                record.status, record.decline_code, record.outcome = PaymentStatus.DECLINED, result.raw_code, result.outcome.value
            else:
                if record.status is PaymentStatus.ATTEMPTING:
                    record.status = PaymentStatus.PENDING
                    record.updated_at = time.time()
                    await svc.store.save_payment(record)
                return False
        record.updated_at = time.time()
        line = svc.transaction_line(record, "reconciliation")
        await svc.store.save_payment(record, outbox=line)  # the final row and its log line commit together
        svc.log_transaction(record, "reconciliation", line)
        await svc.store.complete_idempotency_for(record.id, payment_answer(record))
        svc.metrics.reconciled.labels(record.status.value).inc()
        return True
