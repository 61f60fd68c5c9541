"""What a front-door request carries besides its route: the body (decoded, bounded), its JSON
validated into a model (and free of card data in its free-text fields), headers that must come once, and the deadline the caller asked for.
Every malformed input ends here as a clear 4xx (`ApiError`), never as a traceback and never
half-accepted: these run before the idempotency claim, so a refused request leaves nothing.

The body is decoded here rather than by aiohttp's parser (the app runs with
`auto_decompress=False`): the parser answers a coding it cannot decode with a bare-text 400
before any middleware, passes one it does not know through as if it were plain JSON, and
bounds only the compressed size, not what a small gzip bomb inflates to.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from typing import Any, Generic, NamedTuple, TypeVar

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.http import strict_json
from gateway.http.errors import ApiError, from_validation_error
from gateway.http.free_text import refuse_card_data
from gateway.redaction import Redactor
from gateway.http.schemas import Body

M = TypeVar("M", bound=Body)
MAX_REQUEST_TIMEOUT_MS = 120_000
REQUEST_TIMEOUT = "Request-Timeout"
CONTENT_ENCODING = "Content-Encoding"
# zlib window bits per content coding (RFC 9110 8.4.1): gzip framing, or the zlib format for "deflate".
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_IDENTITY = ("", "identity")
_ASCII_DIGITS = re.compile(r"[0-9]{1,9}")


def single_header(request: web.Request, name: str) -> str | None:
    """The header's one value, None when absent; 400 when sent more than once (two keys or two
    credentials: which one did the caller mean, and which one did a proxy on the way check?)."""
    values = request.headers.getall(name, ())
    if len(values) > 1:
        raise ApiError(400, "duplicate_header", f"the {name} header must be sent once, not {len(values)} times",
                       name)
    return values[0] if values else None


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The body, decoded from its Content-Encoding (identity, gzip or deflate) and at most the
    app's `client_max_size` both as sent and as decoded, within `timeout_s` (`server.body_timeout_s`):
    a body still arriving then is a client that will not send it (or a slowloris), and its
    handler and connection are released. Behind HAProxy, `timeout http-request`
    (deploy/haproxy.cfg) bounds the headers too; aiohttp alone has no timer for them."""
    coding = _content_coding(request)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge, 413 in the middleware
    except web.RequestPayloadError:  # broken chunked framing after the headers
        raise ApiError(400, "malformed_body", "the request body's transfer framing is malformed") from None
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s",
                       headers={"Connection": "close"}) from None
    if coding is None:
        return raw
    limit = request.client_max_size
    decoder = zlib.decompressobj(_CODINGS[coding])
    try:
        body = decoder.decompress(raw, limit + 1)
    except zlib.error:
        raise ApiError(400, "malformed_body", f"the body is not valid {coding} data", CONTENT_ENCODING) from None
    if len(body) > limit:
        raise ApiError(413, "body_too_large", f"request body is too large once decoded (over {limit} bytes)")
    if not decoder.eof or decoder.unused_data:
        what = "is truncated" if not decoder.eof else "has bytes after its end"
        raise ApiError(400, "malformed_body", f"the {coding} body {what}", CONTENT_ENCODING)
    return body


def _content_coding(request: web.Request) -> str | None:
    header = single_header(request, CONTENT_ENCODING)
    coding = (header or "").strip().lower()
    if coding in _IDENTITY:
        return None
    if coding not in _CODINGS:
        raise ApiError(415, "unsupported_encoding",
                       f"Content-Encoding {header!r} is not supported: send identity, gzip or deflate",
                       CONTENT_ENCODING, headers={"Accept-Encoding": "gzip, deflate"})
    return coding


class JsonBody(NamedTuple, Generic[M]):
    raw: bytes  # decoded from its Content-Encoding
    document: dict[str, Any]  # as parsed: what the idempotency fingerprint hashes, canonically
    payload: M


async def json_body(request: web.Request, model: type[M], redactor: Redactor, timeout_s: float) -> JsonBody[M]:
    """The decoded body, its JSON document and its model. A JSON object only, each key once per
    object, and no card data or secret in its free text (`redactor`: the app's, which knows the
    configured secrets)."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json", "Content-Type")
    body = await read_body(request, timeout_s)
    try:
        data = strict_json.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    except strict_json.DuplicateKey as exc:
        raise ApiError(400, "duplicate_json_key", str(exc), exc.path) from None
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object")
    try:
        payload = model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    refuse_card_data(payload, redactor)
    return JsonBody(body, data, payload)


def request_deadline(request: web.Request, deadline_ms: int) -> float:
    """The configured deadline (`deadline_ms`), lowered (never raised) by the caller's
    `Request-Timeout` (ms)."""
    budget_ms = deadline_ms
    header = single_header(request, REQUEST_TIMEOUT)
    if header is not None:
        budget_ms = min(budget_ms, parse_timeout_ms(header))
    return time.monotonic() + budget_ms / 1000


def parse_timeout_ms(value: str) -> int:
    """Plain ASCII digits only. Python's `int()` also takes `+8000`, `8_000`, ` 8000 ` and
    `٨٠٠٠`; a caller relying on any of them would get a deadline other proxies read otherwise."""
    if not _ASCII_DIGITS.fullmatch(value):
        raise ApiError(400, "invalid_header", "Request-Timeout must be whole milliseconds in ASCII digits",
                       REQUEST_TIMEOUT)
    asked = int(value)
    if not 0 < asked <= MAX_REQUEST_TIMEOUT_MS:
        raise ApiError(400, "invalid_header", f"Request-Timeout must be 1..{MAX_REQUEST_TIMEOUT_MS}",
                       REQUEST_TIMEOUT)
    return asked
