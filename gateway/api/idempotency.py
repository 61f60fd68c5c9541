"""Front-door idempotency after the IETF draft "The Idempotency-Key HTTP Header Field".

Missing, malformed or repeated key header: 400. Same key, same body: the stored answer, byte for byte, with its
status. Same key, another body: 422. Same key while the first is still running: 409. Keys are
scoped to the calling API key and expire after the configured retention.
"""

from __future__ import annotations

import hashlib
import re
import time

from aiohttp import web

from gateway.api.errors import ApiError
from gateway.api.inputs import single_header
from gateway.journal.records import ClaimKind, PaymentRecord, StoredResponse
from gateway.journal.store import Store

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


def fingerprint(request: web.Request, body: bytes) -> str:
    return hashlib.sha256(request.method.encode() + b" " + request.path.encode() + b"\n" + body).hexdigest()


class FrontDoor:
    def __init__(self, store: Store, retention_s: float) -> None:
        self._store = store
        self._retention_s = retention_s

    async def claim(self, scope: str, key: str, print_: str, resource_id: str,
                    record: PaymentRecord | None = None) -> web.Response | None:
        """None when this request owns the key now; otherwise the answer to send instead.
        A new payment's `record` is journalled in the same transaction as the claim."""
        now = time.time()
        claim = await self._store.claim_idempotency(scope, key, print_, resource_id, now, now + self._retention_s,
                                                    record)
        match claim.kind:
            case ClaimKind.NEW:
                return None
            case ClaimKind.REPLAY:
                assert claim.response is not None
                return web.Response(status=claim.response.status, body=claim.response.body,
                                    content_type="application/json", headers={"Idempotent-Replayed": "true"})
            case ClaimKind.IN_FLIGHT:
                raise ApiError(409, "idempotency_key_in_use",
                               "a request with this Idempotency-Key is still being processed; retry later", HEADER,
                               headers={"Retry-After": "1"})
            case ClaimKind.MISMATCH:
                raise ApiError(422, "idempotency_key_reused",
                               "this Idempotency-Key was used with a different request body", HEADER)
        raise AssertionError(claim.kind)

    async def complete(self, scope: str, key: str, response: web.Response) -> None:
        await self._store.complete_idempotency(scope, key, StoredResponse(response.status, bytes(response.body)))

    async def release(self, scope: str, key: str) -> None:
        await self._store.release_idempotency(scope, key)
