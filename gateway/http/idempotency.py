"""Front-door idempotency after the IETF draft "The Idempotency-Key HTTP Header Field": the
key header and the request's fingerprint. Missing or malformed key: 400. A key holding card
data or a secret: 422, like the body's free text (DESIGN rule 6), before anything is written: the
key is stored as sent in the journal's idempotency table. A UUID (RFC 9562's form, what the
draft suggests and most clients send) is the one shape not refused for a card number: its
dashes sit where no card's grouping puts them, yet the detector reads a card number into about
one random UUID in 500 (digit runs across the dashes that pass Luhn), and refusing those would
fail one well-formed payment in 500. A UUID that is a configured secret is still refused.

A repeated key header is refused like a missing one. What a claimed key answers (same key and
body: the stored answer, byte for byte; another body: 422; still running: 409) is the payment
service's (`gateway.orchestrator`, `gateway.answers`). Keys are scoped to the calling API key and
expire after the configured retention.
"""

from __future__ import annotations

import hashlib
import hmac
import re

import orjson
from aiohttp import web

from gateway.http.errors import ApiError
from gateway.journal.records import Fingerprint
from gateway.http.free_text import refuse_in_text
from gateway.http.inputs import single_header
from gateway.redaction import Finding, Redactor

HEADER = "Idempotency-Key"
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE)


def idempotency_key(request: web.Request, redactor: Redactor) -> str:
    """The caller's key; `redactor` is the app's (it knows the configured secrets)."""
    key = single_header(request, HEADER)
    if key is None:
        raise ApiError(400, "idempotency_key_missing", f"the {HEADER} header is required on this request", HEADER)
    key = key.strip().strip('"')  # the draft sends it as a structured-field string
    if not _VALID.match(key):
        raise ApiError(400, "idempotency_key_invalid", f"{HEADER} must be 1-255 visible ASCII characters", HEADER)
    if _UUID.fullmatch(key) and redactor.finding(key) is Finding.CARD_NUMBER:
        return key  # digits of a random UUID read as a card (see above); a secret is found first
    refuse_in_text(key, HEADER, redactor)
    return key


def fingerprint(request: web.Request, body: bytes, document: object, key: bytes) -> Fingerprint:
    """The request's identity for its Idempotency-Key: method, path and the body's JSON document
    in canonical form (keys sorted, no whitespace), so the same payment sent again re-serialised
    (keys in another order, indented: a checkout rebuilding the request after a crash) is a
    replay, not 422 `idempotency_key_reused`, after which the checkout might pay with a new key.
    Keyed (HMAC-SHA256 with a key derived from the caller's API key): the body holds the card
    number and CVC, and a plain hash stored beside the payment's BIN, last four and amount could
    be searched for them in seconds. `legacy`: the raw bytes' HMAC, what earlier releases stored."""
    head = request.method.encode() + b" " + request.path.encode() + b"\n"
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    return Fingerprint(hmac.new(key, b"c1 " + head + canonical, hashlib.sha256).hexdigest(),
                       hmac.new(key, head + body, hashlib.sha256).hexdigest())
