"""The payment flow: route, walk the candidates with the taxonomy's failover rules, journal,
log once.

Rules enforced here, in one place:
- a hard decline never fails over; a soft decline cascades at most once per payment, and only
  for codes the route allows;
- `unavailable` fails over; `unknown` fails over only after the executor's status query showed
  no charge, otherwise the payment is `pending` and the reconciler owns it;
- follow-ups (capture, void, refund) go to the provider that authorised the payment, never to a
  backup.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.executor import AttemptExecutor
from gateway.journal.records import Attempt, IdempotentAnswer, OutboxLine, PaymentRecord, StoredResponse
from gateway.journal.store import Store
from gateway.metrics import Metrics
from domain.outcome import Outcome, PaymentStatus
from gateway.payment_view import payment_answer
from gateway.provider_pool import ProviderPool
from gateway.router import NoRoute, RouteDecision, Router, RoutingFacts
from gateway.txlog.outbox import TransactionLog
from domain.types import FollowUp, Operation, PaymentOrder, ProviderResult


def provider_idempotency_key(payment_id: str, provider: str, operation: str = "auth", salt: str = "") -> str:
    """Deterministic, so a retry after a restart reuses the key the provider already saw."""
    if not salt:
        return f"{payment_id}-{provider}-{operation}"
    return f"{payment_id}-{provider}-{operation}-{hashlib.sha256(salt.encode()).hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class FollowUpOutcome:
    result: ProviderResult
    record: PaymentRecord


FOLLOW_UP_STATUS = {
    Operation.CAPTURE: PaymentStatus.CAPTURED,
    Operation.VOID: PaymentStatus.VOIDED,
    Operation.REFUND: PaymentStatus.REFUNDED,
}


class PaymentService:
    def __init__(self, *, store: Store, pool: ProviderPool, router: Router, executor: AttemptExecutor,
                 metrics: Metrics, txlog: TransactionLog) -> None:
        self.store = store
        self.pool = pool
        self.router = router
        self.executor = executor
        self.metrics = metrics
        self.txlog = txlog
        self.in_flight: set[str] = set()
        # Called with (record, kind, extra) after each transaction line (the live console's window).
        self.observers: list[Callable[[PaymentRecord, str, dict[str, Any]], None]] = []

    def plan(self, record: PaymentRecord, order: PaymentOrder) -> RouteDecision | None:
        """Route in memory before anything is written, and mark the record as attempting its
        first candidate, so the row the front door journals with its key claim already says
        where the first call goes: that write is the first attempt's durable journal entry."""
        brand = order.card.brand if order.card else None
        facts = RoutingFacts(order.amount, order.currency, order.country, brand, order.merchant_reference)
        try:
            decision = self.router.route(facts)
        except NoRoute as exc:
            self._finish(record, PaymentStatus.FAILED, error="no_route")
            record.error_message = str(exc)
            return None
        record.route = decision.route
        for provider, reason in decision.skipped:
            record.attempts.append(Attempt(provider=provider, try_number=0, operation=Operation.AUTHORIZE.value,
                                           idempotency_key=None, started_at=time.time(), outcome="skipped",
                                           raw_code=reason, breaker_state=self.pool[provider].breaker.state))
        if not decision.candidates:
            self._finish(record, PaymentStatus.FAILED, error="no_provider_available")
            return None
        record.status = PaymentStatus.ATTEMPTING
        record.provider = decision.candidates[0]
        record.provider_idempotency_key = provider_idempotency_key(record.id, record.provider)
        return decision

    async def authorize(self, record: PaymentRecord, order: PaymentOrder, decision: RouteDecision | None,
                        deadline: float, *, scope: str, key: str) -> StoredResponse:
        """Run a planned payment to a final or pending state; the journal row and the answer
        that the front-door key (`scope`, `key`) replays are committed together."""
        self.in_flight.add(record.id)
        started = time.monotonic()
        try:
            if decision is not None:
                self.executor.budget.record_request()
                await self._attempt_candidates(record, order, decision, deadline)
            record.updated_at = time.time()
            answer = payment_answer(record)
            extra = {"latency_ms": (time.monotonic() - started) * 1000}
            line = self.transaction_line(record, "payment", **extra)
            await self.store.save_payment(record, IdempotentAnswer(scope, key, answer), line)
        finally:
            self.in_flight.discard(record.id)
        self.metrics.payments.labels(record.status.value).inc()
        self.metrics.payment_latency.observe(time.monotonic() - started)
        self.log_transaction(record, "payment", line, **extra)
        return answer

    async def _attempt_candidates(self, record: PaymentRecord, order: PaymentOrder, decision: RouteDecision,
                                  deadline: float) -> None:
        journalled_by_claim = len(record.attempts)  # the claim's row covers the very first attempt
        cascaded = False
        failover_reason: str | None = None
        last: ProviderResult | None = None
        for position, name in enumerate(decision.candidates):
            handle = self.pool[name]
            key = provider_idempotency_key(record.id, name)
            first_attempt = len(record.attempts)

            async def journal(attempt: Attempt, name: str = name, key: str = key,
                              reason: str | None = failover_reason, first: int = first_attempt) -> None:
                if attempt is record.attempts[first]:
                    attempt.failover_reason = reason
                if len(record.attempts) > journalled_by_claim and attempt is record.attempts[journalled_by_claim]:
                    return  # the claim's transaction already holds (provider, key) for this call
                record.status = PaymentStatus.ATTEMPTING
                record.provider = name
                record.provider_idempotency_key = key
                record.updated_at = time.time()
                await self.store.save_payment(record)

            result = await self.executor.run(handle, Operation.AUTHORIZE, order, key, deadline, record.attempts,
                                             journal)
            last = result
            record.provider = name
            record.provider_idempotency_key = key
            has_next = position + 1 < len(decision.candidates)
            match result.outcome:
                case Outcome.APPROVED:
                    record.provider_reference = result.reference
                    if order.capture:
                        record.captured_amount = record.amount
                    self._finish(record, PaymentStatus.APPROVED, result)
                    return
                case Outcome.HARD_DECLINE:
                    self._finish(record, PaymentStatus.DECLINED, result)
                    return
                case Outcome.SOFT_DECLINE:
                    if not cascaded and has_next and result.raw_code in decision.cascade_on:
                        cascaded = True
                        failover_reason = f"soft_decline:{result.raw_code}"
                        self.metrics.failovers.labels(name, "soft_decline").inc()
                        continue
                    self._finish(record, PaymentStatus.DECLINED, result)
                    return
                case Outcome.REJECTED:
                    self._finish(record, PaymentStatus.FAILED, result, error="provider_rejected")
                    return
                case Outcome.UNKNOWN:
                    record.provider_reference = result.reference
                    self._finish(record, PaymentStatus.PENDING, result)
                    return
                case Outcome.UNAVAILABLE:
                    failover_reason = f"unavailable:{result.raw_code}"
                    if has_next:
                        self.metrics.failovers.labels(name, "unavailable").inc()
        self._finish(record, PaymentStatus.FAILED, last, error="all_providers_unavailable")

    @staticmethod
    def _finish(record: PaymentRecord, status: PaymentStatus, result: ProviderResult | None = None, *,
                error: str | None = None) -> None:
        record.status = status
        if result is not None:
            record.outcome = result.outcome.value
            if result.outcome.is_decline:
                record.decline_code = result.raw_code
            elif result.outcome is not Outcome.APPROVED:
                record.error_code = result.raw_code
        if error is not None:
            record.error_code = error if result is None else f"{error}:{result.raw_code}"

    async def follow_up(self, record: PaymentRecord, op: Operation, amount: int | None, front_key: str,
                        deadline: float) -> FollowUpOutcome:
        """Capture, void or refund at the provider that holds the payment: never anywhere else."""
        assert record.provider is not None
        handle = self.pool[record.provider]
        key = provider_idempotency_key(record.id, record.provider, op.value, salt=front_key)
        subject = FollowUp(payment_id=record.id, provider_reference=record.provider_reference, amount=amount,
                           currency=record.currency, follow_up_id=key)
        started = time.monotonic()

        async def journal(_attempt: Attempt) -> None:
            record.updated_at = time.time()
            await self.store.save_payment(record)

        result = await self.executor.run(handle, op, subject, key, deadline, record.attempts, journal)
        if result.outcome is Outcome.APPROVED:
            if op is Operation.CAPTURE:
                record.captured_amount = amount if amount is not None else record.amount
            elif op is Operation.REFUND:
                record.refunded_amount += amount if amount is not None else record.captured_amount - record.refunded_amount
            record.status = FOLLOW_UP_STATUS[op]
        record.updated_at = time.time()
        extra = {"latency_ms": (time.monotonic() - started) * 1000,
                 "follow_up": {"operation": op.value, "amount": amount, "outcome": result.outcome.value,
                               "raw_code": result.raw_code}}
        line = self.transaction_line(record, op.value, **extra)
        await self.store.save_payment(record, outbox=line)
        self.log_transaction(record, op.value, line, **extra)
        return FollowUpOutcome(result, record)

    def transaction_line(self, record: PaymentRecord, kind: str, **extra: Any) -> OutboxLine:
        """The transaction's one line (DESIGN rule 5), rendered with its `log_id` through the
        logger's pipeline, which redacts whatever slips in, but not written: the final journal
        write stores it in the outbox in the same transaction (`save_payment(..., outbox=line)`),
        and `log_transaction` writes it after that commit."""
        return self.txlog.render(
            kind,
            payment_id=record.id,
            client=record.client,
            merchant_reference=record.merchant_reference,
            amount=record.amount,
            currency=record.currency,
            country=record.country,
            card_brand=record.card_brand,
            card_bin=record.card_bin,
            card_last4=record.card_last4,
            route=record.route,
            status=record.status.value,
            provider=record.provider,
            provider_reference=record.provider_reference,
            outcome=record.outcome,
            decline_code=record.decline_code,
            error_code=record.error_code,
            attempts=[_attempt_doc(a) for a in record.attempts],
            failovers=sum(1 for a in record.attempts if a.failover_reason),
            retries=sum(1 for a in record.attempts if a.try_number > 1 and a.operation != "status"),
            metadata=record.metadata,
            created_at=record.created_at,
            **extra,
        )

    def log_transaction(self, record: PaymentRecord, kind: str, line: OutboxLine, **extra: Any) -> None:
        """After the commit that stored `line` in the outbox: write it, exactly once (a crash
        before it is on disk leaves the outbox row, written at the next start-up)."""
        self.txlog.emit(line)
        for observe in self.observers:
            observe(record, kind, extra)


def _attempt_doc(a: Attempt) -> dict[str, Any]:
    return {
        "provider": a.provider, "try": a.try_number, "operation": a.operation, "outcome": a.outcome,
        "raw_code": a.raw_code, "http_status": a.http_status, "latency_ms": a.latency_ms,
        "breaker_state": a.breaker_state, "failover_reason": a.failover_reason, "started_at": a.started_at,
    }
