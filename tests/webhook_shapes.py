"""Provider notifications in their documented shapes, signed as each provider signs them, for the
webhook tests (until the emulators send their own). Signing is the test's own code, checked
against the providers' SDKs in tests/test_webhooks.py, never the gateway's verifier."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from typing import Any

import orjson

STRIPE_SECRET = "whsec_test_current"
STRIPE_OLD_SECRET = "whsec_test_previous"
ADYEN_HMAC = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
ADYEN_OLD_HMAC = "11" * 32
CHECKOUT_SECRET = "cko_webhook_test_secret"
CHECKOUT_OLD_SECRET = "cko_webhook_previous_secret"
WEBHOOK_ENV = {"STRIPE_WEBHOOK_SECRET": STRIPE_SECRET, "STRIPE_WEBHOOK_SECRET_OLD": STRIPE_OLD_SECRET,
               "ADYEN_HMAC_KEY": ADYEN_HMAC, "ADYEN_HMAC_KEY_OLD": ADYEN_OLD_HMAC,
               "CHECKOUT_WEBHOOK_SECRET": CHECKOUT_SECRET, "CHECKOUT_WEBHOOK_SECRET_OLD": CHECKOUT_OLD_SECRET}
# providers= for gateway_config_data: each provider accepts its current and previous secret.
WEBHOOK_PROVIDERS = {
    "stripe": {"webhook_key_envs": ["STRIPE_WEBHOOK_SECRET", "STRIPE_WEBHOOK_SECRET_OLD"]},
    "adyen": {"webhook_key_envs": ["ADYEN_HMAC_KEY", "ADYEN_HMAC_KEY_OLD"]},
    "checkout": {"webhook_key_envs": ["CHECKOUT_WEBHOOK_SECRET", "CHECKOUT_WEBHOOK_SECRET_OLD"]},
}


# -- Stripe: Stripe-Signature t=…,v1=… over "{t}.{body}" ---------------------------------------------

def stripe_event(event_type: str, obj: dict[str, Any], event_id: str | None = None) -> bytes:
    return orjson.dumps({"id": event_id or f"evt_{uuid.uuid4().hex[:24]}", "object": "event",
                         "api_version": "2024-06-20", "created": int(time.time()), "type": event_type,
                         "livemode": False, "data": {"object": obj}})


def stripe_headers(body: bytes, secret: str = STRIPE_SECRET, timestamp: int | None = None) -> dict[str, str]:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


# -- Adyen: hmacSignature per NotificationRequestItem ------------------------------------------------

def adyen_item(event_code: str, psp: str, merchant_reference: str, value: int, *, success: bool = True,
               original: str | None = None, currency: str = "EUR", reason: str = "",
               key: str = ADYEN_HMAC) -> dict[str, Any]:
    item: dict[str, Any] = {"amount": {"currency": currency, "value": value}, "eventCode": event_code,
                            "eventDate": "2026-12-01T12:00:00+01:00", "merchantAccountCode": "GatewayTestECOM",
                            "merchantReference": merchant_reference, "pspReference": psp,
                            "reason": reason, "success": "true" if success else "false",
                            "paymentMethod": "visa", "operations": ["CANCEL", "CAPTURE", "REFUND"]}
    if original is not None:
        item["originalReference"] = original
    signing = ":".join(str(v) for v in (psp, original or "", "GatewayTestECOM", merchant_reference, value, currency,
                                        event_code, item["success"]))
    signature = base64.b64encode(hmac.new(bytes.fromhex(key), signing.encode(), hashlib.sha256).digest()).decode()
    item["additionalData"] = {"hmacSignature": signature, "cardSummary": "1142", "expiryDate": "12/2030"}
    return item


def adyen_notification(*items: dict[str, Any]) -> bytes:
    return orjson.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]})


# -- Checkout.com: Cko-Signature, hex HMAC-SHA256 of the body ----------------------------------------

def checkout_event(event_type: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    return orjson.dumps({"id": event_id or f"evt_{uuid.uuid4().hex[:26]}", "type": event_type,
                         "version": "1.0.33", "created_on": "2026-12-01T12:00:00Z", "data": data})


def checkout_headers(body: bytes, secret: str = CHECKOUT_SECRET) -> dict[str, str]:
    return {"Cko-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}
