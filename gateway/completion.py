"""`POST /v1/payments/{id}/complete`: finish a payment whose shopper came back from its action.

The shopper's browser returns to the merchant's `return_url` with the provider's parameters
(Adyen `redirectResult` / `threeDSResult`, Stripe `payment_intent`, Checkout.com
`cko-session-id`); the merchant passes them here, and the gateway reads the result at the
provider that asked for the action, never anywhere else (Adyen `/payments/details`, Stripe
retrieve, Checkout.com `GET /payments/{id}`).

It runs through the follow-ups' machinery: the caller's key is claimed in the same transaction
that journals the completion on the payment (a `PendingFollowUp` of operation `complete`,
conditional on the row's version), so a second completion is refused while one is in flight and
a crash leaves a completion the reconciler finishes. The payment keeps its status,
`action_required`, until the provider's answer decides it; a webhook that decided it first
leaves nothing to do, and the completion answers the payment as it is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from domain.outcome import Outcome, PaymentStatus
from domain.types import FollowUp, Operation, ProviderResult
from gateway import answers
from gateway.answers import Answer
from gateway.journal.errors import StaleWrite
from gateway.journal.records import Attempt, ClaimKind, Fingerprint, IdempotentAnswer, PaymentRecord, PendingFollowUp
from gateway.orchestrator import STALE_RETRIES, PaymentService, provider_idempotency_key
from gateway.shopper_action import cancelling, finish_action, waiting



async def complete_payment(svc: PaymentService, scope: str, key: str, fingerprint: Fingerprint, payment_id: str,
                           return_params: Mapping[str, str], deadline: float) -> Answer:
    record = await svc.store.get_payment(payment_id)
    if record is None or record.client != scope:
        return answers.payment_not_found()
    provider_key = provider_idempotency_key(record.id, record.provider or "none", Operation.COMPLETE.value, salt=key)
    async with svc.locks.hold(record.id):
        for _ in range(STALE_RETRIES):
            try:
                return await _claim_and_complete(svc, scope, key, fingerprint, payment_id, return_params, deadline,
                                                 provider_key)
            except StaleWrite:
                continue  # another writer (a webhook, a replica) moved the payment: read it again
        return answers.in_progress("the payment is being changed by another request; retry shortly")


async def _claim_and_complete(svc: PaymentService, scope: str, key: str, fingerprint: Fingerprint, payment_id: str,
                              return_params: Mapping[str, str], deadline: float, provider_key: str) -> Answer:
    record = await svc.store.get_payment(payment_id)
    assert record is not None
    now = time.time()
    runs = waiting(record) and record.follow_up is None
    if runs:
        record.follow_up = PendingFollowUp(
            operation=Operation.COMPLETE.value, amount=None, provider_key=provider_key, scope=scope, front_key=key,
            prior_status=record.status.value, started_at=now, deadline_s=max(0.0, deadline - time.monotonic()))
        record.updated_at = now
    claim = await svc.claim(scope, key, fingerprint, provider_key, record if runs else None)
    if claim.kind is not ClaimKind.NEW:
        return answers.claim_answer(claim)
    if not runs:
        return await _nothing_to_complete(svc, record, scope, key, provider_key)
    svc.in_flight.add(record.id)
    try:
        return await _run_completion(svc, record, scope, key, return_params, provider_key, deadline)
    except StaleWrite:
        return await _answer_as_journalled(svc, record.id, provider_key)
    finally:
        svc.in_flight.discard(record.id)


async def _nothing_to_complete(svc: PaymentService, record: PaymentRecord, scope: str, key: str,
                               provider_key: str) -> Answer:
    """Not waiting for its shopper: already finished (by a webhook, or an earlier completion),
    which the key answers with the payment as it is; or never asked for an action, or another
    completion is running: refused, and the key released."""
    if record.follow_up is None and record.status in _FINISHED:
        answer = answers.payment_read(record)
        await svc.store.complete_idempotency_for(provider_key, answer.stored())
        return answer
    await svc.store.release_idempotency(scope, key)
    if cancelling(record):
        # The expiry's cancel is at the provider: it may void what the shopper just finished, so
        # the shopper's outcome waits for its answer (then this call answers the payment as it is).
        return answers.in_progress("the payment's challenge expired and is being cancelled at the provider; "
                                   "retry shortly")
    if record.follow_up is not None:
        return answers.in_progress(f"a {record.follow_up.operation} of this payment is still in progress")
    return answers.invalid_state(f"the payment is not waiting for its shopper (status {record.status.value})")


# A payment past its action: /complete answers it as it is (whichever came first decided it).
_FINISHED = frozenset({PaymentStatus.APPROVED, PaymentStatus.DECLINED, PaymentStatus.FAILED, PaymentStatus.CAPTURED,
                       PaymentStatus.VOIDED, PaymentStatus.REFUNDED})


async def _run_completion(svc: PaymentService, record: PaymentRecord, scope: str, key: str,
                          return_params: Mapping[str, str], provider_key: str, deadline: float) -> Answer:
    assert record.provider is not None
    client = svc.clients[record.provider]
    subject = FollowUp(payment_id=record.id, provider_reference=record.provider_reference,
                       return_params=dict(return_params))

    async def journalled(_attempt: Attempt) -> None:
        """Each try's attempt on disk before its call (the claim's row holds the completion, not
        the attempt), so a takeover after a crash knows what was sent."""
        await svc.write_ahead(record, "completion")

    started = time.monotonic()
    result = await svc.executor.run(client, Operation.COMPLETE, subject, provider_key, deadline, record.attempts,
                                    journalled)
    result = _for_this_payment(record, result)
    record.follow_up = None
    record.updated_at = time.time()
    settled = finish_action(record, result)
    answer = answers.completion_answer(record, result)
    extra = {"latency_ms": (time.monotonic() - started) * 1000,
             "completion": {"outcome": result.outcome.value, "raw_code": result.raw_code, "settled": settled}}
    if settled or result.outcome is Outcome.ACTION_REQUIRED:
        await svc.commit(record, "complete", IdempotentAnswer(scope, key, answer.stored()), **extra)
    else:
        # Nothing decided (not sent, unknown, refused): the payment still waits, and the key is
        # released so the merchant may call again.
        await svc.commit(record, "complete", **extra)
        await svc.store.release_idempotency(scope, key)
    if settled:
        svc.metrics.payments.labels(record.status.value).inc()
    return answer


def _for_this_payment(record: PaymentRecord, result: ProviderResult) -> ProviderResult:
    """The provider's answer must be about this payment: a return parameter of another payment
    (a session id copied from elsewhere) would otherwise settle this one with its result."""
    if result.reference is not None and record.provider_reference is not None \
            and result.reference != record.provider_reference:
        return ProviderResult(Outcome.REJECTED, raw_code="return_params_mismatch", http_status=result.http_status,
                              message="the return parameters belong to another payment")
    return result


async def _answer_as_journalled(svc: PaymentService, payment_id: str, provider_key: str) -> Answer:
    """A webhook or the reconciler wrote the payment while we completed it: it decided first;
    the payment as the journal holds it is the answer, and our key's."""
    current = await svc.store.get_payment(payment_id)
    assert current is not None
    answer = answers.payment_read(current)
    if current.follow_up is None:
        await svc.store.complete_idempotency_for(provider_key, answer.stored())
    return answer
