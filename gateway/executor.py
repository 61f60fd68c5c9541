"""The attempt executor: one provider, one operation, bounded tries.

Per try: breaker check, durable journal write (the attempt with its idempotency key), bulkhead
slot, breaker guard, the call with a per-try timeout cut to the request's deadline. Between
tries: tenacity decides (same idempotency key, exponential full jitter or the provider's
Retry-After, attempt cap, deadline, shared retry budget). An `unknown` authorisation is settled
by a status query before anything else happens: found means we take the provider's answer,
not found means nothing was charged and a retry or failover is safe, anything else stays
unknown and the payment goes to `pending`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt

from gateway.breaker import BreakerOpen, ProviderFailure
from gateway.bulkhead import BulkheadFull, BulkheadTimeout
from gateway.journal.records import Attempt
from gateway.metrics import Metrics
from domain.outcome import Outcome
from gateway.provider_pool import ProviderHandle
from gateway.retry_policy import RetryBudget, stop_at_deadline, stop_when_budget_spent, wait_retry_after
from domain.types import FollowUp, Operation, PaymentOrder, ProviderResult
from providers.base import ProviderMapping, ProviderRequest
from providers.classify import result_from_transport_error
from providers.errors import TransportError

MIN_TRY_S = 0.05
MOVE_ON_CODES = frozenset({"breaker_open", "bulkhead_full", "bulkhead_timeout"})

AttemptHook = Callable[[Attempt], Awaitable[None]]


def _worth_retrying(result: ProviderResult) -> bool:
    if result.outcome is Outcome.UNKNOWN:
        return result.replay_safe  # same key at a provider that replays: cannot charge twice
    return result.outcome is Outcome.UNAVAILABLE and result.raw_code not in MOVE_ON_CODES


def _build(handle: ProviderHandle, op: Operation, subject: PaymentOrder | FollowUp,
           key: str | None) -> ProviderRequest | ProviderResult:
    """The provider request, or `rejected` when our own input cannot make one (a mapping's
    ValueError): that is a bug or bad input, never a reason to trip the provider's breaker."""
    try:
        return handle.mapping.build(op, subject, key)
    except ValueError as exc:
        return ProviderResult(Outcome.REJECTED, raw_code="request_not_buildable", message=str(exc))


def _still_unsettled(unsettled: ProviderResult | None, result: ProviderResult) -> ProviderResult | None:
    """The newest answer that leaves a possible charge open, or None once one settles it: an
    approval or a decline, or a status query that proved no payment. Anything else (a refusal
    before sending, a proxy's 4xx) says nothing about the earlier call."""
    if result.outcome is Outcome.UNKNOWN:
        return result
    if result.outcome in (Outcome.APPROVED, Outcome.HARD_DECLINE, Outcome.SOFT_DECLINE):
        return None
    if result.outcome is Outcome.UNAVAILABLE and not result.found:
        return None
    return unsettled


def _last_result(retry_state: RetryCallState) -> ProviderResult:
    assert retry_state.outcome is not None
    return retry_state.outcome.result()


class AttemptExecutor:
    def __init__(self, budget: RetryBudget, metrics: Metrics) -> None:
        self.budget = budget
        self.metrics = metrics

    async def run(
        self,
        handle: ProviderHandle,
        op: Operation,
        subject: PaymentOrder | FollowUp,
        idempotency_key: str,
        deadline: float,
        attempts: list[Attempt],
        journal: AttemptHook,
    ) -> ProviderResult:
        """Try `op` at one provider until an answer that retrying cannot change.

        Each try is appended to `attempts` (the payment's own list) before `journal` persists it.
        """
        first = await self._one_try(handle, op, subject, idempotency_key, deadline, 1, attempts, journal)
        if not _worth_retrying(first) or handle.config.retry.max_attempts == 1:
            return first  # the common case never builds the retry machinery
        tries = 0
        retry_cfg = handle.config.retry
        # A fresh AsyncRetrying per call: a shared one miscounts across coroutines. Its first
        # "attempt" hands over the try already made, so waits, caps and budget apply unchanged.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(retry_cfg.max_attempts)
            | stop_at_deadline(deadline, MIN_TRY_S)
            | stop_when_budget_spent(self.budget),
            wait=wait_retry_after(retry_cfg.base_delay_ms / 1000, retry_cfg.max_delay_ms / 1000),
            retry=retry_if_result(_worth_retrying),
            retry_error_callback=_last_result,
        )
        result = first
        unsettled = first if first.outcome is Outcome.UNKNOWN else None
        async for attempt in retrying:
            with attempt:
                tries += 1
                if tries == 1:
                    result = first
                else:
                    self.metrics.retries.labels(handle.name).inc()
                    result = await self._one_try(handle, op, subject, idempotency_key, deadline, tries, attempts,
                                                 journal)
                    unsettled = _still_unsettled(unsettled, result)
            if not attempt.retry_state.outcome or not attempt.retry_state.outcome.failed:
                attempt.retry_state.set_result(result)
        # A later try that was refused before sending (breaker, bulkhead, deadline, connect)
        # says nothing about an earlier one that may have charged: that stays unknown, so the
        # orchestrator answers pending instead of failing over.
        settled = result.outcome in (Outcome.APPROVED, Outcome.HARD_DECLINE, Outcome.SOFT_DECLINE)
        return unsettled if unsettled is not None and not settled else result

    async def _one_try(
        self,
        handle: ProviderHandle,
        op: Operation,
        subject: PaymentOrder | FollowUp,
        key: str,
        deadline: float,
        try_number: int,
        attempts: list[Attempt],
        journal: AttemptHook,
    ) -> ProviderResult:
        if time.monotonic() + MIN_TRY_S > deadline:
            return ProviderResult(Outcome.UNAVAILABLE, raw_code="deadline_exceeded")
        attempt = Attempt(provider=handle.name, try_number=try_number, operation=op.value, idempotency_key=key,
                          started_at=time.time(), breaker_state=handle.breaker.state)
        attempts.append(attempt)
        if not handle.breaker.allows_call():
            result = ProviderResult(Outcome.UNAVAILABLE, raw_code="breaker_open")
            return self._finish(handle, attempt, result, time.monotonic())
        await journal(attempt)  # on disk before the provider can see the request
        started = time.monotonic()
        result = await self._guarded_call(handle, op, subject, key, deadline)
        self._finish(handle, attempt, result, started)
        if op is Operation.AUTHORIZE and result.raw_code not in MOVE_ON_CODES:
            handle.success.record(not result.outcome.counts_against_breaker)
        if result.outcome is Outcome.UNKNOWN and op is Operation.AUTHORIZE:
            assert isinstance(subject, PaymentOrder)
            result = await self._settle_unknown(handle, subject.payment_id, result, deadline, try_number, attempts)
        return result

    async def _guarded_call(
        self, handle: ProviderHandle, op: Operation, subject: PaymentOrder | FollowUp, key: str, deadline: float
    ) -> ProviderResult:
        request = _build(handle, op, subject, key)
        if isinstance(request, ProviderResult):
            return request  # our own bad input: never a provider failure
        result = ProviderResult(Outcome.UNAVAILABLE, raw_code="not_attempted")
        try:
            async with handle.bulkhead.slot(deadline):
                self.metrics.bulkhead_active.labels(handle.name).set(handle.bulkhead.active)
                async with handle.breaker.guard():
                    result = await self._send(handle, op, request, deadline)
                    if result.outcome.counts_against_breaker:
                        raise ProviderFailure(result.raw_code)
        except ProviderFailure:
            pass
        except BreakerOpen:
            result = ProviderResult(Outcome.UNAVAILABLE, raw_code="breaker_open")
        except BulkheadFull:
            result = ProviderResult(Outcome.UNAVAILABLE, raw_code="bulkhead_full")
        except BulkheadTimeout:
            result = ProviderResult(Outcome.UNAVAILABLE, raw_code="bulkhead_timeout")
        return result

    async def _send(self, handle: ProviderHandle, op: Operation, request: ProviderRequest,
                    deadline: float) -> ProviderResult:
        timeout = min(handle.timeout_s, deadline - time.monotonic())
        if timeout < MIN_TRY_S:
            return ProviderResult(Outcome.UNAVAILABLE, raw_code="deadline_exceeded")
        try:
            response = await handle.transport.send(request, timeout)
        except TransportError as exc:
            return result_from_transport_error(exc)
        return handle.mapping.parse(op, response)

    async def _settle_unknown(self, handle: ProviderHandle, payment_id: str, unknown: ProviderResult,
                              deadline: float, try_number: int, attempts: list[Attempt]) -> ProviderResult:
        attempt = Attempt(provider=handle.name, try_number=try_number, operation=Operation.STATUS.value,
                          idempotency_key=None, started_at=time.time(), breaker_state=handle.breaker.state)
        attempts.append(attempt)
        started = time.monotonic()
        request = _build(handle, Operation.STATUS, FollowUp(payment_id=payment_id, provider_reference=unknown.reference),
                         None)
        status = request if isinstance(request, ProviderResult) else await self._send(
            handle, Operation.STATUS, request, deadline)
        self._finish(handle, attempt, status, started)
        return settle_with_status(unknown, status, handle.mapping)

    def _finish(self, handle: ProviderHandle, attempt: Attempt, result: ProviderResult, started: float) -> ProviderResult:
        latency = time.monotonic() - started
        attempt.outcome = attempt_outcome(result)
        attempt.raw_code = result.raw_code
        attempt.http_status = result.http_status
        attempt.reference = result.reference
        attempt.latency_ms = round(latency * 1000, 3)
        attempt.message = result.message
        self.metrics.attempts.labels(handle.name, attempt.operation, result.outcome.value).inc()
        self.metrics.attempt_latency.labels(handle.name).observe(latency)
        return result


def attempt_outcome(result: ProviderResult) -> str:
    """What an attempt record says: a status query that found nothing is `not_found`, never the
    outcome class its mapping filled in."""
    return result.outcome.value if result.found else "not_found"


def _provider_finished(unknown: ProviderResult) -> bool:
    """Whether the unknown answer came from the provider having finished with the request (its
    own 500, say), so an immediate "not found" means no charge. After a read timeout, a reset, a
    proxy's 502/504, a request we hold a provider id for, or an in-progress duplicate, the
    provider may still be working on it, and a lookup now proves nothing."""
    return (unknown.reference is None and unknown.http_status is not None
            and unknown.http_status not in (409, 429, 502, 504))


def settle_with_status(unknown: ProviderResult, status: ProviderResult, mapping: ProviderMapping) -> ProviderResult:
    """Combine an unknown answer with a status query: the one rule that keeps failover safe.

    The provider's answer wins when it has one. "Not found" proves no charge only where the
    lookup has no lag; then retrying or failing over is safe. Otherwise, where the provider
    replays answers per key, re-sending with the same key is safe (it cannot charge twice) and
    will tell; anywhere else the payment stays unknown and goes to `pending`."""
    if status.found and status.outcome in (Outcome.APPROVED, Outcome.HARD_DECLINE, Outcome.SOFT_DECLINE):
        return status
    if not status.found and mapping.status_query_consistent and _provider_finished(unknown):
        return dataclasses.replace(unknown, outcome=Outcome.UNAVAILABLE, found=False,
                                   message="status query: the provider holds no such payment")
    if mapping.replays_answers:
        return dataclasses.replace(unknown, replay_safe=True)
    return unknown
