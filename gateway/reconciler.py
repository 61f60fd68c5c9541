"""The reconciler: owns every payment left `attempting` (a crash) or `pending` (an unknown
outcome), settles it with a status query at the provider that holds the attempt, and stores
the final answer for the caller's idempotency key.

Runs once at start (after a crash) and then periodically. Card data is never journalled, so a
payment the provider never saw is closed as `failed` (nothing charged) rather than re-sent.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from gateway.executor import MIN_TRY_S, attempt_outcome
from gateway.journal.records import Attempt, PaymentRecord
from domain.outcome import Outcome, PaymentStatus
from gateway.orchestrator import PaymentService
from gateway.payment_view import payment_answer
from domain.types import FollowUp, Operation
from providers.classify import result_from_transport_error
from providers.errors import TransportError


MIN_RECHECK_S = 5.0
MAX_RECHECK_S = 300.0
LOOKUP_LAG_S = 600.0  # beyond any provider's search-index lag
IN_FLIGHT_S = 60.0  # beyond any request still travelling to or running at a provider


class Reconciler:
    """`abandoned_after_s` must exceed the longest time any replica may still be working on a
    payment (the request deadline plus a margin): before that, a `received` or `attempting`
    row may belong to a live request elsewhere, and settling it could race that request."""

    def __init__(self, service: PaymentService, *, abandoned_after_s: float,
                 log: structlog.typing.FilteringBoundLogger, interval_s: float = 5.0, min_age_s: float = 2.0) -> None:
        self.service = service
        self.abandoned_after_s = abandoned_after_s
        self.log = log
        self.interval_s = interval_s
        self.min_age_s = min_age_s
        self.wake = asyncio.Event()
        self._next_check: dict[str, tuple[float, float]] = {}  # payment id -> (next check, last delay)
        self._pass = asyncio.Lock()  # one pass at a time: two would settle and log a payment twice

    async def run_forever(self) -> None:
        woken = False
        while True:
            try:
                await self.run_once(ignore_backoff=woken)  # an operator's "reconcile now" asks everyone
                await self.service.store.purge_expired_idempotency(time.time())
            except Exception as exc:  # a bad pass must not end reconciliation for good
                self.log.exception("reconciler_pass_failed", error=type(exc).__name__)
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            woken = self.wake.is_set()
            self.wake.clear()

    async def run_once(self, *, min_age_s: float | None = None, abandoned_after_s: float | None = None,
                       ignore_backoff: bool = False) -> int:
        """Settle what can be settled now; returns how many payments reached a final state."""
        async with self._pass:
            return await self._run_once(min_age_s, abandoned_after_s, ignore_backoff)

    async def _run_once(self, min_age_s: float | None, abandoned_after_s: float | None,
                        ignore_backoff: bool) -> int:
        age = self.min_age_s if min_age_s is None else min_age_s
        abandoned = self.abandoned_after_s if abandoned_after_s is None else abandoned_after_s
        settled = 0
        now = time.time()
        unresolved = await self.service.store.unresolved_payments()
        for gone in self._next_check.keys() - {r.id for r in unresolved}:
            del self._next_check[gone]  # settled elsewhere (another replica, a request)
        for record in unresolved:
            due = self._next_check.get(record.id, (0.0, 0.0))[0]
            if record.id in self.service.in_flight or (not ignore_backoff and due > now):
                continue
            if record.status is PaymentStatus.PENDING:
                if now - record.updated_at < age:
                    continue
            elif now - record.created_at < abandoned:
                # Received or attempting: another replica (or this one's request) may still be
                # working on it. Only past its deadline is its process known to be gone.
                continue
            try:
                done = await self._settle(record)
            except Exception as exc:  # one payment's trouble must not stop the others
                self.log.exception("reconcile_failed", payment_id=record.id, provider=record.provider,
                                   error=type(exc).__name__)
                done = False
                await self._touch(record)
            if done:
                settled += 1
                self._next_check.pop(record.id, None)
            else:
                self._back_off(record.id, now)
        return settled

    def _back_off(self, payment_id: str, now: float) -> None:
        """Unsettled payments are asked again less and less often (up to every 5 minutes), so
        a provider that cannot answer is not queried in a tight loop."""
        last_delay = self._next_check.get(payment_id, (0.0, 0.0))[1]
        delay = MIN_RECHECK_S if last_delay == 0 else min(MAX_RECHECK_S, 2 * last_delay)
        self._next_check[payment_id] = (now + delay, delay)

    async def _touch(self, record: PaymentRecord) -> None:
        """Move a row we could not settle behind the others (the store lists the oldest first),
        so a batch of stuck rows cannot starve newer ones."""
        try:
            record.updated_at = time.time()
            await self.service.store.save_payment(record)
        except Exception as exc:
            self.log.warning("reconcile_touch_failed", payment_id=record.id, error=type(exc).__name__)

    async def _settle(self, record: PaymentRecord) -> bool:
        svc = self.service
        if record.provider is None:
            record.status, record.error_code = PaymentStatus.FAILED, "interrupted_before_provider_call"
        elif record.provider not in svc.pool:
            self.log.error("reconcile_unknown_provider", payment_id=record.id, provider=record.provider)
            await self._touch(record)
            return False
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
            last = record.attempts[-1] if record.attempts else None
            if last is not None and last.try_number == 0 and last.operation == Operation.STATUS.value:
                record.attempts[-1] = attempt  # keep the latest check only: the row must not grow per pass
            else:
                record.attempts.append(attempt)
            if not result.found and _absence_proves_no_charge(record, handle.mapping.status_query_consistent):
                record.status, record.error_code = PaymentStatus.FAILED, "not_charged"
            elif result.found and result.outcome is Outcome.APPROVED:
                record.status, record.provider_reference = PaymentStatus.APPROVED, result.reference
                record.outcome = result.outcome.value
                if record.capture:
                    record.captured_amount = record.amount
            elif result.found and result.outcome.is_decline:
                record.status, record.decline_code, record.outcome = PaymentStatus.DECLINED, result.raw_code, result.outcome.value
            else:
                taking_over = record.status is not PaymentStatus.PENDING
                record.status = PaymentStatus.PENDING  # the reconciler owns it; asked again later
                record.updated_at = time.time()
                if taking_over:
                    # A crashed request never wrote its payment line: this is that one line. Its
                    # key now replays "pending" instead of 409 until the payment settles.
                    await svc.store.complete_idempotency_for(record.id, payment_answer(record))
                    line = svc.transaction_line(record, "payment")
                    await svc.store.save_payment(record, outbox=line)
                    svc.log_transaction(record, "payment", line)
                else:
                    await svc.store.save_payment(record)
                return False
        record.updated_at = time.time()
        # The keys' stored answer first: a crash before the final row leaves a payment the next
        # pass settles the same way, never a final payment whose keys still say "in flight".
        await svc.store.complete_idempotency_for(record.id, payment_answer(record))
        line = svc.transaction_line(record, "reconciliation")
        await svc.store.save_payment(record, outbox=line)  # the final row and its log line commit together
        svc.log_transaction(record, "reconciliation", line)
        svc.metrics.reconciled.labels(record.status.value).inc()
        return True


def _absence_proves_no_charge(record: PaymentRecord, lookup_consistent: bool) -> bool:
    """An empty status answer means "never charged" only once the last call to the provider is
    old enough that nothing can still be in flight or unindexed: a minute where the lookup has
    no lag, ten where a search index may lag. Never for a payment we hold a provider id for."""
    if record.provider_reference is not None:
        return False
    calls = [a.started_at for a in record.attempts
             if a.provider == record.provider and a.operation == Operation.AUTHORIZE.value]
    last_call = max(calls, default=record.created_at)
    return time.time() - last_call > (IN_FLIGHT_S if lookup_consistent else LOOKUP_LAG_S)
