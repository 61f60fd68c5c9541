"""`/openapi.json` (OpenAPI 3.1), generated from the same pydantic models that validate requests,
so the document cannot drift from what the server accepts (`tests/test_openapi.py` checks the
published constraints against the models and the answers against the published schemas).

What a client, or a stateful API fuzzer, needs to follow a payment: each operation has an
`operationId`, and the answers of `POST /v1/payments` link to the read and the follow-ups with
the payment's `id` (`$response.body#/id`); every status an operation answers is listed with its
body (a payment, or the one error shape with the codes it can carry); `Retry-After` is
published on the 409 and 503 answers that send it. The constraints the models cannot say in
JSON Schema are in their descriptions (the Luhn check; card data refused in free text).

The merchant notifications are published in `webhooks`, which their own module builds
(`gateway/api/openapi_webhooks.py`): this one only places them in the document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from domain.outcome import PaymentStatus
from gateway.http.errors import json_response
from gateway.http.inputs import MAX_REQUEST_TIMEOUT_MS
from gateway.api.openapi_webhooks import webhooks as notification_webhooks
from gateway.http.schemas import CaptureCreate, CompleteCreate, PaymentCreate, RefundCreate, VoidCreate
from gateway.api.webhooks import OPENAPI as WEBHOOK_PATHS

_ERROR = {"$ref": "#/components/schemas/Error"}
_PAYMENT = {"$ref": "#/components/schemas/Payment"}
_RETRY_AFTER = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
_NULLABLE_STRING = {"type": ["string", "null"]}

# Every error an operation can answer: (status, when, the codes it carries, sends Retry-After).
_ERRORS: dict[int, tuple[str, tuple[str, ...], bool]] = {
    400: ("the request cannot be read: a missing or bad Idempotency-Key, a duplicate header, malformed JSON",
          ("idempotency_key_missing", "idempotency_key_invalid", "duplicate_header", "invalid_header",
           "malformed_body", "malformed_json", "duplicate_json_key", "client_disconnected"), False),
    401: ("no valid API key", ("unauthenticated",), False),
    403: ("the API key lacks the permission", ("forbidden",), False),
    404: ("no such payment (or not this caller's)", ("payment_not_found", "not_found"), False),
    408: ("the request body did not arrive within `server.body_timeout_s`; the connection is closed",
          ("body_timeout",), False),
    409: ("a request with this Idempotency-Key is still running (Retry-After), another operation of the "
          "payment is at its provider (Retry-After), the payment's state does not allow this follow-up, or an "
          "accepted follow-up proved never made",
          ("idempotency_key_in_use", "invalid_payment_state", "capture_not_made", "void_not_made",
           "refund_not_made"), True),
    413: ("the body is too large", ("body_too_large",), False),
    415: ("not JSON, or a content encoding", ("unsupported_media_type", "unsupported_encoding"), False),
    422: ("a field is invalid (the field path is named), card data or a secret in free text, the key reused "
          "with another body, or the provider refused the follow-up",
          ("invalid_field", "card_data_in_free_text", "secret_in_free_text", "sensitive_metadata_key",
           "idempotency_key_reused", "amount_too_large",
           "capture_refused", "void_refused", "refund_refused"), False),
    500: ("the gateway failed (a bug): nothing internal is named", ("internal_error",), False),
    503: ("shed (the gateway, its log or its journal at capacity, or every provider of the route at its request "
          "quota), the journal unavailable, or the provider did not take the follow-up (its quota included): "
          "retry after Retry-After with the same Idempotency-Key",
          ("overloaded", "journal_unavailable", "provider_unavailable"), True),
}
_CREATE_ERRORS = (400, 401, 403, 408, 409, 413, 415, 422, 500, 503)
_FOLLOW_UP_ERRORS = (400, 401, 403, 404, 408, 409, 413, 415, 422, 500, 503)

# The payment's id from an answer, for every operation that takes it (OpenAPI links).
_ON_THE_PAYMENT = {
    "getPayment": "read the payment",
    "capturePayment": "capture the authorisation",
    "voidPayment": "void the authorisation",
    "refundPayment": "refund what was captured",
}


def _links(*operations: str) -> dict[str, Any]:
    return {op[0].upper() + op[1:]: {"operationId": op, "parameters": {"payment_id": "$response.body#/id"},
                                     "description": _ON_THE_PAYMENT[op]}
            for op in operations}


def _errors(*statuses: int, only: Mapping[int, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The error answers, each with the codes it carries here (`only` narrows them)."""
    out: dict[str, Any] = {}
    for status in statuses:
        when, codes, retry_after = _ERRORS[status]
        codes = (only or {}).get(status, codes)
        out[str(status)] = {
            "description": when,
            "content": {"application/json": {"schema": {"allOf": [_ERROR, {"properties": {
                "code": {"enum": list(codes)}}}]}}},
            **({"headers": _RETRY_AFTER} if retry_after else {}),
        }
    return out


def _payment_answer(description: str, *links: str) -> dict[str, Any]:
    """A payment answer, linking to the operations that take its id."""
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _PAYMENT}}}
    if links:
        answer["links"] = _links(*links)
    return answer


def _schemas() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (PaymentCreate, CaptureCreate, RefundCreate, VoidCreate, CompleteCreate)],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(defs["$defs"])
    schemas["Error"] = {
        "type": "object", "required": ["code", "message", "field"], "additionalProperties": False,
        "properties": {"code": {"type": "string", "description": "machine-readable"},
                       "message": {"type": "string", "description": "for a human"},
                       "field": {**_NULLABLE_STRING, "description": "the field path or header it is about"}},
    }
    attempt = {
        "type": "object", "additionalProperties": False,
        "required": ["provider", "try", "operation", "outcome", "raw_code", "http_status", "latency_ms",
                     "failover_reason"],
        "properties": {"provider": {"type": "string"}, "try": {"type": "integer", "minimum": 0},
                       "operation": {"enum": ["authorize", "capture", "void", "refund", "status", "complete"]},
                       "outcome": _NULLABLE_STRING, "raw_code": _NULLABLE_STRING,
                       "http_status": {"type": ["integer", "null"]}, "latency_ms": {"type": ["number", "null"]},
                       "failover_reason": _NULLABLE_STRING},
    }
    answered = [s.value for s in PaymentStatus if s not in (PaymentStatus.RECEIVED, PaymentStatus.ATTEMPTING)]
    amount = {"type": "integer", "minimum": 0}
    schemas["Payment"] = {
        "type": "object", "additionalProperties": False,
        "required": ["id", "status", "amount", "currency", "capture", "merchant_reference", "provider",
                     "provider_reference", "decline_code", "error_code", "captured_amount", "refunded_amount",
                     "pending_follow_up", "duplicate_charge_suspected", "card", "attempts", "created_at",
                     "updated_at"],
        "properties": {
            "id": {"type": "string", "pattern": "^pay_[a-z]+$"},
            "status": {"enum": answered},
            "amount": amount, "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "capture": {"type": "boolean"}, "merchant_reference": {"type": "string"},
            "provider": _NULLABLE_STRING, "provider_reference": _NULLABLE_STRING,
            "decline_code": _NULLABLE_STRING, "error_code": _NULLABLE_STRING,
            "captured_amount": amount, "refunded_amount": amount,
            "pending_follow_up": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["operation", "amount"], "additionalProperties": False,
                "properties": {"operation": {"enum": ["capture", "void", "refund", "complete"]},
                               "amount": {"type": ["integer", "null"]}}}]},
            "duplicate_charge_suspected": {"type": "boolean"},
            "card": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["brand", "bin", "last4"], "additionalProperties": False,
                "description": "what PCI DSS truncation allows: never the whole number",
                "properties": {"brand": _NULLABLE_STRING, "bin": _NULLABLE_STRING, "last4": _NULLABLE_STRING}}]},
            "attempts": {"type": "array", "items": attempt},
            "created_at": {"type": "number", "description": "Unix time, seconds"},
            "updated_at": {"type": "number", "description": "Unix time, seconds"},
            "action": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["type", "url", "method", "data", "provider_action"],
                "description": "while action_required: what the shopper must do (3-D Secure)",
                "properties": {"type": {"enum": ["redirect", "sdk"]}, "url": {"type": "string"},
                               "method": {"enum": ["GET", "POST"]}, "data": {"type": "object"},
                               "provider_action": {"type": "object"}}}]},
            "action_expires_at": {"type": ["number", "null"], "description": "Unix time: an unfinished action "
                                  "is cancelled then and the payment fails `expired`"},
        },
    }
    return schemas


def build_openapi() -> dict[str, Any]:
    """The document, the merchant notifications' `webhooks` section included."""
    idem = {"name": "Idempotency-Key", "in": "header", "required": True,
            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
            "description": "the same key and body replays the stored answer (IETF draft Idempotency-Key)"}
    timeout = {"name": "Request-Timeout", "in": "header", "required": False,
               "schema": {"type": "integer", "minimum": 1, "maximum": MAX_REQUEST_TIMEOUT_MS},
               "description": "lowers the deadline (ms, ASCII digits)"}
    pid = {"name": "payment_id", "in": "path", "required": True, "schema": {"type": "string"}}

    def mutating(operation_id: str, model: str, summary: str, answers: dict[str, Any], *,
                 with_id: bool, errors: tuple[int, ...], only: Mapping[int, tuple[str, ...]]) -> dict[str, Any]:
        return {"post": {
            "operationId": operation_id, "summary": summary,
            "parameters": ([pid] if with_id else []) + [idem, timeout],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model}"}}}},
            "responses": {**answers, **_errors(*errors, only=only)},
        }}

    create_only = {409: ("idempotency_key_in_use",),
                   422: ("invalid_field", "sensitive_metadata_key", "idempotency_key_reused"),
                   503: ("overloaded", "journal_unavailable")}
    follow_up_answers = {
        "200": _payment_answer("done: the payment as it is now", "getPayment"),
        "202": _payment_answer("accepted, not yet confirmed by the provider (`pending_follow_up`): the "
                               "reconciler settles it and the same key then replays the final answer", "getPayment"),
    }

    def follow_up(operation_id: str, model: str, summary: str) -> dict[str, Any]:
        return mutating(operation_id, model, summary, follow_up_answers, with_id=True,
                        errors=_FOLLOW_UP_ERRORS, only={})

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Payment-resilience gateway", "version": "1"},
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "headers": {"RetryAfter": {"description": "seconds to wait before retrying with the same key",
                                       "schema": {"type": "integer", "minimum": 0}}},
        },
        "security": [{"bearer": []}],
        "webhooks": notification_webhooks(),
        "paths": {
            "/v1/payments": mutating(
                "createPayment", "PaymentCreate", "Authorise (and optionally capture) a payment", {
                    "201": _payment_answer("approved, declined or pending (the reconciler settles a pending "
                                           "one; read it with its id)", *_ON_THE_PAYMENT),
                    "202": _payment_answer("pending: another writer settles it", *_ON_THE_PAYMENT),
                    "502": _payment_answer("failed: no provider took it (`error_code` says why)", "getPayment"),
                }, with_id=False, errors=_CREATE_ERRORS, only=create_only),
            "/v1/payments/{payment_id}": {"get": {
                "operationId": "getPayment", "summary": "Read a payment", "parameters": [pid],
                "responses": {"200": _payment_answer("the payment"),
                              **_errors(401, 403, 404, 500, 503, only={503: ("journal_unavailable",)})}}},
            "/v1/payments/{payment_id}/capture": follow_up("capturePayment", "CaptureCreate",
                                                           "Capture an authorisation"),
            "/v1/payments/{payment_id}/void": follow_up("voidPayment", "VoidCreate", "Void an authorisation"),
            "/v1/payments/{payment_id}/refunds": follow_up("refundPayment", "RefundCreate",
                                                           "Refund a captured payment"),
            "/v1/payments/{payment_id}/complete": mutating(
                "completePayment", "CompleteCreate", "Finish a payment whose shopper is back from 3-D Secure", {
                    "200": _payment_answer("approved, declined, or still action_required (the shopper has not "
                                           "finished)", "getPayment"),
                    "202": _payment_answer("the provider's answer is unknown: call again", "getPayment"),
                }, with_id=True, errors=_FOLLOW_UP_ERRORS, only={}),
            "/livez": _probe("getLive", "the process answers (checks nothing outside it)"),
            "/healthz": _probe("getHealth", "the older name of /livez"),
            "/readyz": _probe("getReady", "whether to send this replica traffic; 503 lists the `reasons`",
                              unready=True),
            "/metrics": _probe("getMetrics", "Prometheus text (no card data, payment id or key)",
                               media="text/plain; version=0.0.4"),
            "/openapi.json": _probe("getOpenApi", "this document"),
            **WEBHOOK_PATHS,
        },
    }
    return document


def _probe(operation_id: str, summary: str, *, unready: bool = False,
           media: str = "application/json") -> dict[str, Any]:
    """A GET without credentials: the probes, the scrape, this document."""
    body = {media: {"schema": {"type": "string"} if media.startswith("text/") else {"type": "object"}}}
    responses = {"200": {"description": "ok", "content": body}}
    if unready:
        responses["503"] = {"description": "not ready", "content": {"application/json": {"schema": {
            "type": "object", "required": ["ready", "reasons"],
            "properties": {"ready": {"const": False}, "reasons": {"type": "array", "items": {"type": "string"}}}}}}}
    return {"get": {"operationId": operation_id, "summary": summary, "security": [], "responses": responses}}


def add_routes(app: web.Application) -> None:
    document = build_openapi()

    async def openapi(_request: web.Request) -> web.Response:
        return json_response(200, document)

    app.router.add_get("/openapi.json", openapi)
