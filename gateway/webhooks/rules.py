"""What one provider event does to the payment it reports on: the payment's state machine, as a
pure decision on the record as it is now.

The rules, so that deliveries at least once and in any order converge on the provider's truth:
- An authorisation result settles only a `pending` payment (the reconciler's: an unknown
  outcome, or a request that died). A `received`/`attempting` payment belongs to a live request
  (or to the reconciler once its deadline has passed): the event waits for that. Any other state
  is final or past it, so a late `AUTHORISATION success=false` never undoes an approval, a
  capture or a refund, and a replay changes nothing.
- A capture, refund or cancel result settles the payment's pending follow-up of that kind, once
  it was answered (202; a follow-up whose request is still running waits), when the reference
  the provider echoes is that follow-up's (or none). Without a pending one it changes nothing:
  the follow-up was settled already (by its answer, a lookup, or this event's first delivery)...
- ...unless it is a failure reported after the success (`reverses`: Adyen CAPTURE_FAILED,
  REFUND_FAILED, a Stripe refund that failed later), of that follow-up or of an earlier one
  while another is pending: that takes its amount back off the payment, once, and only if the
  follow-up's settled record (`SettledFollowUp`) says it was counted; the follow-up's key then
  answers that it was refused.
- An authorisation result also settles a payment waiting for its shopper (`action_required`,
  3-D Secure) exactly as `/complete` would; a completion still running decides first.
- The expiry's cancel of a waiting payment (its pending void) holds the shopper's outcome back
  until the provider reports the cancel: done, the payment expired; refused, the shopper's
  outcome settles it after all.
- A charge reported by a provider the journal does not hold the payment at is never applied; it
  flags the payment `duplicate_charge_suspected` for ops (a charge we did not route there). One
  reported for a payment we hold as declined or failed is not applied either (a final answer was
  given): it raises an alarm (ops line `webhook_contradicts_journal`) and flags the payment the
  same way, except the manual-capture authorisation that the expiry's accepted cancel voided.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from domain.outcome import Outcome, PaymentStatus
from domain.types import Operation, ProviderResult
from domain.webhook import EventKind, ProviderEvent
from gateway.journal.records import PaymentRecord, SettledFollowUp
from gateway.orchestrator import apply_follow_up
from gateway.shopper_action import EXPIRED, cancelling, finish_action, settle_cancel

FOLLOW_UP_KINDS = {EventKind.CAPTURE: Operation.CAPTURE, EventKind.REFUND: Operation.REFUND,
                   EventKind.CANCEL: Operation.VOID}
_WAITING = (PaymentStatus.RECEIVED, PaymentStatus.ATTEMPTING)


class Effect(Enum):
    NONE = "none"  # nothing to write: the event is `unchanged`
    WAIT = "wait"  # not yet: a live request owns the payment; the event stays pending
    PAYMENT = "payment"  # the payment settled: its keys replay the payment's answer
    FOLLOW_UP = "follow_up"  # a follow-up settled (or undone): its key, if known, replays `result`'s answer
    SUSPECT = "suspect"  # a charge at a provider the journal does not name: flag it


@dataclass(frozen=True, slots=True)
class Decision:
    effect: Effect
    outcome: str  # for ops and the transaction log: what happened, or why nothing did
    operation: Operation | None = None  # the follow-up settled
    provider_key: str | None = None  # ... and its provider key (the key claimed for it), where known
    result: ProviderResult | None = None
    alarm: bool = False  # the provider contradicts a final state of ours: ops must look (never overwritten)


def decide(record: PaymentRecord, provider: str, event: ProviderEvent) -> Decision:
    """Apply `event` (from `provider`) to `record` in place where it changes it; say what it did."""
    if event.kind is EventKind.OTHER or event.success is None:
        return Decision(Effect.NONE, f"{event.type}: not a final outcome we act on")
    if record.provider != provider:
        if event.kind is EventKind.AUTHORISATION and event.success:
            if record.duplicate_charge_suspected:
                return Decision(Effect.NONE, f"charge at {provider} already flagged")
            record.duplicate_charge_suspected = True
            return Decision(Effect.SUSPECT, f"charged at {provider}, journalled at {record.provider}")
        return Decision(Effect.NONE, f"from {provider}; the payment is at {record.provider}")
    if event.kind is EventKind.AUTHORISATION:
        return _authorisation(record, event)
    return _follow_up(record, event, FOLLOW_UP_KINDS[event.kind])


def _authorisation(record: PaymentRecord, event: ProviderEvent) -> Decision:
    if record.status in _WAITING and record.follow_up is None:
        return Decision(Effect.WAIT, f"payment {record.status.value}: its request decides first")
    if cancelling(record):
        return Decision(Effect.WAIT, "the expiry's cancel is at the provider: its answer decides first")
    if record.status is PaymentStatus.ACTION_REQUIRED:
        return _shopper_back(record, event)
    if event.success and record.status in (PaymentStatus.DECLINED, PaymentStatus.FAILED):
        return _contradiction(record)
    if record.status is not PaymentStatus.PENDING or record.follow_up is not None:
        return Decision(Effect.NONE, f"payment already {record.status.value}")
    record.error_code = None  # why it was pending (a 500, a timeout) is not the final answer's
    if event.success:
        record.status, record.outcome = PaymentStatus.APPROVED, Outcome.APPROVED.value
        record.provider_reference = event.provider_reference or record.provider_reference
        if record.capture:
            record.captured_amount = record.amount
        return Decision(Effect.PAYMENT, "approved")
    # The provider's notification carries its refusal reason, not our decline table's class:
    # a decline settled this way is never cascaded (the payment is final).
    record.status, record.outcome = PaymentStatus.DECLINED, Outcome.HARD_DECLINE.value
    record.decline_code = event.reason or "refused"
    return Decision(Effect.PAYMENT, "declined")


def _contradiction(record: PaymentRecord) -> Decision:
    """A charge notified for a payment we answered as declined or failed. One exception is
    expected, not alarming: a manual-capture authorisation the shopper finished in the instant
    before the expiry's cancel, which that cancel (accepted: the payment expired) voided. Any
    other is never applied over the final answer, but flags the payment for ops (the flag,
    `gateway_duplicate_charges_suspected_total`, the ops lines), as a charge we did not route."""
    if record.error_code == EXPIRED and not record.capture:
        return Decision(Effect.NONE, "authorised before the expiry's cancel voided it")
    detail = f"charge notified for a {record.status.value} payment"
    if record.duplicate_charge_suspected:
        return Decision(Effect.NONE, f"{detail} (already flagged)", alarm=True)
    record.duplicate_charge_suspected = True
    return Decision(Effect.SUSPECT, detail, alarm=True)


def _shopper_back(record: PaymentRecord, event: ProviderEvent) -> Decision:
    """The shopper's 3-D Secure outcome, notified: it settles the waiting payment just as
    `/complete` does (`gateway.shopper_action.finish_action`). A completion still running
    decides first; one that came first left the payment final, so this changes nothing."""
    if record.follow_up is not None:
        return Decision(Effect.WAIT, f"a {record.follow_up.operation} of the payment is running")
    result = ProviderResult(Outcome.APPROVED if event.success else Outcome.HARD_DECLINE,
                            raw_code=None if event.success else (event.reason or "refused"))
    finish_action(record, result)
    return Decision(Effect.PAYMENT, "approved" if event.success else "declined")


def _follow_up(record: PaymentRecord, event: ProviderEvent, op: Operation) -> Decision:
    pending = record.follow_up
    of_pending = (pending is not None and pending.operation == op.value
                  and event.follow_up_reference in (None, pending.provider_key, record.id))
    if event.reverses and not of_pending:
        # A failure of another, settled follow-up: Adyen's REFUND_FAILED for the first refund
        # while a second one is pending was dropped, and the journal kept counting it.
        return _reverse(record, event, op)
    if pending is None or pending.operation != op.value:
        return Decision(Effect.NONE, f"no {op.value} pending (payment {record.status.value})")
    if not of_pending:
        return Decision(Effect.NONE, f"another {op.value} than the one pending")
    assert pending is not None
    if not pending.answered:
        return Decision(Effect.WAIT, f"{op.value} request still running")
    outcome = Outcome.APPROVED if event.success else Outcome.HARD_DECLINE
    if cancelling(record):
        return _expiry_cancelled(record, event, outcome)
    provider_key = pending.provider_key
    apply_follow_up(record, op, outcome)
    return Decision(Effect.FOLLOW_UP, f"{op.value} {'succeeded' if event.success else 'failed'}", op, provider_key,
                    ProviderResult(outcome, raw_code=f"{op.value}_{outcome.value}" if event.success
                                   else (event.reason or f"{op.value}_failed")))


def _expiry_cancelled(record: PaymentRecord, event: ProviderEvent, outcome: Outcome) -> Decision:
    """The outcome of the expiry's cancel, reported (Adyen CANCELLATION, Checkout.com
    `payment_voided` / `payment_canceled` / `payment_void_declined`): done, the payment expired;
    refused, it waits for its shopper's outcome again (`gateway.shopper_action.settle_cancel`)."""
    result = ProviderResult(outcome, raw_code="void_approved" if event.success else (event.reason or "void_failed"))
    if settle_cancel(record, outcome):
        return Decision(Effect.PAYMENT, "expired: the expiry's cancel succeeded", Operation.VOID, result=result)
    return Decision(Effect.FOLLOW_UP, "the expiry's cancel was refused: waiting for the shopper", Operation.VOID,
                    result=result)


def _reverse(record: PaymentRecord, event: ProviderEvent, op: Operation) -> Decision:
    """A capture or refund the provider reported done, then failed: its amount comes off, once,
    and only if it was counted. Its settled record says (`SettledFollowUp`): a late Stripe
    `refund.failed` for a refund a lookup had already settled as failed took its amount off a
    second time, and the journal under-reported what was refunded."""
    reference = event.follow_up_reference if event.follow_up_reference not in (None, record.id) else None
    settled = _settled(record, op, reference, event.amount)
    if settled is not None:
        if not settled.done:
            return Decision(Effect.NONE, f"the {op.value} was settled as not made: nothing to undo")
        if settled.reversed:
            return Decision(Effect.NONE, f"the {op.value}'s failure was applied already")
    elif any(f.operation == op.value for f in record.settled_follow_ups):
        # The payment's settled follow-ups of that kind are known, and none is this one (by its
        # reference, or by its amount where none is echoed): a reversal of something we never
        # made (Adyen REFUNDED_REVERSED of a refund made in its Customer Area) is not ours to apply.
        return Decision(Effect.NONE, f"no {op.value} of this payment matches the failure")
    done = {Operation.CAPTURE: record.captured_amount, Operation.REFUND: record.refunded_amount}.get(op, 0)
    if done <= 0:
        return Decision(Effect.NONE, f"no {op.value} made to undo")
    if settled is not None and settled.amount is not None:
        amount = min(done, settled.amount)
        settled.reversed = True
    else:  # a payment journalled before settled follow-ups were kept: its amounts alone
        amount = min(done, event.amount if event.amount is not None and event.amount > 0 else done)
    if op is Operation.CAPTURE:
        record.captured_amount -= amount
        if record.captured_amount == 0 and record.status is PaymentStatus.CAPTURED:
            record.status = PaymentStatus.APPROVED
    else:
        record.refunded_amount -= amount
        if record.refunded_amount == 0 and record.status is PaymentStatus.REFUNDED:
            record.status = PaymentStatus.CAPTURED
    # The follow-up's key answers the refusal now, where the provider echoes our reference.
    return Decision(Effect.FOLLOW_UP, f"{op.value} failed after it succeeded", op, reference,
                    ProviderResult(Outcome.HARD_DECLINE, raw_code=event.reason or f"{op.value}_failed"))


def _settled(record: PaymentRecord, op: Operation, reference: str | None,
             amount: int | None) -> SettledFollowUp | None:
    """The settled follow-up a reported failure is about: by our reference where the provider
    echoes it, else the latest one of that kind and amount still counted."""
    of_kind = [f for f in reversed(record.settled_follow_ups) if f.operation == op.value]
    if reference is not None:
        return next((f for f in of_kind if f.provider_key == reference), None)
    return next((f for f in of_kind if f.done and not f.reversed and (amount is None or f.amount == amount)), None)
