"""One provider call, written once: the payment's attempts, follow-ups, and the executor's and
the reconciler's status queries all go through `ProviderClient`.

A call: the deadline check, building the request (our own bad input is `rejected`, never the
provider's fault), the breaker's admission, the journal hook (the attempt is on disk before the
provider can see the request), the quota's token (taken at the moment of the call, after the
journal write whose duration varies, so the provider sees the requests spaced as they were
taken; a payment's first call comes with its token reserved: `gateway.quota`), a bulkhead
slot, the breaker guard, the send with a per-try timeout cut to the request's deadline, the
mapping's classification, the translation of transport errors, and the attempt record and
metrics filled in. Local refusals come back as
`ProviderResult.refused(LocalRefusal…)`; nothing here raises for a provider's answer.

Each call and each status query is a span (`gateway.tracing`) with the attempt record's provider,
try, outcome class, raw code, breaker state and failover reason. Nothing of the caller's trace
context is sent: the request is the mapping's, and the mapping knows no trace.

A payment's authorisation that finds the quota empty, or the provider held off after its 429
(`ProviderHandle.hold_off`: a rate limit, no breaker failure), is refused at once (`over_quota`),
and the payment spills over to its next candidate; a call bound to this provider (follow-up,
status query, completion) waits for its token, or the 429's wait, while its deadline allows,
never past it.

A timeout that the caller's own deadline caused (the per-try timeout was cut short to fit it)
is not the provider's failure: it never counts against the shared breaker or the health and
latency windows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry.trace import SpanKind

from domain.outcome import LocalRefusal
from domain.types import FollowUp, Lookup, Operation, PaymentOrder, ProviderResult, StatusAnswer
from gateway.breaker import BreakerOpen, NoVerdict, ProviderFailure
from gateway.bulkhead import BulkheadFull, BulkheadTimeout
from gateway.journal.records import Attempt
from gateway.metrics import Metrics
from gateway.policy import counts_against_breaker, rate_limited
from gateway.provider_pool import ProviderHandle
from gateway.tracing.spans import NO_TRACING, Tracing
from providers.base import ProviderRequest, ProviderResponse
from providers.classify import lookup_failed, result_from_transport_error
from providers.errors import TransportError

MIN_TRY_S = 0.05
TIMEOUT_CODES = frozenset({"read_timeout", "connect_timeout"})
MAX_QUOTA_WAITS = 20  # a bound call's waits for a token (other processes may take each one first)

BeforeSend = Callable[[], Awaitable[None]]
T = TypeVar("T")
SPAN_NAMES = {op: f"provider.{op.value}" for op in Operation}  # formatted once, not per call


class _Refused(NoVerdict):
    """Internal: the call ended before anything was sent, with this refusal (inside the breaker's
    guard too: no verdict on the provider)."""

    def __init__(self, refusal: LocalRefusal, message: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.result = ProviderResult.refused(refusal, message, retry_after_s)


class _Failed(ProviderFailure):
    """Internal: an answer (or a transport failure) that counts against the breaker, carried out
    of the guard, which must see it raised."""

    def __init__(self, value: object) -> None:
        super().__init__("provider failure")
        self.value = value


class _Unjudged(NoVerdict):
    """Internal: an answer that says nothing of the provider's health, carried out of the guard
    without a verdict: a timeout the caller's deadline cut short (`cut`), or a 429."""

    def __init__(self, value: object, *, cut: bool) -> None:
        super().__init__("no verdict")
        self.value = value
        self.cut = cut


class ProviderClient:
    def __init__(self, handle: ProviderHandle, metrics: Metrics, tracing: Tracing = NO_TRACING) -> None:
        self.handle = handle
        self.name = handle.name
        self.mapping = handle.mapping
        self._metrics = metrics
        self._tracing = tracing
        self._denied = metrics.quota_denied.labels(self.name)
        self._rate_limited = metrics.provider_rate_limited.labels(self.name)

    def new_attempt(self, op: Operation, try_number: int, key: str | None, *,
                    amount: int | None = None, failover_reason: str | None = None) -> Attempt:
        return Attempt(provider=self.name, try_number=try_number, operation=op.value, idempotency_key=key,
                       started_at=time.time(), breaker_state=self.handle.breaker.state, amount=amount,
                       failover_reason=failover_reason)

    async def call(self, op: Operation, subject: PaymentOrder | FollowUp, key: str | None, deadline: float,
                   attempt: Attempt, *, before_send: BeforeSend | None = None, prepaid: bool = False) -> ProviderResult:
        """`op` at this provider, once. `before_send` runs after the local checks pass and
        before any byte leaves: the journal write of `attempt`. `prepaid`: its quota token is
        already taken (a payment's first call, reserved with its spill-over: `gateway.quota`).

        A status query is `lookup`'s (its answer is a `StatusAnswer`, not an outcome): `call`
        raises ValueError for `Operation.STATUS` before anything is checked or sent."""
        if op is Operation.STATUS:
            raise ValueError("a status query goes through ProviderClient.lookup, which answers a StatusAnswer")
        with self._tracing.span(SPAN_NAMES[op], kind=SpanKind.CLIENT) as span:
            result = await self._call(op, subject, key, deadline, attempt, before_send, prepaid)
            span.attempt(attempt)
            return result

    async def _call(self, op: Operation, subject: PaymentOrder | FollowUp, key: str | None, deadline: float,
                    attempt: Attempt, before_send: BeforeSend | None, prepaid: bool) -> ProviderResult:
        started = time.monotonic()
        try:
            request = self._admit(op, subject, key, deadline)
            if before_send is not None:
                await before_send()
            await self._wait_out_429(op, deadline)
            if not prepaid and self.handle.quota is not None:
                await self._take_token(op, deadline)
            sent = time.monotonic()
            result, caller_cut = await self._exchange(request, deadline, lambda r: self.mapping.parse(op, r),
                                                      _result_verdict, lambda e: e)
        except _Refused as refused:
            return self._finish(attempt, refused.result, started)
        limited = rate_limited(result)
        if limited:
            self._held_off(result)
        if op is Operation.AUTHORIZE and not caller_cut:
            # A 429 is no breaker failure, but no success either: a provider that turns away
            # a share of its calls is demoted (`routes[].demote_below`) like a failing one.
            self.handle.success.record(not (limited or counts_against_breaker(result)))
            if not limited:  # answered at once, without the work: it would pull the p99 down
                self.handle.latency.record((time.monotonic() - sent) * 1000)
        return self._finish(attempt, result, started)

    async def lookup(self, subject: FollowUp, deadline: float, attempt: Attempt) -> StatusAnswer:
        """A status query: found (with the payment's state, its charges and follow-ups), not
        found, or unknown (the query itself failed: it proves nothing)."""
        with self._tracing.span(SPAN_NAMES[Operation.STATUS], kind=SpanKind.CLIENT) as span:
            started = time.monotonic()
            try:
                request = self._admit(Operation.STATUS, subject, None, deadline)
                await self._wait_out_429(Operation.STATUS, deadline)
                if self.handle.quota is not None:
                    await self._take_token(Operation.STATUS, deadline)
                answer, _ = await self._exchange(request, deadline, self.mapping.parse_status, _answer_verdict,
                                                 lookup_failed)
            except _Refused as refused:
                answer = lookup_failed(refused.result)
            if rate_limited(answer.result):
                self._held_off(answer.result)
            self._finish(attempt, answer.result, started, lookup=answer.lookup)
            span.attempt(attempt)
            return answer

    def _admit(self, op: Operation, subject: PaymentOrder | FollowUp, key: str | None,
               deadline: float) -> ProviderRequest:
        if time.monotonic() + MIN_TRY_S > deadline:
            raise _Refused(LocalRefusal.DEADLINE_EXCEEDED)
        try:
            request = self.mapping.build(op, subject, key)
        except ValueError as exc:
            raise _Refused(LocalRefusal.NOT_BUILDABLE, str(exc)) from None
        if not self.handle.breaker.allows_call():
            raise _Refused(LocalRefusal.BREAKER_OPEN)
        return request

    async def _wait_out_429(self, op: Operation, deadline: float) -> None:
        """The provider's last 429 asked us to wait: an authorisation moves on at once (to the
        next candidate); anything bound to this provider waits within its deadline."""
        wait = self.handle.held_off_s()
        if wait == 0.0:
            return
        if op is Operation.AUTHORIZE or time.monotonic() + wait + MIN_TRY_S > deadline:
            raise _Refused(LocalRefusal.OVER_QUOTA, f"{self.name} answered 429: waiting {wait:.2f}s more", wait)
        await asyncio.sleep(wait)

    def _held_off(self, result: ProviderResult) -> None:
        self.handle.hold_off(result.retry_after_s)
        self._rate_limited.inc()

    async def _take_token(self, op: Operation, deadline: float) -> None:
        """One token of the provider's quota for the request about to be sent. An authorisation
        moves on at once (the payment has other candidates, or is answered with Retry-After);
        anything bound to this provider waits for its token within the deadline."""
        quota = self.handle.quota
        assert quota is not None
        for _ in range(MAX_QUOTA_WAITS):
            wait = await quota.take()
            if wait == 0.0:
                return
            if op is Operation.AUTHORIZE or time.monotonic() + wait + MIN_TRY_S > deadline:
                break
            await asyncio.sleep(wait)
        self._denied.inc()
        raise _Refused(LocalRefusal.OVER_QUOTA, f"{self.name}'s quota ({quota.rate:g}/s) has no token left",
                       quota.wait_s())

    async def _exchange(self, request: ProviderRequest, deadline: float, parse: Callable[[ProviderResponse], T],
                        verdict: Callable[[T], bool | None],
                        from_transport: Callable[[ProviderResult], T]) -> tuple[T, bool]:
        """Bulkhead slot, breaker guard, send, classify. Returns the classified answer and whether
        the caller's deadline cut the try short (then a timeout is not the provider's failure).
        `verdict`: True a failure of the provider, False a success, None neither (a 429)."""
        handle = self.handle
        try:
            async with handle.bulkhead.slot(deadline):
                async with handle.breaker.guard():
                    timeout = min(handle.timeout_s, deadline - time.monotonic())
                    if timeout < MIN_TRY_S:
                        raise _Refused(LocalRefusal.DEADLINE_EXCEEDED)
                    try:
                        value = parse(await handle.transport.send(request, timeout))
                    except TransportError as exc:
                        value = from_transport(result_from_transport_error(exc))
                        if exc.code in TIMEOUT_CODES and self._cut_short(exc.code, timeout):
                            raise _Unjudged(value, cut=True) from None
                    judged = verdict(value)
                    if judged is None:
                        raise _Unjudged(value, cut=False)
                    if judged:
                        raise _Failed(value)
                    return value, False
        except _Failed as failed:
            return failed.value, False  # type: ignore[return-value]
        except _Unjudged as unjudged:
            return unjudged.value, unjudged.cut  # type: ignore[return-value]
        except BreakerOpen as exc:
            raise _Refused(LocalRefusal.BREAKER_OPEN, str(exc)) from None
        except BulkheadFull as exc:
            raise _Refused(LocalRefusal.BULKHEAD_FULL, str(exc)) from None
        except BulkheadTimeout as exc:
            raise _Refused(LocalRefusal.BULKHEAD_TIMEOUT, str(exc)) from None

    def _cut_short(self, code: str, timeout: float) -> bool:
        """Whether a timeout says nothing of the provider: the caller's deadline left this try
        under half the phase's budget (connect_timeout_ms to connect, timeout_ms in all). A
        provider that had most of its time is failing, whatever the deadline: tight deadlines
        must not keep a hanging provider's breaker closed. A trial (the breaker not closed)
        is always judged, so a failing provider is never sent a stream of trials."""
        handle = self.handle
        budget = handle.config.connect_timeout_ms / 1000 if code == "connect_timeout" else handle.timeout_s
        return timeout < budget / 2 and handle.breaker.state == "closed"

    def _finish(self, attempt: Attempt, result: ProviderResult, started: float, *,
                lookup: Lookup | None = None) -> ProviderResult:
        latency = time.monotonic() - started
        attempt.outcome = lookup.value if lookup is Lookup.NOT_FOUND else result.outcome.value
        attempt.raw_code = result.raw_code
        attempt.http_status = result.http_status
        attempt.reference = result.reference
        attempt.latency_ms = round(latency * 1000, 3)
        attempt.message = result.message
        self._metrics.attempts.labels(self.name, attempt.operation, result.outcome.value).inc()
        self._metrics.attempt_latency.labels(self.name).observe(latency)
        return result


def _result_verdict(result: ProviderResult) -> bool | None:
    """A 429 is neither (the account's quota, not the provider's health: it counted as a
    success, resetting the count of a failing provider's 5xx); else whether it fails."""
    return None if rate_limited(result) else counts_against_breaker(result)


def _answer_verdict(answer: StatusAnswer) -> bool | None:
    if rate_limited(answer.result):
        return None
    return answer.lookup is Lookup.UNKNOWN and counts_against_breaker(answer.result)
