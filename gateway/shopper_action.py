"""A payment waiting for its shopper (3-D Secure, a redirect): the few state changes that every
path through it shares, so the create call, `/complete`, the reconciler's expiry and a
provider's webhook cannot disagree on what "waiting" and "finished" mean.

`action_required` binds the payment to the provider that asked for the action: the shopper is
at that provider now, and a call anywhere else could charge them a second time. So nothing here
ever picks another provider; what finishes the payment is that provider's own answer.
"""

from __future__ import annotations

import time

from domain.outcome import Outcome, PaymentStatus
from domain.types import Operation, ProviderResult
from gateway.journal.records import PaymentRecord
from gateway.policy import is_final, payment_status

EXPIRED = "expired"  # error_code of a payment whose shopper never finished the action


def bind_action(record: PaymentRecord, result: ProviderResult, expiry_s: float, now: float | None = None) -> None:
    """The provider holds the payment for its shopper: keep its reference, the action, and when
    an unfinished one expires."""
    record.status = PaymentStatus.ACTION_REQUIRED
    record.provider_reference = result.reference or record.provider_reference
    record.action = result.action.to_doc() if result.action is not None else None
    record.action_expires_at = (time.time() if now is None else now) + expiry_s


def waiting(record: PaymentRecord) -> bool:
    return record.status is PaymentStatus.ACTION_REQUIRED


def finish_action(record: PaymentRecord, result: ProviderResult) -> bool:
    """The provider decided a waiting payment (approved or declined): settle it. False, and
    nothing changed, when the payment is no longer waiting (a completion or webhook came first:
    whichever comes second changes nothing) or the answer decides nothing yet."""
    if not waiting(record) or not is_final(result):
        return False
    record.status, record.outcome = payment_status(result), result.outcome.value
    if result.outcome is Outcome.APPROVED:
        if record.capture:
            record.captured_amount = record.amount
    else:
        record.decline_code = result.raw_code
    record.action = None
    return True


def expire_action(record: PaymentRecord) -> None:
    """The shopper never finished and the provider cancelled the payment: nothing was charged."""
    record.status, record.error_code, record.action = PaymentStatus.FAILED, EXPIRED, None


def cancelling(record: PaymentRecord) -> bool:
    """Whether the expiry's cancel of an unsettled payment is journalled and not yet settled (a
    pending `void` on an `action_required` payment, or on a `pending` one at a provider without
    a lookup: sent, or about to be, or accepted and reported later). A merchant's void is of an
    approved payment (`void_pending`). Meanwhile the shopper's outcome waits: the provider's
    answer to the cancel says whether it voided what the shopper just finished."""
    return (record.status in _CANCELLABLE and record.follow_up is not None
            and record.follow_up.operation == Operation.VOID.value)


_CANCELLABLE = frozenset({PaymentStatus.ACTION_REQUIRED, PaymentStatus.PENDING})


def settle_cancel(record: PaymentRecord, outcome: Outcome) -> bool:
    """The provider's answer to the expiry's cancel. Accepted (done, not merely received): the
    payment is expired, even if the shopper finished in the instant before (a manual-capture
    authorisation voided by it; nothing was charged). Refused or not made: the payment waits for
    its shopper again, whose outcome settles it (a lookup, the webhook, `/complete`), and the
    expiry cancels it again at a later pass if none comes. True when it expired."""
    record.follow_up = None
    if outcome is Outcome.APPROVED:
        expire_action(record)
        return True
    return False


def action_due(record: PaymentRecord, now: float) -> bool:
    """Whether the reconciler should act on a waiting payment now: its action has expired, or a
    cancel it started is still to be confirmed."""
    return record.action_cancelling or (record.action_expires_at is not None and now >= record.action_expires_at)
