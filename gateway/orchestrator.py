"""The payment service: one call per front-door request, for payments and follow-ups alike.

It owns the whole sequence: claim the caller's Idempotency-Key (the payment row is journalled
in the same transaction), run the engine, commit the final row with the key's stored answer
and the transaction's log line, and answer (`gateway.answers`). The handler only parses input
and writes the answer.

Rules enforced here, read from the policy table (`gateway.policy`):
- candidates are walked in the router's order; `unavailable` moves on, a hard decline never
  does, a soft decline cascades at most once per payment and only for codes the route allows;
- `unknown` never moves on: the payment is `pending` and the reconciler owns it;
- follow-ups (capture, void, refund) go to the provider that authorised the payment, never to a
  backup; each is journalled before its call (the payment reads `<op>_pending` meanwhile, which
  also refuses a second follow-up), and one the provider did not confirm is left to the
  reconciler rather than answered as a failure a retry could repeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import structlog

from domain.outcome import LocalRefusal, Outcome, PaymentStatus
from domain.types import FollowUp, Operation, PaymentOrder, ProviderResult
from gateway import answers
from gateway.answers import Answer
from gateway.executor import AttemptExecutor
from gateway.journal.records import (Attempt, ClaimKind, Fingerprint, IdempotencyClaim, IdempotentAnswer, OutboxLine,
                                     PaymentRecord, PendingFollowUp, SettledFollowUp)
from gateway.journal.errors import StaleWrite
from gateway.journal.store import Store
from gateway.metrics import Metrics
from gateway.notifications.events import Settling
from gateway.notifications.outbox import NotificationOutbox
from gateway.policy import may_fail_over, payment_status
from gateway.provider_client import MIN_TRY_S, ProviderClient
from gateway.quota.provider import take_first
from gateway.router import OVER_QUOTA, NoRoute, RouteDecision, Router, RoutingFacts
from gateway.shopper_action import bind_action
from gateway.tracing.spans import NO_TRACING, Tracing
from gateway.txlog.outbox import TransactionLog

FOLLOW_UP_PENDING = {
    Operation.CAPTURE: PaymentStatus.CAPTURE_PENDING,
    Operation.VOID: PaymentStatus.VOID_PENDING,
    Operation.REFUND: PaymentStatus.REFUND_PENDING,
}
STALE_RETRIES = 3  # re-reads of a payment another process keeps writing, before answering 409
FOLLOW_UP_DONE = {
    Operation.CAPTURE: PaymentStatus.CAPTURED,
    Operation.VOID: PaymentStatus.VOIDED,
    Operation.REFUND: PaymentStatus.REFUNDED,
}


def provider_idempotency_key(payment_id: str, provider: str, operation: str = "auth", salt: str = "") -> str:
    """Deterministic, so a retry after a restart reuses the key the provider already saw."""
    if not salt:
        return f"{payment_id}-{provider}-{operation}"
    return f"{payment_id}-{provider}-{operation}-{hashlib.sha256(salt.encode()).hexdigest()[:16]}"


def payment_id_of(reference: str) -> str:
    """Our payment id from a reference we sent a provider: the payment id itself, or a provider
    key of `provider_idempotency_key` (payment ids hold no `-`)."""
    return reference.split("-", 1)[0]


class PaymentLocks:
    """One asyncio.Lock per payment with a follow-up starting in this process; dropped when
    nobody holds it. Across processes, the `<op>_pending` state journalled before the call is
    what refuses a second follow-up."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, payment_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(payment_id, (asyncio.Lock(), 0))
        self._locks[payment_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[payment_id]
            if users == 1:
                del self._locks[payment_id]
            else:
                self._locks[payment_id] = (lock, users - 1)


def follow_up_problem(record: PaymentRecord, op: Operation, amount: int | None) -> Answer | None:
    """Why `op` cannot be made on the payment as it is now, or None."""
    if amount is not None and amount > record.amount:
        return answers.amount_too_large("amount exceeds the payment's amount")
    status = record.status
    if record.follow_up is not None:
        wait = (answers.AWAITING_PROVIDER_RETRY_AFTER_S if record.follow_up.answered
                else answers.IN_PROGRESS_RETRY_AFTER_S)
        return answers.in_progress(f"a {record.follow_up.operation} of this payment is still in progress", wait)
    if op is Operation.CAPTURE and (status is not PaymentStatus.APPROVED or record.capture):
        return answers.invalid_state(f"only an approved authorisation can be captured (status {status.value})")
    if op is Operation.VOID and (status is not PaymentStatus.APPROVED or record.captured_amount):
        return answers.invalid_state(
            f"only an approved, uncaptured authorisation can be voided (status {status.value})")
    if op is Operation.REFUND:
        refundable = record.captured_amount - record.refunded_amount
        if status not in (PaymentStatus.APPROVED, PaymentStatus.CAPTURED, PaymentStatus.REFUNDED) or refundable <= 0:
            return answers.invalid_state("nothing captured is left to refund")
        if amount is not None and amount > refundable:
            return answers.amount_too_large(f"at most {refundable} can still be refunded")
    return None


def follow_up_amount(record: PaymentRecord, op: Operation, asked: int | None) -> int | None:
    """Every provider gets an explicit amount: a capture defaults to the authorised amount, a
    refund to what is still refundable; a void has none."""
    if op is Operation.CAPTURE:
        return record.amount if asked is None else asked
    if op is Operation.REFUND:
        return record.captured_amount - record.refunded_amount if asked is None else asked
    return None


def apply_follow_up(record: PaymentRecord, op: Operation, outcome: Outcome) -> None:
    """A follow-up's settled outcome onto the payment: done (amounts and status), or refused or
    never made (the status it had before); either way kept in its settled history, which a
    failure the provider reports later is checked against (`gateway.webhooks.rules`)."""
    pending = record.follow_up
    assert pending is not None
    done = outcome is Outcome.APPROVED
    counted: int | None = None
    if done:
        if op is Operation.CAPTURE:
            counted = pending.amount if pending.amount is not None else record.amount
            record.captured_amount = counted
        elif op is Operation.REFUND:
            counted = pending.amount or 0
            record.refunded_amount += counted
        record.status = FOLLOW_UP_DONE[op]
    else:
        record.status = PaymentStatus(pending.prior_status)
    record.settled_follow_ups.append(SettledFollowUp(op.value, pending.provider_key, counted, done))
    record.follow_up = None


class PaymentService:
    def __init__(self, *, store: Store, clients: Mapping[str, ProviderClient], router: Router,
                 executor: AttemptExecutor, metrics: Metrics, txlog: TransactionLog, retention_s: float,
                 ops_log: structlog.typing.FilteringBoundLogger, tracing: Tracing = NO_TRACING,
                 notifications: NotificationOutbox | None = None, action_expiry_s: float = 900.0,
                 quota_max_wait_s: float = 0.2) -> None:
        self.store = store
        self.clients = clients
        self.router = router
        self.executor = executor
        self.metrics = metrics
        self.txlog = txlog
        self.retention_s = retention_s
        self.ops = ops_log
        self.action_expiry_s = action_expiry_s  # an unfinished shopper action expires after this
        self.quota_max_wait_s = quota_max_wait_s  # a payment's wait for a token when every candidate is at quota
        self.tracing = tracing  # journal-write spans here; the reconciler's pass spans too
        self.notifications = notifications or NotificationOutbox(enabled=False)
        self.locks = PaymentLocks()
        self.in_flight: set[str] = set()
        # Called with (record, kind, extra) after each transaction line (the live console's window).
        self.observers: list[Callable[[PaymentRecord, str, dict[str, Any]], None]] = []

    # -- payments ---------------------------------------------------------------------------------

    async def claim(self, scope: str, key: str, fingerprint: Fingerprint, resource_id: str,
                    record: PaymentRecord | None = None) -> IdempotencyClaim:
        """The key claimed with the request's fingerprint (and `record` written with it). A key
        an earlier release claimed for the same request holds its raw-bytes fingerprint: that
        is the same request too (a replay or in flight), never `idempotency_key_reused`."""
        now = time.time()
        claim = await self.store.claim_idempotency(scope, key, fingerprint.value, resource_id, now,
                                                   now + self.retention_s, record)
        if claim.kind is ClaimKind.MISMATCH and fingerprint.legacy is not None:
            again = await self.store.claim_idempotency(scope, key, fingerprint.legacy, resource_id, now,
                                                       now + self.retention_s, record)
            if again.kind is not ClaimKind.MISMATCH:
                return again
        return claim

    async def create_payment(self, scope: str, key: str, fingerprint: Fingerprint, record: PaymentRecord,
                             order: PaymentOrder, deadline: float) -> Answer:
        """Claim the key with the payment row and its first attempt (one transaction: that row is
        the first call's write-ahead too), run the payment to a final or pending state, commit
        the final row with the key's answer and the log line.

        A payment that finds every candidate at its quota (nothing sent, nothing claimed) waits
        for the first token if it comes soon (`engine.quota_max_wait_ms`, at most a quarter of
        the time left), else is answered 503 `overloaded` with Retry-After: the checkout's retry
        with the same key is a fresh payment."""
        try:
            routed: RouteDecision | NoRoute = await self._route(record, order, deadline)
        except NoRoute as exc:
            routed = exc
        if isinstance(routed, RouteDecision) and routed.quota_wait_s is not None:
            self._count_quota(routed)
            self.metrics.shed.labels("quota").inc()
            return answers.over_quota(routed.route, routed.quota_wait_s)
        decision = self._plan(record, routed)
        if decision is not None and decision.return_url_required and order.return_url is None:
            return answers.error(422, "return_url_required", f"route {decision.route} requires a return_url: its "
                                 "providers may send the shopper to authenticate (3-D Secure)", "return_url")
        first_try = self._first_attempt(record) if decision is not None else None
        with self.tracing.span("journal.claim") as span:
            span.record(record, "payment")
            claim = await self.claim(scope, key, fingerprint, record.id, record)
        if claim.kind is not ClaimKind.NEW:
            return answers.claim_answer(claim)
        # From here the journal holds the payment: if this request dies, the reconciler settles
        # it and stores the final answer for the key.
        self.in_flight.add(record.id)
        started = time.monotonic()
        try:
            if decision is not None:
                self.executor.budget.record_request()
                # No time left for a call (a tiny Request-Timeout): take no token, the executor
                # refuses the try; a token spent on a call never made is the account's quota lost.
                first = await self._reserve(record, decision, deadline) if time.monotonic() + MIN_TRY_S <= deadline \
                    else 0
                if first != 0 and first_try is not None:
                    # The first candidate had no quota token: the try journalled with the claim
                    # was never made (the next write of the row drops it).
                    record.attempts = [a for a in record.attempts if a is not first_try]
                    first_try = None
                if first is None:
                    return await self._shed_over_quota(record, scope, key, decision)
                await self._attempt_candidates(record, order, decision, deadline, first, first_try)
            record.updated_at = time.time()
            answer = answers.payment_answer(record)
            await self.commit(record, "payment", IdempotentAnswer(scope, key, answer.stored()),
                              latency_ms=(time.monotonic() - started) * 1000)
        except StaleWrite:
            # Another writer moved the row on (a reconciler that took it for abandoned, past the
            # deadline): it owns the payment and the key's answer now; say what the journal says.
            return await self._lost_race(record.id, "payment")
        finally:
            self.in_flight.discard(record.id)
        self.metrics.payments.labels(record.status.value).inc()
        self.metrics.payment_latency.observe(time.monotonic() - started)
        return answer

    async def _route(self, record: PaymentRecord, order: PaymentOrder, deadline: float) -> RouteDecision:
        """The router's decision, in memory. When every candidate is at its quota and the first
        token comes within the short wait a payment may make, it waits for it and routes again."""
        facts = RoutingFacts(order.amount, order.currency, order.country, record.card_brand, order.merchant_reference,
                             redirect=order.return_url is not None)
        decision = self.router.route(facts)
        wait = decision.quota_wait_s
        if wait is not None and self._may_wait_for_token(wait, deadline):
            await asyncio.sleep(wait)
            decision = self.router.route(facts)
        return decision

    def _count_quota(self, decision: RouteDecision) -> None:
        """The routing's quota skips (each a request not sent) and, where a payment went on to
        another provider for it, a spill-over; and its demotions."""
        for provider, reason in decision.skipped:
            if reason == OVER_QUOTA:
                self.metrics.quota_denied.labels(provider).inc()
                if decision.candidates:
                    self.metrics.quota_spillovers.labels(provider).inc()
        for provider, why in zip(decision.demoted, decision.demotion_reasons):
            self.metrics.demotions.labels(provider, why).inc()

    def _plan(self, record: PaymentRecord, routed: RouteDecision | NoRoute) -> RouteDecision | None:
        """Before anything is written, mark the record as attempting its first candidate, so
        the row journalled with the key claim already says where the first call goes (and with
        which provider key); the call's attempt is journalled just before it."""
        if isinstance(routed, NoRoute):
            self._finish(record, PaymentStatus.FAILED, error="no_route")
            record.error_message = str(routed)
            return None
        decision = routed
        if decision.skipped or decision.demoted:
            self._count_quota(decision)
        record.route = decision.route
        for provider, reason in decision.skipped:
            self._skip(record, provider, reason)
        if not decision.candidates:
            self._finish(record, PaymentStatus.FAILED, error="no_provider_available")
            return None
        record.status = PaymentStatus.ATTEMPTING
        record.provider = decision.candidates[0]
        record.provider_idempotency_key = provider_idempotency_key(record.id, record.provider)
        return decision

    def _first_attempt(self, record: PaymentRecord) -> Attempt:
        """The first candidate's first try, added to the record before the key claim writes it.

        The claim's transaction is then that call's write-ahead as well (DESIGN rule 4 holds:
        the attempt is on disk before the provider can see the request), so a payment costs
        one fsync'd store round trip fewer before its first call. A try the client refuses
        locally (deadline, breaker) keeps the record, with its refusal, like any other try."""
        assert record.provider is not None and record.provider_idempotency_key is not None
        attempt = self.clients[record.provider].new_attempt(Operation.AUTHORIZE, 1, record.provider_idempotency_key)
        record.attempts.append(attempt)
        return attempt

    def _skip(self, record: PaymentRecord, provider: str, reason: str) -> None:
        """A candidate passed over before any call: an attempt `skipped` with the reason."""
        skipped = self.clients[provider].new_attempt(Operation.AUTHORIZE, 0, None)
        skipped.outcome, skipped.raw_code = "skipped", reason
        record.attempts.append(skipped)

    def _may_wait_for_token(self, wait: float, deadline: float) -> bool:
        """A payment with every candidate at its quota waits for the first token only briefly:
        within `engine.quota_max_wait_ms` and a quarter of the time its deadline leaves."""
        return wait <= min(self.quota_max_wait_s, (deadline - time.monotonic()) / 4)

    async def _reserve(self, record: PaymentRecord, decision: RouteDecision, deadline: float) -> int | None:
        """The first call's quota token, from the first candidate that has one (`gateway.quota`:
        one step, one Redis round trip when shared); the candidates before it are skipped for
        their quota. None: none has a token now (the routing's estimate was behind), not even
        after the short wait a payment may make."""
        candidates = decision.candidates
        if self.clients[candidates[0]].handle.quota is None:
            return 0  # no quota at the primary: nothing to take before its call
        quotas = [self.clients[name].handle.quota for name in candidates]
        first = await take_first(quotas)
        if first is None:
            wait = min(q.wait_s() for q in quotas if q is not None)
            if not self._may_wait_for_token(wait, deadline):
                return None
            await asyncio.sleep(wait)
            first = await take_first(quotas)
            if first is None:
                return None
        for name in candidates[:first]:
            self._skip(record, name, OVER_QUOTA)
            self.metrics.quota_denied.labels(name).inc()
            self.metrics.quota_spillovers.labels(name).inc()
        return first

    async def _shed_over_quota(self, record: PaymentRecord, scope: str, key: str, decision: RouteDecision) -> Answer:
        """Every candidate at its quota once the key was claimed: nothing was sent. The claimed
        row and its key are discarded together, so the checkout's retry after Retry-After with
        the same key is a fresh payment, as when the routing found no token, and the books (the
        journal, the transaction log, the approval rate) hold no failed payment for a caller told
        "not now". A row someone else moved on meanwhile is theirs (StaleWrite)."""
        for name in decision.candidates:
            self.metrics.quota_denied.labels(name).inc()
        self.metrics.shed.labels("quota").inc()
        if not await self.store.discard_unsent(record.id, record.version, scope, key):
            raise StaleWrite(record.id)
        quotas = [q for name in decision.candidates if (q := self.clients[name].handle.quota) is not None]
        return answers.over_quota(decision.route, min(q.wait_s() for q in quotas))

    async def _attempt_candidates(self, record: PaymentRecord, order: PaymentOrder, decision: RouteDecision,
                                  deadline: float, first: int = 0, first_try: Attempt | None = None) -> None:
        """From candidate `first` on, whose first call's quota token `_reserve` took.
        `first_try`: that candidate's first try, journalled with the key claim."""
        cascaded = False
        failover_reason: str | None = None
        last: ProviderResult | None = None
        for position in range(first, len(decision.candidates)):
            name = decision.candidates[position]
            client = self.clients[name]
            key = provider_idempotency_key(record.id, name)

            async def journal(_attempt: Attempt, name: str = name, key: str = key) -> None:
                """The row says where this call goes (and holds its attempt) before the provider sees it."""
                record.status, record.provider, record.provider_idempotency_key = PaymentStatus.ATTEMPTING, name, key
                await self.write_ahead(record, "payment")

            result = await self.executor.run(client, Operation.AUTHORIZE, order, key, deadline, record.attempts,
                                             journal, failover_reason=failover_reason, prepaid=position == first,
                                             journalled=first_try if position == first else None)
            last = result
            record.provider, record.provider_idempotency_key = name, key
            has_next = position + 1 < len(decision.candidates)
            cascade_allowed = not cascaded and result.raw_code in decision.cascade_on
            if has_next and may_fail_over(result, cascade_allowed=cascade_allowed):
                kind = "soft_decline" if result.outcome is Outcome.SOFT_DECLINE else "unavailable"
                if result.refusal is LocalRefusal.OVER_QUOTA:
                    self.metrics.quota_spillovers.labels(name).inc()
                cascaded = cascaded or result.outcome is Outcome.SOFT_DECLINE
                failover_reason = f"{kind}:{result.raw_code}"
                self.metrics.failovers.labels(name, kind).inc()
                continue
            if result.outcome is Outcome.UNAVAILABLE:
                break  # the last candidate was not reached or did not take it
            if result.outcome in (Outcome.APPROVED, Outcome.UNKNOWN):
                record.provider_reference = result.reference
            if result.outcome is Outcome.ACTION_REQUIRED:
                bind_action(record, result, self.action_expiry_s)  # bound to this provider from now on
            if result.outcome is Outcome.APPROVED and order.capture:
                record.captured_amount = record.amount
            if result.duplicate_suspected:
                self.suspect_duplicate(record, result)
            self._finish(record, payment_status(result), result,
                         error="provider_rejected" if result.outcome is Outcome.REJECTED else None)
            return
        self._finish(record, PaymentStatus.FAILED, last, error="all_providers_unavailable")

    async def write_ahead(self, record: PaymentRecord, kind: str) -> None:
        """Before each try's call, the row with that try's attempt (DESIGN rule 4): every try's
        but the first of a payment or a follow-up (its key claim wrote that one; a completion's
        and an expiry's first tries are written here too), so a takeover after a crash keeps the
        attempt that may have charged, and the transaction's line has it."""
        record.updated_at = time.time()
        with self.tracing.span("journal.save") as span:
            span.record(record, kind)
            await self.store.save_payment(record)

    def suspect_duplicate(self, record: PaymentRecord, result: ProviderResult) -> None:
        record.duplicate_charge_suspected = True
        self.metrics.duplicates_suspected.labels(record.provider or "none").inc()
        self.ops.error("duplicate_charge_suspected", payment_id=record.id, provider=record.provider,
                       detail=result.message)

    @staticmethod
    def _finish(record: PaymentRecord, status: PaymentStatus, result: ProviderResult | None = None, *,
                error: str | None = None) -> None:
        record.status = status
        if result is not None:
            record.outcome = result.outcome.value
            if result.outcome.is_decline:
                record.decline_code = result.raw_code
            elif result.outcome not in (Outcome.APPROVED, Outcome.ACTION_REQUIRED):
                record.error_code = result.raw_code
        if error is not None:
            record.error_code = error if result is None else f"{error}:{result.raw_code}"

    # -- reads and follow-ups ---------------------------------------------------------------------

    async def read(self, scope: str, payment_id: str) -> Answer:
        record = await self._owned(scope, payment_id)
        return answers.payment_not_found() if record is None else answers.payment_read(record)

    async def _owned(self, scope: str, payment_id: str) -> PaymentRecord | None:
        record = await self.store.get_payment(payment_id)
        return record if record is not None and record.client == scope else None

    async def follow_up(self, scope: str, key: str, fingerprint: Fingerprint, payment_id: str, op: Operation,
                        asked_amount: int | None, deadline: float) -> Answer:
        """Capture, void or refund at the provider that holds the payment: never anywhere else.

        The caller's key is claimed in the same transaction that journals the payment as
        `<op>_pending` with the follow-up (its provider key, amount, the caller's key): a crash
        at any point after it leaves a follow-up the reconciler settles and a key it answers,
        never a key stuck in flight with nothing behind it."""
        record = await self._owned(scope, payment_id)
        if record is None:
            return answers.payment_not_found()
        provider_key = provider_idempotency_key(record.id, record.provider or "none", op.value, salt=key)
        async with self.locks.hold(record.id):
            for _ in range(STALE_RETRIES):
                try:
                    return await self._claim_and_run_follow_up(scope, key, fingerprint, payment_id, op, asked_amount,
                                                               deadline, provider_key)
                except StaleWrite:
                    continue  # another process wrote the payment since we read it: read it again
            return answers.in_progress("the payment is being changed by another request; retry shortly")

    async def _claim_and_run_follow_up(self, scope: str, key: str, fingerprint: Fingerprint, payment_id: str,
                                       op: Operation, asked_amount: int | None, deadline: float,
                                       provider_key: str) -> Answer:
        """One try at the follow-up against the payment as it is now; `StaleWrite` when another
        process wrote it between our read and our claim (the caller reads it again)."""
        # Checked against the row as it is now, not as it was before we waited: two refunds
        # must not both pass one stale check.
        record = await self._owned(scope, payment_id)
        assert record is not None
        amount = follow_up_amount(record, op, asked_amount)
        problem = follow_up_problem(record, op, amount)
        now = time.time()
        first: Attempt | None = None
        if problem is None:
            record.follow_up = PendingFollowUp(
                operation=op.value, amount=amount, provider_key=provider_key, scope=scope, front_key=key,
                prior_status=record.status.value, started_at=now, deadline_s=max(0.0, deadline - time.monotonic()))
            record.status = FOLLOW_UP_PENDING[op]
            record.updated_at = now
            # Its first try rides in the claim's row, which is that call's write-ahead (as a payment's).
            assert record.provider is not None
            first = self.clients[record.provider].new_attempt(op, 1, provider_key, amount=amount)
            record.attempts.append(first)
        with self.tracing.span("journal.claim") as span:
            span.record(record, op.value)
            claim = await self.claim(scope, key, fingerprint, provider_key, record if problem is None else None)
        if claim.kind is not ClaimKind.NEW:
            return answers.claim_answer(claim)  # a replay, or the key is another request's
        if problem is not None:
            await self.store.release_idempotency(scope, key)
            return problem
        assert first is not None
        self.in_flight.add(record.id)
        try:
            return await self._run_follow_up(record, op, amount, scope, key, provider_key, deadline, first)
        except StaleWrite:
            # After our claim, only a reconciler that took the follow-up for abandoned writes
            # the row: it settles the follow-up and answers the key.
            return await self._lost_race(record.id, op.value)
        finally:
            self.in_flight.discard(record.id)

    async def _run_follow_up(self, record: PaymentRecord, op: Operation, amount: int | None, scope: str, key: str,
                             provider_key: str, deadline: float, first: Attempt) -> Answer:
        """`first`: the first try's attempt, journalled with the key claim."""
        assert record.provider is not None
        client = self.clients[record.provider]
        subject = FollowUp(payment_id=record.id, provider_reference=record.provider_reference, amount=amount,
                           currency=record.currency, follow_up_id=provider_key)

        async def write_ahead_retry(_attempt: Attempt) -> None:
            """The claim's transaction holds the follow-up and its first try; a retry's attempt
            goes in before its call."""
            await self.write_ahead(record, op.value)

        started = time.monotonic()
        result = await self.executor.run(client, op, subject, provider_key, deadline, record.attempts,
                                         write_ahead_retry, amount=amount, journalled=first)
        extra = {"latency_ms": (time.monotonic() - started) * 1000,
                 "follow_up": {"operation": op.value, "amount": amount, "outcome": result.outcome.value,
                               "raw_code": result.raw_code}}
        record.updated_at = time.time()
        if result.outcome is Outcome.UNKNOWN or result.settles_later:
            # The provider may have acted, or has accepted and reports later: its webhook (or the
            # reconciler's lookup) settles it, and answers the key then.
            assert record.follow_up is not None
            record.follow_up.answered = True
            answer = answers.follow_up_answer(record, op, result)
            await self.commit(record, op.value, IdempotentAnswer(scope, key, answer.stored()), **extra)
            return answer
        apply_follow_up(record, op, result.outcome)
        answer = answers.follow_up_answer(record, op, result)
        if result.outcome is Outcome.UNAVAILABLE:
            # Not made (not sent, or proven absent): the payment is as it was, and the key is
            # released so the caller's retry reaches the same provider key.
            await self.commit(record, op.value, **extra)
            await self.store.release_idempotency(scope, key)
            return answer
        await self.commit(record, op.value, IdempotentAnswer(scope, key, answer.stored()), **extra)
        return answer

    async def _lost_race(self, payment_id: str, kind: str) -> Answer:
        self.ops.warning("journal_write_lost_race", payment_id=payment_id, kind=kind)
        current = await self.store.get_payment(payment_id)
        assert current is not None
        if current.follow_up is not None or current.status is PaymentStatus.PENDING:
            return Answer(202, answers.payment_read(current).body)
        return answers.payment_read(current)

    # -- the journal's final row and the transaction's one log line -------------------------------

    async def commit(self, record: PaymentRecord, kind: str, answer: IdempotentAnswer | None = None, *,
                     settled_from: Settling | None = None, **extra: Any) -> None:
        """The one way a transaction ends (the caller set `updated_at` with the state change, before
        it rendered the answer): render its line (DESIGN rule 5; the logger's pipeline
        redacts), commit the row, the key's answer and the line's outbox entry in one
        transaction, then write the line (a crash before it is on disk leaves the outbox row,
        written at the next start-up) and tell the observers.

        `settled_from`: a background settler (reconciler, provider webhook) says what the row was
        before it changed it (`Settling.of(record)`, taken first); the merchant notification the
        transition yields commits in the same transaction (`gateway.notifications`). The request
        path never passes it: its caller hears the outcome in the answer."""
        line = self.transaction_line(record, kind, **extra)
        notes = self.notifications.rows(settled_from, record) if settled_from is not None else ()
        with self.tracing.span("journal.commit") as span:
            span.record(record, kind)
            await self.store.save_payment(record, answer, outbox=line, notifications=notes)
        self.txlog.emit(line)
        if notes:
            self.notifications.committed()
        for observe in self.observers:
            observe(record, kind, extra)

    def transaction_line(self, record: PaymentRecord, kind: str, **extra: Any) -> OutboxLine:
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
            duplicate_charge_suspected=record.duplicate_charge_suspected or None,
            attempts=[_attempt_doc(a) for a in record.attempts],
            failovers=sum(1 for a in record.attempts if a.failover_reason),
            retries=sum(1 for a in record.attempts if a.try_number > 1 and a.operation != "status"),
            metadata=record.metadata,
            created_at=record.created_at,
            **extra,
        )


def _attempt_doc(a: Attempt) -> dict[str, Any]:
    return {
        "provider": a.provider, "try": a.try_number, "operation": a.operation, "outcome": a.outcome,
        "raw_code": a.raw_code, "http_status": a.http_status, "latency_ms": a.latency_ms,
        "breaker_state": a.breaker_state, "failover_reason": a.failover_reason, "started_at": a.started_at,
        "amount": a.amount,
    }
