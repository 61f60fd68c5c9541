"""Adyen standard webhooks: HMAC per notification item, and the items we act on. Pure, no I/O.

Adyen posts `{"live": "false", "notificationItems": [{"NotificationRequestItem": {...}}, ...]}`
and wants `[accepted]` back within 10 s, whatever it holds (otherwise it retries, and queues the
endpoint's later notifications behind it). Each item carries its own signature,
`additionalData.hmacSignature`: base64 of HMAC-SHA256, keyed with the webhook's HMAC key given
as hex, over `pspReference:originalReference:merchantAccountCode:merchantReference:value:
currency:eventCode:success` (an absent field is empty), exactly as Adyen's "Verify HMAC
signatures" page and the Python library's `is_valid_hmac_notification` compute it. Every item
must verify against one of the configured keys (several during a rotation); one that does not
makes the whole delivery unaccepted (401), so a forged item cannot ride in with real ones.

Items, by `eventCode` (`success` "true"/"false"):
- AUTHORISATION: the payment (`pspReference`; our payment id in `merchantReference`), refused
  with `reason` when `success` is "false".
- CAPTURE, REFUND, CANCELLATION, TECHNICAL_CANCEL (a cancel by our reference): a modification
  (`originalReference` is the payment's pspReference, `merchantReference` our follow-up's
  reference, as we sent it).
- CAPTURE_FAILED, REFUND_FAILED, REFUNDED_REVERSED: a modification that failed after Adyen had
  accepted it (`success` "true" means "this failure happened").
Adyen has no event id: an item is identified by eventCode, pspReference and success (Adyen:
"deduplicate by the combination of eventCode and pspReference"; success is part of it so a
correction is not taken for a repeat). Anything else is `EventKind.OTHER`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from domain.webhook import EventKind, MalformedEvent, ProviderEvent, SignatureInvalid
from providers.classify import json_list, json_value

ANSWER = (200, b"[accepted]", "text/plain")
SIGNED_FIELDS = ("pspReference", "originalReference", "merchantAccountCode", "merchantReference", "value",
                 "currency", "eventCode", "success")
MAX_ITEMS = 100  # Adyen batches at most a handful; more is not Adyen

# eventCode -> (kind, whether `success: true` means the operation succeeded)
EVENT_CODES: Mapping[str, tuple[EventKind, bool]] = {
    "AUTHORISATION": (EventKind.AUTHORISATION, True),
    "CAPTURE": (EventKind.CAPTURE, True),
    "REFUND": (EventKind.REFUND, True),
    "CANCELLATION": (EventKind.CANCEL, True),
    "TECHNICAL_CANCEL": (EventKind.CANCEL, True),  # a cancel by our reference (POST /cancels)
    "CAPTURE_FAILED": (EventKind.CAPTURE, False),
    "REFUND_FAILED": (EventKind.REFUND, False),
    "REFUNDED_REVERSED": (EventKind.REFUND, False),
}


def hmac_key(hex_key: str) -> bytes:
    """The configured key as bytes; ValueError when it is not hex (checked at start-up)."""
    try:
        return binascii.a2b_hex(hex_key.strip())
    except (binascii.Error, ValueError):
        raise ValueError("an Adyen HMAC key is hexadecimal (as the Customer Area shows it)") from None


def item_signature(item: Mapping[str, Any], key: bytes) -> str:
    """The `hmacSignature` Adyen computes for one NotificationRequestItem."""
    amount = item.get("amount") if isinstance(item.get("amount"), dict) else {}
    values = {**item, "value": amount.get("value", ""), "currency": amount.get("currency", "")}
    signing = ":".join(str(values.get(name, "")) for name in SIGNED_FIELDS)
    return base64.b64encode(hmac.new(key, signing.encode(), hashlib.sha256).digest()).decode()


def _items(body: bytes) -> list[dict[str, Any]]:
    doc = json_value(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("notificationItems"), list):
        raise MalformedEvent("not an Adyen notification (notificationItems)")
    items = [entry.get("NotificationRequestItem") for entry in json_list(doc["notificationItems"])]
    if not items or len(items) > MAX_ITEMS or not all(isinstance(item, dict) for item in items):
        raise MalformedEvent(f"an Adyen notification holds 1 to {MAX_ITEMS} NotificationRequestItem objects")
    return items  # type: ignore[return-value]


def verify(body: bytes, headers: Mapping[str, str], secrets: Sequence[str], now: float) -> None:
    """Raise `SignatureInvalid` unless every item's `hmacSignature` matches one of the keys."""
    try:
        items = _items(body)
    except MalformedEvent as exc:
        raise SignatureInvalid(f"unsigned: {exc}") from None
    keys = [hmac_key(secret) for secret in secrets]
    for number, item in enumerate(items):
        additional = item.get("additionalData")
        signature = additional.get("hmacSignature") if isinstance(additional, dict) else None
        if not isinstance(signature, str) or not signature:
            raise SignatureInvalid(f"item {number} has no additionalData.hmacSignature")
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(item_signature(item, key).encode(), signature.encode(errors="replace"))
        if not matched:
            raise SignatureInvalid(f"item {number}: the signature matches no configured HMAC key")


def parse(body: bytes) -> tuple[ProviderEvent, ...]:
    return tuple(_event(item) for item in _items(body))


def _event(item: dict[str, Any]) -> ProviderEvent:
    code = str(item.get("eventCode") or "")
    psp = item.get("pspReference")
    success_text = str(item.get("success", "")).lower()
    if not code or not isinstance(psp, str) or success_text not in ("true", "false"):
        raise MalformedEvent("an Adyen item needs eventCode, pspReference and success")
    amount = item.get("amount") if isinstance(item.get("amount"), dict) else {}
    event_id = f"{code}:{psp}:{success_text}"
    kind, success_means_done = EVENT_CODES.get(code, (EventKind.OTHER, True))
    happened = success_text == "true"
    common: dict[str, Any] = {"amount": amount.get("value"), "currency": amount.get("currency"),
                              "reason": item.get("reason"), "type": code}
    if kind is EventKind.AUTHORISATION:
        return ProviderEvent(event_id, kind, success=happened, payment_reference=item.get("merchantReference"),
                             provider_reference=psp, **common)
    if kind is EventKind.OTHER:
        return ProviderEvent(event_id, kind, success=None, payment_reference=item.get("merchantReference"),
                             provider_reference=item.get("originalReference") or psp, **common)
    # A failure notice (CAPTURE_FAILED) that says `success: false` reports that nothing failed.
    success = happened if success_means_done else (False if happened else None)
    return ProviderEvent(event_id, kind, success=success, payment_reference=None,
                         follow_up_reference=item.get("merchantReference"),
                         provider_reference=item.get("originalReference"), reverses=not success_means_done,
                         **common)
