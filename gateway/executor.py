"""The attempt executor: one provider, one operation, bounded tries.

A plain loop over `ProviderClient.call` that uses tenacity's wait strategy for its delays
(exponential full jitter, or the provider's Retry-After). Each try is its own attempt record
with the same idempotency key. Between tries: the policy table decides whether another try can
help, the attempt cap and the request's deadline bound the loop, and the shared retry budget
is spent only when a retry is really about to be made.

An `unknown` answer is settled by a status query (where the provider has a lookup; Adyen's
outcomes come only by webhook) before anything else happens
(`gateway.settlement`): the provider's answer wins, a proven absence makes a retry or failover
safe, a provider that replays answers may be asked again with the same key, and anything else
stays unknown, so the payment goes to `pending`. A later try that was refused before sending
(breaker, bulkhead, deadline, connect) says nothing about an earlier call that may have
charged: the earlier unknown is what the executor returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tenacity import RetryCallState
from tenacity.wait import wait_base

from domain.outcome import Outcome
from domain.types import FollowUp, Lookup, Operation, PaymentOrder, ProviderResult, StatusAnswer
from gateway.journal.records import Attempt
from gateway.metrics import Metrics
from gateway.policy import settles_possible_charge, worth_retrying
from gateway.provider_client import MIN_TRY_S, BeforeSend, ProviderClient
from gateway.retry_policy import RetryBudget, wait_retry_after
from gateway.settlement import settle_unknown

AttemptHook = Callable[[Attempt], Awaitable[None]]


def _wait_state(try_number: int, result: ProviderResult) -> RetryCallState:
    """The state a tenacity wait strategy reads: how many tries so far and the last result."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = try_number
    state.set_result(result)
    return state


class AttemptExecutor:
    def __init__(self, budget: RetryBudget, metrics: Metrics) -> None:
        self.budget = budget
        self.metrics = metrics

    async def run(self, client: ProviderClient, op: Operation, subject: PaymentOrder | FollowUp,
                  idempotency_key: str, deadline: float, attempts: list[Attempt], journal: AttemptHook,
                  *, amount: int | None = None, failover_reason: str | None = None,
                  journalled: Attempt | None = None, prepaid: bool = False) -> ProviderResult:
        """Try `op` at one provider until an answer that retrying cannot change.

        Each try is appended to `attempts` (the payment's own list); `journal` persists it after
        the local checks pass and before the provider can see the request. `failover_reason`:
        why the payment moved on to this provider, on its first try's record (and span).
        `journalled`: the first try's record, already in `attempts` and already on disk (the
        caller wrote it with the key claim, in the same transaction): that try skips `journal`,
        one fsync'd store round trip fewer per payment. `prepaid`: the first try's quota token
        is already taken (`PaymentService._reserve`)."""
        retry = client.handle.config.retry
        wait: wait_base = wait_retry_after(retry.base_delay_ms / 1000, retry.max_delay_ms / 1000)
        open_unknown: ProviderResult | None = None
        try_number = 0
        while True:
            try_number += 1
            before_send: BeforeSend | None = None
            if try_number == 1 and journalled is not None:
                attempt = journalled
            else:
                attempt = client.new_attempt(op, try_number, idempotency_key, amount=amount,
                                             failover_reason=failover_reason if try_number == 1 else None)
                attempts.append(attempt)
                before_send = lambda attempt=attempt: journal(attempt)  # noqa: E731
            result = await client.call(op, subject, idempotency_key, deadline, attempt, before_send=before_send,
                                       prepaid=prepaid and try_number == 1)
            if result.outcome is Outcome.UNKNOWN:
                result = await self._settle(client, op, subject, result, deadline, try_number, attempts)
            if result.outcome is Outcome.UNKNOWN:
                open_unknown = result
            elif settles_possible_charge(result):
                open_unknown = None
            if not worth_retrying(result) or try_number >= retry.max_attempts:
                break
            delay = wait(_wait_state(try_number, result))
            if time.monotonic() + delay + MIN_TRY_S > deadline:
                break
            if not self.budget.try_acquire():
                self.metrics.shed.labels("retry_budget").inc()
                break
            self.metrics.retries.labels(client.name).inc()
            await asyncio.sleep(delay)
        return open_unknown if open_unknown is not None else result

    async def _settle(self, client: ProviderClient, op: Operation, subject: PaymentOrder | FollowUp,
                      unknown: ProviderResult, deadline: float, try_number: int,
                      attempts: list[Attempt]) -> ProviderResult:
        if not client.mapping.has_status_lookup:
            # Nothing to ask (Adyen): the same key may be re-sent where the provider replays
            # answers, and otherwise the webhook settles it.
            return settle_unknown(op, unknown, StatusAnswer(Lookup.UNKNOWN, unknown), client.mapping)
        attempt = client.new_attempt(Operation.STATUS, try_number, None)
        attempts.append(attempt)
        if isinstance(subject, PaymentOrder):
            query = FollowUp(payment_id=subject.payment_id, provider_reference=unknown.reference)
        else:
            query = FollowUp(payment_id=subject.payment_id, provider_reference=subject.provider_reference,
                             follow_up_id=subject.follow_up_id)
        answer = await client.lookup(query, deadline, attempt)
        return settle_unknown(op, unknown, answer, client.mapping, follow_up_reference=query.follow_up_id)
