"""Stripe webhooks: `Stripe-Signature` verification and the events we act on. Pure, no I/O.

Signature, as Stripe documents it ("Verify webhook signatures manually") and stripe-python's
`WebhookSignature.verify_header` checks it: the header is `t=<unix time>,v1=<hex>[,v1=<hex>…]`
(several `v1` while Stripe rolls an endpoint's secret; `v0` is a test scheme and ignored); the
signature is the hex HMAC-SHA256, keyed with the endpoint secret (`whsec_…`, used as it is), of
`"{t}.{raw body}"`; a timestamp older than the tolerance (300 s) is refused so a captured
delivery cannot be replayed later, and one further ahead than the tolerance too (stripe-python
checks only the past; a signed time far ahead is no delivery Stripe made, and the tolerance
covers any clock skew NTP leaves), as our own receiver example does. We accept several secrets at once so ops can rotate ours.

Events (`{"id": "evt_…", "type", "created", "data": {"object": …}}`), by the object they carry:
- PaymentIntent: `payment_intent.amount_capturable_updated` (authorised, manual capture),
  `payment_intent.succeeded` (authorised and captured; for a manual-capture intent, our
  capture, whose key Stripe merged into the intent's metadata), `payment_intent.payment_failed`
  (refused: `last_payment_error.decline_code`), `payment_intent.canceled` (our void). Our payment
  id is the intent's `metadata.gateway_payment_id`.
- Refund: `refund.created`, `refund.updated`, `refund.failed`, `charge.refund.updated`, with our
  follow-up key in the refund's `metadata.gateway_follow_up` and `status` succeeded / pending /
  failed / canceled (a refund can fail after it succeeded: `refund.failed` undoes it).
Anything else is `EventKind.OTHER`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from domain.webhook import EventKind, MalformedEvent, ProviderEvent, SignatureInvalid
from providers.classify import json_value
from providers.stripe.mapping import CAPTURE_METADATA_KEY, METADATA_KEY, REFUND_METADATA_KEY

SIGNATURE_HEADER = "Stripe-Signature"
TOLERANCE_S = 300
SCHEME = "v1"
ANSWER = (200, b'{"received": true}', "application/json")

# Refund.status -> success (None: not final yet).
REFUND_SUCCESS: Mapping[str, bool | None] = {
    "succeeded": True, "failed": False, "canceled": False, "pending": None, "requires_action": None,
}
_REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"})


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` header Stripe would send (for tests and the emulator)."""
    return f"t={timestamp},{SCHEME}={_mac(secret, timestamp, body)}"


def _mac(secret: str, timestamp: int | str, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(body: bytes, headers: Mapping[str, str], secrets: Sequence[str], now: float) -> None:
    """Raise `SignatureInvalid` unless one `v1` signature matches one of `secrets` and the
    timestamp is within the tolerance. Constant-time comparisons only."""
    header = headers.get(SIGNATURE_HEADER)
    if not header:
        raise SignatureInvalid(f"no {SIGNATURE_HEADER} header")
    timestamp: str | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            timestamp = value
        elif name == SCHEME:
            signatures.append(value)
    if timestamp is None or not timestamp.isascii() or not timestamp.isdigit():
        raise SignatureInvalid(f"{SIGNATURE_HEADER} has no timestamp")
    if not signatures:
        raise SignatureInvalid(f"{SIGNATURE_HEADER} has no {SCHEME} signature")
    matched = False
    for secret in secrets:
        expected = _mac(secret, timestamp, body)
        for signature in signatures:
            matched |= hmac.compare_digest(expected.encode(), signature.encode(errors="replace"))
    if not matched:
        raise SignatureInvalid("no signature matches a configured secret")
    if int(timestamp) < now - TOLERANCE_S:
        raise SignatureInvalid(f"timestamp older than {TOLERANCE_S} s")
    if int(timestamp) > now + TOLERANCE_S:
        raise SignatureInvalid(f"timestamp more than {TOLERANCE_S} s ahead")


def parse(body: bytes) -> tuple[ProviderEvent, ...]:
    doc = json_value(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not isinstance(doc.get("type"), str):
        raise MalformedEvent("not a Stripe event object (id, type)")
    data = doc.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise MalformedEvent("Stripe event without data.object")
    event_type = doc["type"]
    if event_type in _REFUND_EVENTS:
        return (_refund_event(doc["id"], event_type, obj),)
    if event_type.startswith("payment_intent."):
        return (_intent_event(doc["id"], event_type, obj),)
    return (ProviderEvent(doc["id"], EventKind.OTHER, event_type, None, None),)


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _intent_event(event_id: str, event_type: str, intent: dict[str, Any]) -> ProviderEvent:
    metadata = _metadata(intent)
    common = {"payment_reference": metadata.get(METADATA_KEY), "provider_reference": intent.get("id"),
              "currency": intent.get("currency"), "type": event_type}
    amount = intent.get("amount")
    if event_type == "payment_intent.amount_capturable_updated":
        return ProviderEvent(event_id, EventKind.AUTHORISATION, success=True, amount=amount, **common)
    if event_type == "payment_intent.succeeded":
        if intent.get("capture_method") == "manual":
            return ProviderEvent(event_id, EventKind.CAPTURE, success=True, amount=intent.get("amount_received"),
                                 follow_up_reference=metadata.get(CAPTURE_METADATA_KEY), **common)
        return ProviderEvent(event_id, EventKind.AUTHORISATION, success=True, amount=amount, **common)
    if event_type == "payment_intent.payment_failed":
        error = intent.get("last_payment_error")
        reason = (error.get("decline_code") or error.get("code")) if isinstance(error, dict) else None
        return ProviderEvent(event_id, EventKind.AUTHORISATION, success=False, amount=amount, reason=reason, **common)
    if event_type == "payment_intent.canceled":
        return ProviderEvent(event_id, EventKind.CANCEL, success=True, amount=amount, **common)
    return ProviderEvent(event_id, EventKind.OTHER, success=None, **common)


def _refund_event(event_id: str, event_type: str, refund: dict[str, Any]) -> ProviderEvent:
    status = str(refund.get("status") or "")
    return ProviderEvent(event_id, EventKind.REFUND, event_type, REFUND_SUCCESS.get(status),
                         payment_reference=None, follow_up_reference=_metadata(refund).get(REFUND_METADATA_KEY),
                         provider_reference=refund.get("payment_intent"), amount=refund.get("amount"),
                         currency=refund.get("currency"), reason=refund.get("failure_reason"),
                         reverses=status == "failed")  # a refund can fail after it succeeded
