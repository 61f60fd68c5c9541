"""How a status query settles an unknown answer: the one rule that keeps failover safe.

Used right after an unknown call (by the executor) and later for orphans (by the reconciler,
which adds its own patience before it trusts an absence; see `gateway.reconciler`).

- The provider's answer wins where it has one: for a payment, its state; for a follow-up, the
  entry with our reference in the payment's list of captures, refunds and voids.
- "Not found" proves no charge only where the lookup has no lag and the provider had finished
  with the request (its own 500, not a timeout, a reset or a proxy's 502/504); then the unknown
  is reclassified as `unavailable` with `proven_absent`, and a retry or failover is safe.
- Otherwise, where the provider replays answers per key, re-sending with the same key is safe
  (it cannot charge twice) and will tell; anywhere else the answer stays unknown: `pending`.
- More than one charge for one payment is never dropped: the answer stays unknown with
  `duplicate_suspected`, so the payment is pending and flagged.
"""

from __future__ import annotations

import dataclasses

from domain.outcome import Outcome
from domain.types import FollowUpState, Lookup, Operation, ProviderResult, StatusAnswer
from gateway.policy import POLICY
from providers.base import ProviderMapping


def provider_finished(unknown: ProviderResult) -> bool:
    """Whether the unknown answer came from the provider having finished with the request (its
    own 500, say), so an immediate "not found" means no charge. After a read timeout, a reset, a
    proxy's 502/504, a request we hold a provider id for, or an in-progress duplicate, the
    provider may still be working on it, and a lookup now proves nothing."""
    return (unknown.reference is None and unknown.http_status is not None
            and unknown.http_status not in (409, 429, 502, 503, 504))


def follow_up_entry(answer: StatusAnswer, op: Operation, reference: str | None) -> FollowUpState | None:
    """Our follow-up in the provider's list of the payment's follow-ups, if it is there. A void
    listed without a reference is ours too: a payment is cancelled at most once, and a provider
    whose cancel takes no reference of ours (Stripe) lists it so."""
    for state in answer.follow_ups:
        if state.operation is not op:
            continue
        if (reference is not None and state.reference == reference) or (
                op is Operation.VOID and state.reference is None):
            return state
    return None


def settle_unknown(op: Operation, unknown: ProviderResult, answer: StatusAnswer, mapping: ProviderMapping,
                   *, follow_up_reference: str | None = None) -> ProviderResult:
    """Combine an unknown answer with the status query made right after it."""
    if answer.lookup is Lookup.FOUND and answer.charges > 1:
        return dataclasses.replace(unknown, duplicate_suspected=True, replay_safe=False,
                                   message=f"status query: {answer.charges} charges for one payment")
    if op in (Operation.AUTHORIZE, Operation.COMPLETE):  # the payment's own state answers both
        if answer.lookup is Lookup.FOUND and POLICY[answer.result.outcome].settles_charge:
            return answer.result
        absent = answer.lookup is Lookup.NOT_FOUND
    else:
        entry = follow_up_entry(answer, op, follow_up_reference) if answer.lookup is Lookup.FOUND else None
        if entry is not None and entry.outcome is not Outcome.UNKNOWN:
            return ProviderResult(entry.outcome, raw_code=f"{op.value}_{entry.outcome.value}",
                                  reference=unknown.reference, message="status query: the provider lists it")
        absent = answer.lookup is Lookup.FOUND and answer.follow_ups_listed and entry is None
    if absent and mapping.status_query_consistent and provider_finished(unknown):
        return dataclasses.replace(unknown, outcome=Outcome.UNAVAILABLE, proven_absent=True,
                                   message="status query: the provider holds no such request")
    if mapping.replays_answers:
        return dataclasses.replace(unknown, replay_safe=True)
    return unknown
