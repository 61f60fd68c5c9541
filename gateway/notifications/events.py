"""Which late outcome the checkout is told about: one pure function of the state a background
settler found and the state it leaves.

Only settlers call it (the reconciler, the provider-webhook processor), through
`PaymentService.commit(..., settled_from=...)`; the request path never does, so an outcome the
caller got in its own HTTP answer is never notified. And because an event needs a payment (or a
follow-up) that was unsettled before and settled after, a replayed or second settlement of the
same thing (a duplicate provider webhook, a reconciler pass that lost its race) yields nothing:
the row it finds is already final.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from domain.outcome import PaymentStatus
from domain.types import Operation
from gateway.journal.records import PaymentRecord


class EventType(StrEnum):
    PAYMENT_APPROVED = "payment.approved"
    PAYMENT_DECLINED = "payment.declined"
    PAYMENT_FAILED = "payment.failed"
    CAPTURE_SUCCEEDED = "capture.succeeded"
    CAPTURE_FAILED = "capture.failed"
    REFUND_SUCCEEDED = "refund.succeeded"
    REFUND_FAILED = "refund.failed"
    VOID_SUCCEEDED = "void.succeeded"
    VOID_FAILED = "void.failed"


@dataclass(frozen=True, slots=True)
class Settling:
    """What a settler found in the row before it changed it (take it before the first change)."""

    status: PaymentStatus
    follow_up: Operation | None  # the pending follow-up's operation (capture, void, refund), if any
    captured_amount: int
    refunded_amount: int

    @classmethod
    def of(cls, record: PaymentRecord) -> Settling:
        return cls(record.status, Operation(record.follow_up.operation) if record.follow_up is not None else None,
                   record.captured_amount, record.refunded_amount)


# A payment without a final answer yet: what the reconciler (or a webhook) may settle. One
# waiting for its shopper (3-D Secure) is settled by the provider's webhook, or expires.
_UNSETTLED = frozenset({PaymentStatus.RECEIVED, PaymentStatus.ATTEMPTING, PaymentStatus.PENDING,
                        PaymentStatus.ACTION_REQUIRED})
_PAYMENT_EVENTS = {
    PaymentStatus.APPROVED: EventType.PAYMENT_APPROVED,
    PaymentStatus.DECLINED: EventType.PAYMENT_DECLINED,
    PaymentStatus.FAILED: EventType.PAYMENT_FAILED,
}
# operation -> (succeeded, failed). Success is read from what moved (a refund after an earlier
# partial refund returns to `refunded` whether or not it was made).
_FOLLOW_UP_EVENTS = {
    Operation.CAPTURE: (EventType.CAPTURE_SUCCEEDED, EventType.CAPTURE_FAILED),
    Operation.REFUND: (EventType.REFUND_SUCCEEDED, EventType.REFUND_FAILED),
    Operation.VOID: (EventType.VOID_SUCCEEDED, EventType.VOID_FAILED),
}


def _payments_own(before: Settling) -> bool:
    """A pending follow-up that belongs to the payment's own settlement, not the merchant's: a
    `/complete` whose request died, or the expiry's cancel (of a challenge, or of an Adyen payment
    left pending); a merchant's void is of an approved payment (`void_pending`)."""
    return before.follow_up is Operation.COMPLETE or (
        before.follow_up is Operation.VOID and before.status in _UNSETTLED)


def _follow_up_made(operation: Operation, before: Settling, after: PaymentRecord) -> bool:
    if operation is Operation.CAPTURE:
        return after.captured_amount > before.captured_amount
    if operation is Operation.REFUND:
        return after.refunded_amount > before.refunded_amount
    return after.status is PaymentStatus.VOIDED


def late_event(before: Settling, after: PaymentRecord) -> EventType | None:
    """The event a settler's transition from `before` to `after` yields, or None.

    - a pending follow-up (capture, refund, void) that is settled now: `<op>.succeeded` when it
      was made, `<op>.failed` when the provider refused it or it proved never made;
    - a follow-up the provider reports failed after its success (Adyen `REFUND_FAILED` or
      `CAPTURE_FAILED` after `REFUND`/`CAPTURE`, a Stripe `refund.failed`): the amount the
      settler took back yields `<op>.failed`, after the `<op>.succeeded` the checkout heard;
    - an unsettled payment (received, attempting, pending, action_required; a `/complete` whose
      request died is the payment's own) that is final now: `payment.approved`,
      `payment.declined` or `payment.failed` (an abandoned 3-D Secure challenge: `error_code`
      `expired`; the expiry's cancel, a void pending on a payment still waiting for its shopper,
      is the payment's own too);
    - anything else (still pending, or already final before): nothing."""
    if before.follow_up is not None and not _payments_own(before):
        if after.follow_up is not None:
            return None
        succeeded, failed = _FOLLOW_UP_EVENTS[before.follow_up]
        return succeeded if _follow_up_made(before.follow_up, before, after) else failed
    if before.follow_up is None:
        if after.refunded_amount < before.refunded_amount:
            return EventType.REFUND_FAILED
        if after.captured_amount < before.captured_amount:
            return EventType.CAPTURE_FAILED
    if before.status in _UNSETTLED and after.follow_up is None:
        return _PAYMENT_EVENTS.get(after.status)
    return None
