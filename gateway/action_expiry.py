"""The reconciler's part in shopper actions (3-D Secure): a challenge the shopper abandoned, and a
completion whose request died.

An abandoned challenge (still `action_required` past `three_ds.action_expiry_s`) is first looked
up at its provider: the shopper may have finished just now, with neither the completion nor the
webhook here yet, and then the provider's decision stands. If it is still waiting, the
reconciler journals its cancel as the payment's pending void (`action_cancelling`, and a
`PendingFollowUp` of operation `void` with a key of its own) and sends it to that provider
(Stripe cancel, Adyen `/cancels`, Checkout.com `/voids`; the emulators end the challenge page
too). While that void is pending, the shopper's outcome waits: `/complete` answers 409 with
`Retry-After` and the provider's webhook is held, because the cancel may void what the shopper
just finished, and only the provider's answer to the cancel says so.

- Accepted and done (Stripe's synchronous cancel, or the lookup or webhook of an asynchronous
  one listing it done): the payment is `failed` with `error_code: expired`, even when the shopper
  finished in the instant before (a manual-capture authorisation, voided by it: nothing charged).
- Accepted for later (Adyen `received`, Checkout.com `202`): not a cancel yet. The payment stays
  waiting with its void pending until the provider reports it (CANCELLATION, `payment_voided` /
  `payment_canceled` / `payment_void_declined`; Checkout.com's actions list at the next pass).
- Refused (the shopper finished first, or the provider would not) or not sent: the void is
  dropped and the payment is its shopper's again, settled by its outcome (lookup, webhook,
  `/complete`); if none comes, a later pass cancels again under a new key (MAX_CANCEL_ROUNDS
  times; then ops line `expiry_cancel_refused`, and one more round per action expiry period,
  set aside in between, until the challenge is cancelled or its shopper's outcome settles it).
- Unknown: the void stays unanswered and is sent again with its key (safe: the same key) once
  its call is past its deadline, after another lookup.

Each settlement notifies the merchant (`settled_from`): `payment.failed` with `error_code:
expired`, or the shopper's late outcome.

Nothing here ever calls another provider: the payment is bound to the one that asked.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

import structlog

from domain.outcome import Outcome
from domain.types import FollowUp, Lookup, Operation
from gateway import answers
from gateway.journal.records import Attempt, PaymentRecord, PendingFollowUp
from gateway.notifications.events import Settling
from gateway.orchestrator import provider_idempotency_key
from gateway.policy import is_final
from gateway.provider_client import MIN_TRY_S
from gateway.settlement import follow_up_entry
from gateway.shopper_action import cancelling, finish_action, settle_cancel

# Cancels refused this often (a provider that will not cancel the challenge, while the shopper
# never finishes) stop: the payment waits for its shopper's outcome, and ops hear of it once.
MAX_CANCEL_ROUNDS = 5

if TYPE_CHECKING:
    from domain.types import StatusAnswer
    from gateway.orchestrator import PaymentService


class Reconciling(Protocol):
    """What these steps use of the reconciler that runs them (`gateway.reconciler.Reconciler`):
    its service, its ops log, its status query (through the provider client) and its "look
    again later"."""

    service: PaymentService
    log: structlog.typing.FilteringBoundLogger

    async def lookup(self, record: PaymentRecord, follow_up_id: str | None = None) -> StatusAnswer | None: ...

    async def touch(self, record: PaymentRecord) -> None: ...


async def expire_abandoned(rec: Reconciling, record: PaymentRecord) -> bool:
    """Settle a waiting payment past its expiry; True when it reached a final state."""
    svc = rec.service
    before = Settling.of(record)  # the checkout is notified of how it ended
    assert record.provider is not None
    client = svc.clients[record.provider]
    pending = record.follow_up if cancelling(record) else None  # an earlier pass's cancel, not settled
    if client.mapping.has_status_lookup:
        answer = await rec.lookup(record, pending.provider_key if pending is not None else None)
        if answer is None or answer.lookup is not Lookup.FOUND:
            await rec.touch(record)
            return False
        result = answer.result
        if pending is not None:
            entry = follow_up_entry(answer, Operation.VOID, pending.provider_key)
            if entry is not None and entry.outcome is not Outcome.UNKNOWN:
                if settle_cancel(record, entry.outcome):  # listed as done: it ended the payment
                    return await _commit(rec, record, before, expired=True)
                pending = None  # refused: the payment is its shopper's again (below)
            elif is_final(result) and result.outcome is not Outcome.APPROVED:
                settle_cancel(record, Outcome.APPROVED)  # ended with nothing charged: by our cancel
                return await _commit(rec, record, before, expired=True)
            elif pending.answered:
                await rec.touch(record)  # accepted, not processed yet: a later lookup (or its webhook) tells
                return False
            # else never answered (the call died): sent again below, with its key
        if pending is None:
            if is_final(result):
                finish_action(record, result)  # the shopper finished first (or our cancel was refused)
                return await _commit(rec, record, before)
            if result.outcome is not Outcome.ACTION_REQUIRED:
                await rec.touch(record)  # in flight at the provider, or unreadable: ask again later
                return False
    elif pending is not None and pending.answered:
        await rec.touch(record)  # Adyen: its CANCELLATION notification settles it
        return False
    # The cancel, sent (again). Without a lookup (Adyen) it is itself the question: refused once
    # the shopper has finished, whose outcome's webhook then settles the payment.
    if pending is None:
        if _cancel_rounds(record) >= MAX_CANCEL_ROUNDS:
            # Refused every time: ops hear of it once, and from now on one round per action
            # expiry period, the payment set aside in between, so the challenge still ends
            # cancelled (or the shopper's outcome, a lookup or the webhook, settles it first)
            # rather than waiting for good behind a live challenge.
            if record.action_cancelling:  # said once: the flag goes with it
                rec.log.error("expiry_cancel_refused", payment_id=record.id, provider=record.provider,
                              status=record.status.value, rounds=MAX_CANCEL_ROUNDS)
                record.action_cancelling = False
            next_round = _last_cancel_at(record) + svc.action_expiry_s
            if time.time() < next_round:
                await rec.touch(record)
                await svc.store.set_aside([(record.id, record.version, next_round)])
                return False
        pending = _journal_cancel(record, client.handle.timeout_s)
        await svc.store.save_payment(record)  # journalled before the cancel is sent
    subject = FollowUp(payment_id=record.id, provider_reference=record.provider_reference,
                       follow_up_id=pending.provider_key)

    async def journalled(_attempt: Attempt) -> None:
        """Each try's cancel attempt on disk before its call (the cancel itself already is)."""
        await svc.write_ahead(record, "expiry")

    deadline = time.monotonic() + max(client.handle.timeout_s, MIN_TRY_S) + MIN_TRY_S
    cancelled = await svc.executor.run(client, Operation.VOID, subject, pending.provider_key, deadline,
                                       record.attempts, journalled)
    if cancelled.outcome is Outcome.APPROVED and not cancelled.settles_later:
        settle_cancel(record, Outcome.APPROVED)
        return await _commit(rec, record, before, expired=True)
    if cancelled.outcome is Outcome.APPROVED:
        pending.answered = True  # received, not done: it may yet be refused (Adyen, Checkout.com)
    elif cancelled.outcome is not Outcome.UNKNOWN:
        settle_cancel(record, cancelled.outcome)  # refused (the shopper finished meanwhile?) or not sent
    # Unknown: still unanswered, so sent again with its key once its call is past its deadline.
    record.updated_at = time.time()
    await svc.store.save_payment(record)  # never swallowed: the cancel's state must be on disk
    return False


def _journal_cancel(record: PaymentRecord, timeout_s: float) -> PendingFollowUp:
    """The expiry's cancel as the payment's pending void, before it is sent: from then on
    `/complete` and the shopper's webhook wait for its answer (`shopper_action.cancelling`).
    Each cancel round has a key of its own: a provider that replays answers per key (Adyen)
    would otherwise answer a new cancel, after a refused one, with the old answer."""
    assert record.provider is not None
    now = time.time()
    key = provider_idempotency_key(record.id, record.provider, "expire",
                                   salt=str(_cancel_rounds(record, reached=False)))
    record.follow_up = PendingFollowUp(operation=Operation.VOID.value, amount=None, provider_key=key,
                                       scope=record.client, front_key="", prior_status=record.status.value,
                                       started_at=now, deadline_s=max(timeout_s, MIN_TRY_S) + MIN_TRY_S)
    record.action_cancelling = True
    record.updated_at = now
    return record.follow_up


def _last_cancel_at(record: PaymentRecord) -> float:
    return max((a.started_at for a in record.attempts if a.operation == Operation.VOID.value), default=0.0)


def _cancel_rounds(record: PaymentRecord, *, reached: bool = True) -> int:
    """How many cancel rounds (each its own key) the expiry has sent this payment; with
    `reached`, only those the provider took (a round never sent, breaker open or connection
    refused, does not count towards MAX_CANCEL_ROUNDS)."""
    return len({a.idempotency_key for a in record.attempts if a.operation == Operation.VOID.value
                and (not reached or a.outcome != Outcome.UNAVAILABLE.value)})


async def finish_interrupted_completion(rec: Reconciling, record: PaymentRecord) -> bool:
    """A `/complete` whose request died after its claim: the provider's state of the payment
    decides it (where it has a lookup; else its webhook will), or it goes on waiting. Settled,
    the completion's key answers the payment as it is then; unsettled, the key is released, as
    a completion that decided nothing releases it: a retry with the same key runs the
    completion again (a stored "still action_required" would replay forever after the payment
    settled through another key or the webhook)."""
    pending = record.follow_up
    assert pending is not None and record.provider is not None
    before = Settling.of(record)
    settled = False
    if rec.service.clients[record.provider].mapping.has_status_lookup:
        answer = await rec.lookup(record)
        if answer is None or answer.lookup is Lookup.UNKNOWN:
            await rec.touch(record)
            return False
        settled = answer.lookup is Lookup.FOUND and finish_action(record, answer.result)
    record.follow_up = None
    if settled:
        await rec.service.store.complete_idempotency_for(pending.provider_key,
                                                         answers.payment_read(record).stored())
        return await _commit(rec, record, before, completion={"interrupted": True})
    await rec.service.store.release_idempotency(pending.scope, pending.front_key)  # first: a crash here repeats it
    record.updated_at = time.time()
    await rec.service.commit(record, "reconciliation", completion={"interrupted": True, "settled": False})
    return False


async def _commit(rec: Reconciling, record: PaymentRecord, before: Settling, **extra: object) -> bool:
    record.updated_at = time.time()
    await rec.service.commit(record, "reconciliation", settled_from=before, **extra)
    rec.service.metrics.reconciled.labels(record.status.value).inc()
    return True
