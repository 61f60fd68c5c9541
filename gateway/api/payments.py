"""`/v1/payments` and its follow-ups: parse, authenticate, shed, then one call into the payment
service, which owns the rest (key claim, engine, journal, answer) and returns the answer to write."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from domain.types import Operation, PaymentOrder
from gateway.answers import Answer, payment_not_found
from gateway.http.auth import Caller
from gateway.http.errors import ApiError
from gateway.http.idempotency import fingerprint, idempotency_key
from gateway.http.inputs import json_body, request_deadline
from gateway.http.return_url import check_return_url
from gateway.http.schemas import CaptureCreate, CardMethod, CompleteCreate, PaymentCreate, RefundCreate, VoidCreate
from domain.cards import truncate_pan
from gateway.app_keys import AUTH, CONFIG, LOG_WRITER, REDACTOR, SERVICE, TRANSACTION_LOG
from gateway.completion import complete_payment
from gateway.journal.records import Fingerprint, PaymentRecord

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_PAYMENT_ID = re.compile(r"pay_[a-z_]{1,64}")  # new_payment_id makes 27 letters; tests name theirs pay_crash_x


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


def _payment_id(request: web.Request) -> str | None:
    """The route's payment id; None when it is not of the shape `new_payment_id` makes. Such an
    id names no payment: it is answered like an unknown one (404 `payment_not_found`) without
    asking the store, which may not take it at all (PostgreSQL refuses a NUL byte in text with
    an error, which would be a 500)."""
    payment_id = request.match_info["payment_id"]
    return payment_id if _PAYMENT_ID.fullmatch(payment_id) else None


def _shed_if_overloaded(request: web.Request) -> None:
    """Refuse early, with Retry-After, rather than queue without bound or lose a log line."""
    service = request.app[SERVICE]
    if len(service.in_flight) >= request.app[CONFIG].server.max_in_flight:
        service.metrics.shed.labels("in_flight").inc()
        raise ApiError(503, "overloaded", "the gateway is at capacity; retry shortly", headers={"Retry-After": "1"})
    if not request.app[LOG_WRITER].has_capacity(reserve=16) or request.app[TRANSACTION_LOG].backlogged():
        service.metrics.shed.labels("log_queue").inc()
        raise ApiError(503, "overloaded", "the transaction log is backed up; retry shortly",
                       headers={"Retry-After": "1"})


def _write(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, content_type="application/json",
                        headers=answer.headers)


async def create_payment(request: web.Request) -> web.Response:
    caller = request.app[AUTH].caller(request, "payments:write")
    key = idempotency_key(request, request.app[REDACTOR])
    _shed_if_overloaded(request)
    body = await json_body(request, PaymentCreate, request.app[REDACTOR], request.app[CONFIG].server.body_timeout_s)
    payload = body.payload
    check_return_url(payload.return_url, payload.three_ds,
                     allow_http_loopback=request.app[CONFIG].three_ds.allow_http_loopback_return_url)
    deadline = request_deadline(request, request.app[CONFIG].engine.deadline_ms)
    record, order = _new_payment(caller, payload)
    print_ = fingerprint(request, body.raw, body.document, caller.fingerprint_key)
    return _write(await request.app[SERVICE].create_payment(caller.name, key, print_, record, order, deadline))


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
                         description=p.description, return_url=p.return_url, three_ds=p.three_ds)
    return record, order


async def get_payment(request: web.Request) -> web.Response:
    caller = request.app[AUTH].caller(request, "payments:read")
    payment_id = _payment_id(request)
    if payment_id is None:
        return _write(payment_not_found())
    return _write(await request.app[SERVICE].read(caller.name, payment_id))


_FOLLOW_UP_MODELS: dict[Operation, type[BaseModel]] = {
    Operation.CAPTURE: CaptureCreate, Operation.VOID: VoidCreate, Operation.REFUND: RefundCreate,
}


@dataclass(frozen=True, slots=True)
class _PaymentWrite:
    """A mutating call on an existing payment, read and checked: whose, which payment, the
    caller's key and body fingerprint, the validated body, and the request's deadline."""

    client: str
    payment_id: str
    key: str
    fingerprint: Fingerprint
    payload: Any
    deadline: float


async def _payment_write(request: web.Request, model: type[BaseModel]) -> _PaymentWrite | None:
    """The front door of a follow-up or a completion, in its order: authenticate, the payment id
    (None: answer 404), the Idempotency-Key, shedding, the body, the deadline."""
    caller = request.app[AUTH].caller(request, "payments:write")
    payment_id = _payment_id(request)
    if payment_id is None:
        return None
    key = idempotency_key(request, request.app[REDACTOR])
    _shed_if_overloaded(request)
    body = await json_body(request, model, request.app[REDACTOR], request.app[CONFIG].server.body_timeout_s)
    deadline = request_deadline(request, request.app[CONFIG].engine.deadline_ms)
    return _PaymentWrite(caller.name, payment_id, key, fingerprint(request, body.raw, body.document,
                                                                   caller.fingerprint_key), body.payload, deadline)


def follow_up_handler(op: Operation):  # type: ignore[no-untyped-def]
    async def handle(request: web.Request) -> web.Response:
        w = await _payment_write(request, _FOLLOW_UP_MODELS[op])
        if w is None:
            return _write(payment_not_found())
        return _write(await request.app[SERVICE].follow_up(w.client, w.key, w.fingerprint, w.payment_id, op,
                                                           getattr(w.payload, "amount", None), w.deadline))

    return handle


async def complete(request: web.Request) -> web.Response:
    """The shopper is back from 3-D Secure: finish the payment at the provider that asked."""
    w = await _payment_write(request, CompleteCreate)
    if w is None:
        return _write(payment_not_found())
    return _write(await complete_payment(request.app[SERVICE], w.client, w.key, w.fingerprint, w.payment_id,
                                         w.payload.return_params, w.deadline))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/payments", create_payment)
    app.router.add_get("/v1/payments/{payment_id}", get_payment)
    app.router.add_post("/v1/payments/{payment_id}/capture", follow_up_handler(Operation.CAPTURE))
    app.router.add_post("/v1/payments/{payment_id}/void", follow_up_handler(Operation.VOID))
    app.router.add_post("/v1/payments/{payment_id}/refunds", follow_up_handler(Operation.REFUND))
    app.router.add_post("/v1/payments/{payment_id}/complete", complete)
