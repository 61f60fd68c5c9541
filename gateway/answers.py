"""What the checkout service gets back, decided in one place: the payment document, and the
HTTP status and body for every outcome of a payment, a follow-up or a front-door claim.

The service returns an `Answer`; the handler only writes it. What a key replays is the
`StoredResponse` of that answer, byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from domain.outcome import Outcome, PaymentStatus
from domain.types import Operation, ProviderResult
from gateway.journal.records import IdempotencyClaim, ClaimKind, PaymentRecord, StoredResponse

IDEMPOTENCY_HEADER = "Idempotency-Key"
RETRY_SOON = {"Retry-After": "1"}


def _retry_after(result: ProviderResult) -> dict[str, str]:
    """When a call not made could be: the provider quota's next token or its 429's wait, in
    whole seconds (at least 1); else soon. A checkout following a bare `1` would retry every
    second for as long as a slow quota takes."""
    if result.retry_after_s is None:
        return RETRY_SOON
    return {"Retry-After": str(max(1, math.ceil(result.retry_after_s)))}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def stored(self) -> StoredResponse:
        return StoredResponse(self.status, self.body)

    @classmethod
    def replay(cls, stored: StoredResponse) -> Answer:
        return cls(stored.status, stored.body, {"Idempotent-Replayed": "true"})


def error(status: int, code: str, message: str, field: str | None = None,
          headers: Mapping[str, str] | None = None) -> Answer:
    """Every error has one shape: `{code, message, field}`."""
    return Answer(status, orjson.dumps({"code": code, "message": message, "field": field}), headers or {})


def payment_doc(record: PaymentRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "status": record.status.value,
        "amount": record.amount,
        "currency": record.currency,
        "capture": record.capture,
        "merchant_reference": record.merchant_reference,
        "provider": record.provider,
        "provider_reference": record.provider_reference,
        "decline_code": record.decline_code,
        "error_code": record.error_code,
        "captured_amount": record.captured_amount,
        "refunded_amount": record.refunded_amount,
        "pending_follow_up": {"operation": record.follow_up.operation, "amount": record.follow_up.amount}
        if record.follow_up else None,
        "duplicate_charge_suspected": record.duplicate_charge_suspected,
        # What the shopper must do while the payment is `action_required` (3-D Secure).
        "action": record.action if record.status is PaymentStatus.ACTION_REQUIRED else None,
        "action_expires_at": record.action_expires_at if record.status is PaymentStatus.ACTION_REQUIRED else None,
        "card": {"brand": record.card_brand, "bin": record.card_bin, "last4": record.card_last4}
        if record.card_last4 else None,
        "attempts": [
            {"provider": a.provider, "try": a.try_number, "operation": a.operation, "outcome": a.outcome,
             "raw_code": a.raw_code, "http_status": a.http_status, "latency_ms": a.latency_ms,
             "failover_reason": a.failover_reason}
            for a in record.attempts
        ],
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def payment_answer(record: PaymentRecord) -> Answer:
    """A payment's answer (and every replay of its key): 201, or 502 when it failed."""
    return Answer(502 if record.status is PaymentStatus.FAILED else 201, orjson.dumps(payment_doc(record)))


def payment_read(record: PaymentRecord) -> Answer:
    return Answer(200, orjson.dumps(payment_doc(record)))


def follow_up_answer(record: PaymentRecord, op: Operation, result: ProviderResult) -> Answer:
    """200 done · 202 accepted, not yet confirmed (unknown, or the provider settles it later: the
    payment reads `<op>_pending`, its webhook or the reconciler settles it, and the key replays
    this until then) · 422 refused by the provider · 503 not sent (the caller may retry the key)."""
    if result.outcome is Outcome.UNKNOWN or result.settles_later:
        return Answer(202, orjson.dumps(payment_doc(record)))
    if result.outcome is Outcome.APPROVED:
        return payment_read(record)
    if result.outcome is Outcome.UNAVAILABLE:
        return error(503, "provider_unavailable", f"{record.provider} did not take the {op.value} "
                     f"({result.raw_code}); retry with the same Idempotency-Key", headers=_retry_after(result))
    return error(422, f"{op.value}_refused", f"{record.provider} refused the {op.value}: {result.raw_code}")


def completion_answer(record: PaymentRecord, result: ProviderResult) -> Answer:
    """/complete: 200 with the payment (approved, declined, or still `action_required`: the
    shopper has not finished) · 202 the provider's answer is unknown (call again) · 422 the
    provider refused the completion (the return is not this payment's, or incomplete) · 503
    not sent. The payment stays `action_required` in all but the first."""
    if result.outcome is Outcome.UNKNOWN:
        return Answer(202, orjson.dumps(payment_doc(record)))
    if result.outcome is Outcome.UNAVAILABLE:
        return error(503, "provider_unavailable", f"{record.provider} did not answer the completion "
                     f"({result.raw_code}); retry", headers=_retry_after(result))
    if result.outcome is Outcome.REJECTED:
        return error(422, "completion_refused", f"{record.provider} refused the completion: "
                     f"{result.message or result.raw_code}", "return_params")
    return payment_read(record)


def over_quota(route: str, wait_s: float) -> Answer:
    """Every provider of the route is at its request quota: nothing was sent nor claimed, so the
    same Idempotency-Key may be sent again after Retry-After (whole seconds, at least one)."""
    return error(503, "overloaded", f"every provider of route {route} is at its request quota; retry after "
                 "Retry-After with the same Idempotency-Key", headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def follow_up_not_made(op: Operation) -> Answer:
    """A follow-up answered "accepted" (202) that the provider proved it never received."""
    return error(409, f"{op.value}_not_made", f"the provider never received this {op.value}; the payment is as it "
                 "was before it, and it may be sent again with a new Idempotency-Key", "status")


def payment_not_found() -> Answer:
    return error(404, "payment_not_found", "no payment with this id", "payment_id")


def invalid_state(message: str) -> Answer:
    return error(409, "invalid_payment_state", message, "status")


IN_PROGRESS_RETRY_AFTER_S = 2  # a request at the provider: its answer comes within a provider call
AWAITING_PROVIDER_RETRY_AFTER_S = 30  # accepted (202), confirmed by a webhook or the reconciler's lookup


def in_progress(message: str, retry_after_s: int = IN_PROGRESS_RETRY_AFTER_S) -> Answer:
    """A 409 that will not last: another operation on the payment is at its provider. Retry-After
    tells the checkout when asking again gets the answer to the payment as it is then."""
    return error(409, "invalid_payment_state", message, "status", {"Retry-After": str(retry_after_s)})


def amount_too_large(message: str) -> Answer:
    return error(422, "amount_too_large", message, "amount")


def claim_answer(claim: IdempotencyClaim) -> Answer:
    """What to send instead when the front-door key is not this request's to run."""
    match claim.kind:
        case ClaimKind.REPLAY:
            assert claim.response is not None
            return Answer.replay(claim.response)
        case ClaimKind.IN_FLIGHT:
            return error(409, "idempotency_key_in_use",
                         "a request with this Idempotency-Key is still being processed; retry later",
                         IDEMPOTENCY_HEADER, headers=RETRY_SOON)
        case ClaimKind.MISMATCH:
            return error(422, "idempotency_key_reused",
                         "this Idempotency-Key was used with a different request body", IDEMPOTENCY_HEADER)
    raise AssertionError(claim.kind)
