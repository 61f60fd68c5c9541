"""Front-door idempotency after the IETF draft "The Idempotency-Key HTTP Header Field": the
key header and the request's fingerprint. Missing or malformed key: 400.

A repeated key header is refused like a missing one. What a claimed key answers (same key and
body: the stored answer, byte for byte; another body: 422; still running: 409) is the payment
service's (`gateway.orchestrator`, `gateway.answers`). Keys are scoped to the calling API key and
expire after the configured retention.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from aiohttp import web

from gateway.http.errors import ApiError
from gateway.http.inputs import single_header

HEADER = "Idempotency-Key"
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")


def idempotency_key(request: web.Request) -> str:
    key = single_header(request, HEADER)
    if key is None:
        raise ApiError(400, "idempotency_key_missing", f"the {HEADER} header is required on this request", HEADER)
    key = key.strip().strip('"')  # the draft sends it as a structured-field string
    if not _VALID.match(key):
        raise ApiError(400, "idempotency_key_invalid", f"{HEADER} must be 1-255 visible ASCII characters", HEADER)
    return key


def fingerprint(request: web.Request, body: bytes, key: bytes) -> str:
    """The request's identity for its Idempotency-Key: method, path and body bytes. Keyed
    (HMAC-SHA256 with a key derived from the caller's API key): the body holds the card number
    and CVC, and a plain hash stored beside the payment's BIN, last four and amount could be
    searched for them in seconds."""
    return hmac.new(key, request.method.encode() + b" " + request.path.encode() + b"\n" + body,
                    hashlib.sha256).hexdigest()
