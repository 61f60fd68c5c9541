"""The one policy table: what each outcome class lets the engine do next.

It mirrors the outcome table of DESIGN.md row for row. The executor (retry the same provider?),
the orchestrator (fail over? which payment status?) and the reconciler (does this answer settle
a possible charge?) all read it here; none of them decides on its own.

An `unknown` answer is never failed over as such. A status query that proves the provider holds
no such payment reclassifies it as `unavailable` with `proven_absent` set (the taxonomy's
"provably not processed"), and only that may move on to the next provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Mapping

from domain.outcome import Outcome, PaymentStatus
from domain.types import ProviderResult


class Retry(Enum):
    NEVER = "never"
    YES = "yes"  # with backoff and the same idempotency key
    IF_REPLAY_SAFE = "if_replay_safe"  # only where the provider replays answers per key


class FailOver(Enum):
    NEVER = "never"
    YES = "yes"
    IF_CASCADE_ALLOWED = "if_cascade_allowed"  # once per payment, for codes the route lists


@dataclass(frozen=True, slots=True)
class Rule:
    retry: Retry
    fail_over: FailOver
    settles_charge: bool  # the provider said what became of the payment: no earlier call is left open
    breaker_failure: bool  # says something about the provider's health
    status: PaymentStatus  # the payment's status when this is its last answer


POLICY: Mapping[Outcome, Rule] = MappingProxyType({
    Outcome.APPROVED: Rule(Retry.NEVER, FailOver.NEVER, True, False, PaymentStatus.APPROVED),
    Outcome.HARD_DECLINE: Rule(Retry.NEVER, FailOver.NEVER, True, False, PaymentStatus.DECLINED),
    Outcome.SOFT_DECLINE: Rule(Retry.NEVER, FailOver.IF_CASCADE_ALLOWED, True, False, PaymentStatus.DECLINED),
    Outcome.UNAVAILABLE: Rule(Retry.YES, FailOver.YES, False, True, PaymentStatus.FAILED),
    Outcome.UNKNOWN: Rule(Retry.IF_REPLAY_SAFE, FailOver.NEVER, False, True, PaymentStatus.PENDING),
    Outcome.REJECTED: Rule(Retry.NEVER, FailOver.NEVER, False, False, PaymentStatus.FAILED),
    # The provider holds the payment, waiting for its shopper: that settles where an earlier call
    # went (nothing else is open), and binds the payment to this provider for good.
    Outcome.ACTION_REQUIRED: Rule(Retry.NEVER, FailOver.NEVER, True, False, PaymentStatus.ACTION_REQUIRED),
})


def worth_retrying(result: ProviderResult) -> bool:
    """Another try at the same provider with the same key. Never after a local refusal (breaker,
    bulkhead, deadline: move on instead), nor when the provider said not to (Stripe-Should-Retry:
    false, e.g. a stored error it will replay for this key forever)."""
    if result.refusal is not None or result.retry_hint is False:
        return False
    rule = POLICY[result.outcome].retry
    return rule is Retry.YES or (rule is Retry.IF_REPLAY_SAFE and result.replay_safe)


def may_fail_over(result: ProviderResult, *, cascade_allowed: bool) -> bool:
    rule = POLICY[result.outcome].fail_over
    return rule is FailOver.YES or (rule is FailOver.IF_CASCADE_ALLOWED and cascade_allowed)


def settles_possible_charge(result: ProviderResult) -> bool:
    """An approval, a decline, or a status query's proof that nothing was charged. Anything else
    (a refusal before sending, a proxy's 4xx, another unknown) leaves an earlier call open."""
    return POLICY[result.outcome].settles_charge or result.proven_absent


def rate_limited(result: ProviderResult) -> bool:
    """The provider's own rate-limit answer (429, not processed): its account is past its
    quota, not failing. The provider is held off for its Retry-After instead (payments move on
    to the next candidate; `gateway.provider_pool.ProviderHandle.hold_off`)."""
    return result.refusal is None and result.outcome is Outcome.UNAVAILABLE and result.http_status == 429


def counts_against_breaker(result: ProviderResult) -> bool:
    """Says the provider is failing. A rate limit does not: opening the breaker on a quota's
    429s took the primary out for the breaker's whole reset time and sent its traffic to the
    backups at once (a rehearsal saw their breakers open one after another)."""
    return result.refusal is None and POLICY[result.outcome].breaker_failure and not rate_limited(result)


def is_final(result: ProviderResult) -> bool:
    """The provider decided the payment (approved or declined): nothing is left to wait for."""
    return result.outcome is Outcome.APPROVED or result.outcome.is_decline


def payment_status(result: ProviderResult) -> PaymentStatus:
    """The one mapping from a payment's last answer to what the checkout sees."""
    return POLICY[result.outcome].status
