"""The OpenAPI 3.1 `webhooks` section: the merchant notifications the gateway sends to
`notifications.url`, one entry per event type, generated from `EventType` so the document
names every event the code can send (mounted by `gateway.api.openapi`)."""

from __future__ import annotations

from typing import Any

from gateway.notifications.events import EventType
from gateway.notifications.signing import SIGNATURE_HEADER

_WHEN = {
    EventType.PAYMENT_APPROVED: "a payment answered `pending` (or whose request died) was approved",
    EventType.PAYMENT_DECLINED: "a payment answered `pending` (or whose request died) was declined",
    EventType.PAYMENT_FAILED: "a payment answered `pending` (or whose request died) proved not charged",
    EventType.CAPTURE_SUCCEEDED: "a capture answered 202 (`capture_pending`) was confirmed",
    EventType.CAPTURE_FAILED: "a capture answered 202 was refused, or proved never made",
    EventType.REFUND_SUCCEEDED: "a refund answered 202 (`refund_pending`) was confirmed",
    EventType.REFUND_FAILED: "a refund answered 202 was refused, or proved never made",
    EventType.VOID_SUCCEEDED: "a void answered 202 (`void_pending`) was confirmed",
    EventType.VOID_FAILED: "a void answered 202 was refused, or proved never made",
}

_HEADERS = [
    {"name": SIGNATURE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
     "description": "`t=<unix seconds>,v1=<hex>[,v1=<hex>...]`: each v1 is HMAC-SHA256 with one active secret "
                    "over `{t}.{raw body}`; accept when any v1 matches one of your secrets and t is within 5 "
                    "minutes of your clock"},
    {"name": "Gateway-Event-Id", "in": "header", "required": True, "schema": {"type": "string"},
     "description": "the event's id (also `id` in the body): deduplicate by it, deliveries are at least once"},
    {"name": "Gateway-Event-Type", "in": "header", "required": True, "schema": {"type": "string"}},
]


def _event(event_type: EventType) -> dict[str, Any]:
    body = {
        "type": "object", "required": ["id", "type", "created_at", "payment_id", "payment"],
        "properties": {
            "id": {"type": "string", "pattern": "^evt_[a-z]{24}$"},
            "type": {"const": event_type.value},
            "created_at": {"type": "number", "description": "Unix seconds"},
            "payment_id": {"type": "string"},
            "payment": {"$ref": "#/components/schemas/Payment",
                        "description": "the payment as GET /v1/payments/{payment_id} returned it then"},
        },
    }
    return {"post": {
        "summary": f"{event_type.value}: {_WHEN[event_type]}",
        "description": "Sent only for an outcome reached after the HTTP answer; delivered at least once, retried "
                       "with backoff for up to `notifications.give_up_after_s` (3 days) until a 2xx answer.",
        "parameters": _HEADERS,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"2XX": {"description": "received (any other answer, or none in time, is retried)"}},
    }}


def webhooks() -> dict[str, Any]:
    return {event_type.value: _event(event_type) for event_type in EventType}
