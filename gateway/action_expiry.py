"""The reconciler's part in shopper actions (3-D Secure): a challenge the shopper abandoned, and a
completion whose request died.

An abandoned challenge (still `action_required` past `three_ds.action_expiry_s`) is first looked
up at its provider: the shopper may have finished just now, with neither the completion nor the
webhook here yet, and then the provider's decision stands. If it is still waiting, the
reconciler journals that it is cancelling it (`action_cancelling`) and cancels it at that
provider (Stripe cancel, Adyen `/cancels`, Checkout.com `/voids`; the emulators end the
challenge page too). Once the cancel is accepted the payment is `failed` with `error_code:
expired`. A cancel the provider refused or did not answer is tried again at a later pass,
after another lookup; a payment found decided after our cancel started ended because of it
(expired), unless it was approved (the shopper won the race: the approval stands, and the
ledger and the journal agree on the charge).

Adyen has no lookup: there the cancel itself is the question (refused once the shopper has
finished, whose webhook then settles the payment). Each settlement notifies the merchant
(`settled_from`): `payment.failed` with `error_code: expired`, or the shopper's late outcome.

Nothing here ever calls another provider: the payment is bound to the one that asked.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from domain.outcome import Outcome
from domain.types import FollowUp, Lookup, Operation
from gateway import answers
from gateway.journal.records import Attempt, PaymentRecord
from gateway.notifications.events import Settling
from gateway.orchestrator import provider_idempotency_key
from gateway.policy import is_final
from gateway.provider_client import MIN_TRY_S
from gateway.shopper_action import expire_action, finish_action

if TYPE_CHECKING:
    from domain.types import StatusAnswer
    from gateway.orchestrator import PaymentService


class Reconciling(Protocol):
    """What these steps use of the reconciler that runs them (`gateway.reconciler.Reconciler`):
    its service, its status query (through the provider client) and its "look again later"."""

    service: PaymentService

    async def lookup(self, record: PaymentRecord, follow_up_id: str | None = None) -> StatusAnswer | None: ...

    async def touch(self, record: PaymentRecord) -> None: ...


async def expire_abandoned(rec: Reconciling, record: PaymentRecord) -> bool:
    """Settle a waiting payment past its expiry; True when it reached a final state."""
    svc = rec.service
    before = Settling.of(record)  # the checkout is notified of how it ended
    assert record.provider is not None
    client = svc.clients[record.provider]
    if client.mapping.has_status_lookup:
        answer = await rec.lookup(record)
        if answer is None or answer.lookup is not Lookup.FOUND:
            await rec.touch(record)
            return False
        result = answer.result
        if is_final(result):
            if record.action_cancelling and result.outcome is not Outcome.APPROVED:
                expire_action(record)  # our cancel ended it
            else:
                finish_action(record, result)  # the shopper finished before the cancel
            return await _commit(rec, record, before)
        if result.outcome is not Outcome.ACTION_REQUIRED:
            await rec.touch(record)  # in flight at the provider, or unreadable: ask again later
            return False
    # Without a lookup (Adyen), the cancel itself asks: it is refused once the shopper has
    # finished, and that outcome's webhook settles the payment.
    if not record.action_cancelling:
        record.action_cancelling = True
        record.updated_at = time.time()
        await svc.store.save_payment(record)  # journalled before the cancel is sent
    key = provider_idempotency_key(record.id, record.provider, "expire")
    subject = FollowUp(payment_id=record.id, provider_reference=record.provider_reference, follow_up_id=key)

    async def journalled(_attempt: Attempt) -> None:
        """Each try's cancel attempt on disk before its call (`action_cancelling` already is)."""
        await svc.write_ahead(record, "expiry")

    deadline = time.monotonic() + max(client.handle.timeout_s, MIN_TRY_S) + MIN_TRY_S
    cancelled = await svc.executor.run(client, Operation.VOID, subject, key, deadline, record.attempts, journalled)
    if cancelled.outcome is not Outcome.APPROVED:
        await rec.touch(record)  # refused (the shopper finished meanwhile?) or unanswered: look again later
        return False
    expire_action(record)
    return await _commit(rec, record, before, expired=True)


async def finish_interrupted_completion(rec: Reconciling, record: PaymentRecord) -> bool:
    """A `/complete` whose request died after its claim: the provider's state of the payment
    decides it (where it has a lookup; else its webhook will), or it goes on waiting; either way
    the completion's key is answered with the payment as it is then."""
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
    await rec.service.store.complete_idempotency_for(pending.provider_key, answers.payment_read(record).stored())
    if settled:
        return await _commit(rec, record, before, completion={"interrupted": True})
    record.updated_at = time.time()
    await rec.service.commit(record, "reconciliation", completion={"interrupted": True, "settled": False})
    return False


async def _commit(rec: Reconciling, record: PaymentRecord, before: Settling, **extra: object) -> bool:
    record.updated_at = time.time()
    await rec.service.commit(record, "reconciliation", settled_from=before, **extra)
    rec.service.metrics.reconciled.labels(record.status.value).inc()
    return True
