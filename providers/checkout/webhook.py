"""Checkout.com webhooks: `Cko-Signature` verification and the events we act on. Pure, no I/O.

Signature, as Checkout.com documents it ("Webhooks: verify the signature"): the `Cko-Signature`
header is the hex HMAC-SHA256 of the raw body, keyed with the webhook's secret key; several
configured secrets are accepted during a rotation. (The optional `Authorization` header of a
webhook is a static value and proves nothing once leaked: it is not used.)

Events (`{"id": "evt_…", "type", "created_on", "data": {...}}`), `data.id` the payment's `pay_…`
id and `data.reference` the reference of the payment or action (ours: the payment id, or the
follow-up's reference we sent with the action); by `type`:
`payment_approved` / `payment_declined` (the authorisation; `response_code`),
`payment_captured` / `payment_capture_declined`, `payment_refunded` / `payment_refund_declined`,
`payment_voided` / `payment_void_declined`; for 3-D Secure, `payment_authentication_failed` (the
authorisation, declined) and `payment_canceled` (a waiting payment cancelled). Anything else (`payment_pending`, `payment_expired`,
disputes) is `EventKind.OTHER`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from domain.webhook import EventKind, MalformedEvent, ProviderEvent, SignatureInvalid
from providers.classify import json_value

SIGNATURE_HEADER = "Cko-Signature"
ANSWER = (200, b"", "text/plain")

# type -> (kind, success)
EVENT_TYPES: Mapping[str, tuple[EventKind, bool]] = {
    "payment_approved": (EventKind.AUTHORISATION, True),
    "payment_declined": (EventKind.AUTHORISATION, False),
    "payment_authentication_failed": (EventKind.AUTHORISATION, False),  # 3-D Secure failed: declined (20151)
    "payment_captured": (EventKind.CAPTURE, True),
    "payment_capture_declined": (EventKind.CAPTURE, False),
    "payment_refunded": (EventKind.REFUND, True),
    "payment_refund_declined": (EventKind.REFUND, False),
    "payment_voided": (EventKind.CANCEL, True),
    "payment_canceled": (EventKind.CANCEL, True),  # a payment still waiting for its shopper, cancelled
    "payment_void_declined": (EventKind.CANCEL, False),
}


def sign(body: bytes, secret: str) -> str:
    """The `Cko-Signature` Checkout.com would send (for tests and the emulator)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, headers: Mapping[str, str], secrets: Sequence[str], now: float) -> None:
    signature = headers.get(SIGNATURE_HEADER)
    if not signature:
        raise SignatureInvalid(f"no {SIGNATURE_HEADER} header")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(sign(body, secret).encode(), signature.strip().lower().encode(errors="replace"))
    if not matched:
        raise SignatureInvalid("the signature matches no configured secret")


def parse(body: bytes) -> tuple[ProviderEvent, ...]:
    doc = json_value(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not isinstance(doc.get("type"), str):
        raise MalformedEvent("not a Checkout.com event (id, type)")
    if not isinstance(doc.get("data"), dict):  # every event Checkout.com sends carries its payment here
        raise MalformedEvent("a Checkout.com event without its data object")
    data: dict[str, Any] = doc["data"]
    event_type = doc["type"]
    kind, success = EVENT_TYPES.get(event_type, (EventKind.OTHER, None))  # type: ignore[arg-type]
    reference = data.get("reference")
    follow_up = kind in (EventKind.CAPTURE, EventKind.REFUND, EventKind.CANCEL)
    return (ProviderEvent(doc["id"], kind, event_type, success,
                          payment_reference=None if follow_up else reference,
                          follow_up_reference=reference if follow_up else None,
                          provider_reference=data.get("id"), amount=data.get("amount"),
                          currency=data.get("currency"),
                          reason=data.get("response_code") if success is False else None),)
