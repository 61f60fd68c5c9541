"""`/openapi.json`, generated from the same pydantic models that validate requests, so the
document cannot drift from what the server accepts."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from domain.outcome import PaymentStatus
from gateway.api.errors import json_response
from gateway.api.schemas import CaptureCreate, CompleteCreate, PaymentCreate, RefundCreate, VoidCreate

_ERROR = {"$ref": "#/components/schemas/Error"}
_PAYMENT = {"$ref": "#/components/schemas/Payment"}


def _error_responses(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def build_openapi() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (PaymentCreate, CaptureCreate, RefundCreate, VoidCreate, CompleteCreate)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = dict(defs["$defs"])
    schemas["Error"] = {
        "type": "object", "required": ["code", "message", "field"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "field": {"type": ["string", "null"]}},
    }
    schemas["Payment"] = {
        "type": "object",
        "required": ["id", "status", "provider", "provider_reference", "decline_code", "attempts"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": [s.value for s in PaymentStatus if s not in (PaymentStatus.RECEIVED,
                                                                            PaymentStatus.ATTEMPTING)]},
            "pending_follow_up": {"type": ["object", "null"]},
            "duplicate_charge_suspected": {"type": "boolean"},
            "provider": {"type": ["string", "null"]},
            "provider_reference": {"type": ["string", "null"]},
            "decline_code": {"type": ["string", "null"]},
            "error_code": {"type": ["string", "null"]},
            "attempts": {"type": "array", "items": {"type": "object"}},
            "action": {"type": ["object", "null"], "description": "while action_required: what the shopper must "
                       "do (type redirect|sdk, url, method, data, provider_action)"},
            "action_expires_at": {"type": ["number", "null"]},
        },
    }
    idem = {"name": "Idempotency-Key", "in": "header", "required": True, "schema": {"type": "string", "maxLength": 255}}
    timeout = {"name": "Request-Timeout", "in": "header", "required": False,
               "schema": {"type": "integer", "minimum": 1}, "description": "lowers the deadline (ms)"}
    pid = {"name": "payment_id", "in": "path", "required": True, "schema": {"type": "string"}}

    def post(model: str, ok: str, summary: str, with_id: bool) -> dict[str, Any]:
        return {"post": {
            "summary": summary,
            "parameters": ([pid] if with_id else []) + [idem, timeout],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model}"}}}},
            "responses": {ok: {"description": "the payment", "content": {"application/json": {"schema": _PAYMENT}}},
                          **_error_responses(400, 401, 403, 404, 409, 413, 415, 422, 502, 503)},
        }}

    return {
        "openapi": "3.1.0",
        "info": {"title": "Payment-resilience gateway", "version": "1"},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/payments": post("PaymentCreate", "201", "Authorise (and optionally capture) a payment", False),
            "/v1/payments/{payment_id}": {"get": {
                "summary": "Read a payment", "parameters": [pid],
                "responses": {"200": {"description": "the payment",
                                      "content": {"application/json": {"schema": _PAYMENT}}},
                              **_error_responses(401, 403, 404)}}},
            "/v1/payments/{payment_id}/capture": post("CaptureCreate", "200", "Capture an authorisation", True),
            "/v1/payments/{payment_id}/void": post("VoidCreate", "200", "Void an authorisation", True),
            "/v1/payments/{payment_id}/refunds": post("RefundCreate", "200", "Refund a captured payment", True),
            "/v1/payments/{payment_id}/complete": post("CompleteCreate", "200",
                                                       "Finish a payment whose shopper is back from 3-D Secure", True),
        },
    }


def add_routes(app: web.Application) -> None:
    document = build_openapi()

    async def openapi(_request: web.Request) -> web.Response:
        return json_response(200, document)

    app.router.add_get("/openapi.json", openapi)
