"""What a front-door request carries besides its route: the JSON body, validated into its model
(and free of card data in its free-text fields), and the deadline the caller asked for. Every
malformed input ends here as a clear 4xx (`ApiError`), never as a traceback."""

from __future__ import annotations

import time
from typing import TypeVar

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.api.errors import ApiError, from_validation_error
from gateway.api.free_text import refuse_card_data
from gateway.api.schemas import Body
from gateway.app_keys import CONFIG, REDACTOR

M = TypeVar("M", bound=Body)
MAX_REQUEST_TIMEOUT_MS = 120_000


async def json_body(request: web.Request, model: type[M]) -> tuple[bytes, M]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json", "Content-Type")
    body = await request.read()
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object")
    try:
        payload = model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    refuse_card_data(payload, request.app[REDACTOR])
    return body, payload


def request_deadline(request: web.Request) -> float:
    """The configured deadline, lowered (never raised) by the caller's `Request-Timeout` (ms)."""
    budget_ms = request.app[CONFIG].engine.deadline_ms
    header = request.headers.get("Request-Timeout")
    if header is not None:
        try:
            asked = int(header)
        except ValueError:
            raise ApiError(400, "invalid_header", "Request-Timeout must be whole milliseconds",
                           "Request-Timeout") from None
        if not 0 < asked <= MAX_REQUEST_TIMEOUT_MS:
            raise ApiError(400, "invalid_header", f"Request-Timeout must be 1..{MAX_REQUEST_TIMEOUT_MS}",
                           "Request-Timeout")
        budget_ms = min(budget_ms, asked)
    return time.monotonic() + budget_ms / 1000
