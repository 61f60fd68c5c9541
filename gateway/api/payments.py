"""`/v1/payments` and its follow-ups."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import time


from aiohttp import web
from pydantic import BaseModel

from gateway.api.auth import Caller
from gateway.api.errors import ApiError, json_response
from gateway.api.idempotency import fingerprint, idempotency_key
from gateway.api.inputs import json_body, request_deadline
from gateway.api.schemas import CaptureCreate, CardMethod, PaymentCreate, RefundCreate, VoidCreate
from gateway.app_keys import AUTH, CONFIG, FRONT_DOOR, LOG_WRITER, POOL, SERVICE, STORE
from domain.cards import truncate_pan
from gateway.journal.records import PaymentRecord
from gateway.payment_view import payment_doc
from domain.outcome import Outcome, PaymentStatus
from domain.types import Operation, PaymentOrder



_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def new_payment_id() -> str:
    """Time-ordered and unguessable: `pay_` + milliseconds (10 letters) + 80 random bits.

    Letters only: an id with a long digit run can pass the Luhn check by chance, and the log's
    card-number redaction would then mask our own id."""
    return f"pay_{_base26(int(time.time() * 1000), 10)}{_base26(secrets.randbits(80), 17)}"


def _base26(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 26)
        out.append(_LETTERS[digit])
    return "".join(reversed(out))


def _shed_if_overloaded(request: web.Request) -> None:
    """Refuse early, with Retry-After, rather than queue without bound or lose a log line."""
    service = request.app[SERVICE]
    if len(service.in_flight) >= request.app[CONFIG].server.max_in_flight:
        service.metrics.shed.labels("in_flight").inc()
        raise ApiError(503, "overloaded", "the gateway is at capacity; retry shortly", headers={"Retry-After": "1"})
    if not request.app[LOG_WRITER].has_capacity(reserve=16):
        service.metrics.shed.labels("log_queue").inc()
        raise ApiError(503, "overloaded", "the transaction log is backed up; retry shortly",
                       headers={"Retry-After": "1"})


async def create_payment(request: web.Request) -> web.Response:
    caller = request.app[AUTH].caller(request, "payments:write")
    key = idempotency_key(request)
    _shed_if_overloaded(request)
    body, payload = await json_body(request, PaymentCreate)
    deadline = request_deadline(request)
    record, order = _new_payment(caller, payload)
    service = request.app[SERVICE]
    decision = service.plan(record, order)
    front = request.app[FRONT_DOOR]
    replay = await front.claim(caller.name, key, fingerprint(request, body), record.id, record)
    if replay is not None:
        return replay
    # From here the journal holds the payment: if this request dies, the reconciler settles it
    # and stores the final answer for the key.
    answer = await service.authorize(record, order, decision, deadline, scope=caller.name, key=key)
    return web.Response(status=answer.status, body=answer.body, content_type="application/json")


def _new_payment(caller: Caller, p: PaymentCreate) -> tuple[PaymentRecord, PaymentOrder]:
    payment_id = new_payment_id()
    method = p.payment_method
    card = None
    record = PaymentRecord(id=payment_id, client=caller.name, amount=p.amount, currency=p.currency, capture=p.capture,
                           merchant_reference=p.merchant_reference, country=p.country, metadata=dict(p.metadata))
    if isinstance(method, CardMethod):
        card = method.to_card()
        record.card_brand = card.brand
        record.card_bin, record.card_last4 = truncate_pan(card.number.reveal())  # >= 6 digits hidden
    order = PaymentOrder(payment_id=payment_id, amount=p.amount, currency=p.currency, capture=p.capture,
                         merchant_reference=p.merchant_reference, card=card,
                         token=None if card else method.to_secret(), country=p.country,  # type: ignore[union-attr]
                         description=p.description)
    return record, order


async def _owned_payment(request: web.Request, caller: Caller) -> PaymentRecord:
    record = await request.app[STORE].get_payment(request.match_info["payment_id"])
    if record is None or record.client != caller.name:
        raise ApiError(404, "payment_not_found", "no payment with this id", "payment_id")
    return record


async def get_payment(request: web.Request) -> web.Response:
    caller = request.app[AUTH].caller(request, "payments:read")
    record = await _owned_payment(request, caller)
    return json_response(200, payment_doc(record))


def _check_follow_up(record: PaymentRecord, op: Operation, amount: int | None) -> None:
    def conflict(message: str) -> ApiError:
        return ApiError(409, "invalid_payment_state", message, "status")

    if amount is not None and amount > record.amount:
        raise ApiError(422, "amount_too_large", "amount exceeds the payment's amount", "amount")
    if op is Operation.CAPTURE and (record.status is not PaymentStatus.APPROVED or record.capture):
        raise conflict(f"only an approved authorisation can be captured (status {record.status.value})")
    if op is Operation.VOID and (record.status is not PaymentStatus.APPROVED or record.captured_amount):
        raise conflict(f"only an approved, uncaptured authorisation can be voided (status {record.status.value})")
    if op is Operation.REFUND:
        refundable = record.captured_amount - record.refunded_amount
        if record.status not in (PaymentStatus.APPROVED, PaymentStatus.CAPTURED, PaymentStatus.REFUNDED) \
                or refundable <= 0:
            raise conflict("nothing captured is left to refund")
        if amount is not None and amount > refundable:
            raise ApiError(422, "amount_too_large", f"at most {refundable} can still be refunded", "amount")


def _follow_up_amount(record: PaymentRecord, op: Operation, asked: int | None) -> int | None:
    """Every provider gets an explicit amount: a capture defaults to the authorised amount, a
    refund to what is still refundable; a void has none."""
    if op is Operation.CAPTURE:
        return record.amount if asked is None else asked
    if op is Operation.REFUND:
        return record.captured_amount - record.refunded_amount if asked is None else asked
    return None


class PaymentLocks:
    """One asyncio.Lock per payment with a follow-up in progress; dropped when nobody holds it.
    Serialises follow-ups within this process; across replicas the provider's own state checks
    (and their idempotency keys) are the backstop."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, payment_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(payment_id, (asyncio.Lock(), 0))
        self._locks[payment_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[payment_id]
            if users == 1:
                del self._locks[payment_id]
            else:
                self._locks[payment_id] = (lock, users - 1)


FOLLOW_UP_LOCKS = web.AppKey("follow_up_locks", PaymentLocks)

_FOLLOW_UP_MODELS: dict[Operation, type[BaseModel]] = {
    Operation.CAPTURE: CaptureCreate, Operation.VOID: VoidCreate, Operation.REFUND: RefundCreate,
}


def follow_up_handler(op: Operation):  # type: ignore[no-untyped-def]
    async def handle(request: web.Request) -> web.Response:
        caller = request.app[AUTH].caller(request, "payments:write")
        key = idempotency_key(request)
        _shed_if_overloaded(request)
        body, payload = await json_body(request, _FOLLOW_UP_MODELS[op])
        deadline = request_deadline(request)
        record = await _owned_payment(request, caller)
        front = request.app[FRONT_DOOR]
        replay = await front.claim(caller.name, key, fingerprint(request, body), record.id)
        if replay is not None:
            return replay
        try:
            # One follow-up per payment at a time, checked against the row as it is now, not
            # as it was before we waited: two refunds must not both pass one stale check.
            async with request.app[FOLLOW_UP_LOCKS].hold(record.id):
                record = await _owned_payment(request, caller)
                amount = _follow_up_amount(record, op, getattr(payload, "amount", None))
                _check_follow_up(record, op, amount)
                outcome = await request.app[SERVICE].follow_up(record, op, amount, key, deadline)
        except BaseException:
            # Nothing was settled: the caller may retry the key (it maps to the same provider key).
            await front.release(caller.name, key)
            raise
        result = outcome.result
        replays = request.app[POOL][record.provider].mapping.replays_answers if record.provider else False
        if result.outcome is Outcome.UNKNOWN and not replays:
            # The provider may have acted, and it would treat a re-send as a new action (a
            # second refund): the key keeps this answer; the caller checks the payment first.
            response = ApiError(502, "outcome_unknown",
                                f"{record.provider} did not confirm the {op.value} ({result.raw_code}) and cannot "
                                "be asked again safely; read the payment before any new request").response()
            await front.complete(caller.name, key, response)
            return response
        if result.outcome in (Outcome.UNAVAILABLE, Outcome.UNKNOWN):
            # Nothing settled: free the key so the caller's retry reaches the same provider key,
            # which the provider answers once (it replays answers per key).
            await front.release(caller.name, key)
            code = "provider_unavailable" if result.outcome is Outcome.UNAVAILABLE else "outcome_unknown"
            raise ApiError(503 if result.outcome is Outcome.UNAVAILABLE else 502, code,
                           f"{record.provider} did not confirm the {op.value} ({result.raw_code}); "
                           "retry with the same Idempotency-Key", headers={"Retry-After": "1"})
        if result.outcome is Outcome.APPROVED:
            response = json_response(200, payment_doc(outcome.record))
        else:
            response = ApiError(422, f"{op.value}_refused",
                                f"{record.provider} refused the {op.value}: {result.raw_code}").response()
        await front.complete(caller.name, key, response)
        return response

    return handle


def add_routes(app: web.Application) -> None:
    app[FOLLOW_UP_LOCKS] = PaymentLocks()
    app.router.add_post("/v1/payments", create_payment)
    app.router.add_get("/v1/payments/{payment_id}", get_payment)
    app.router.add_post("/v1/payments/{payment_id}/capture", follow_up_handler(Operation.CAPTURE))
    app.router.add_post("/v1/payments/{payment_id}/void", follow_up_handler(Operation.VOID))
    app.router.add_post("/v1/payments/{payment_id}/refunds", follow_up_handler(Operation.REFUND))
