"""Bearer API keys from configuration: 401 without a known key, 403 for a key not allowed, 400
for two Authorization headers (never "the first one that matches")."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from aiohttp import web

from gateway.http.errors import ApiError
from gateway.http.inputs import single_header
from gateway.config import AuthConfig


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    permissions: frozenset[str]
    # Keys the caller's request fingerprints (gateway.http.idempotency): derived from its API key,
    # so a stored fingerprint cannot be searched for the card data of the body it hashes.
    fingerprint_key: bytes = field(default=b"", repr=False)


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self._keys = [(c.key.get_secret_value().encode(),
                       Caller(c.name, frozenset(c.permissions), fingerprint_key(c.key.get_secret_value())))
                      for c in config.clients]

    def caller(self, request: web.Request, permission: str) -> Caller:
        header = single_header(request, "Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthenticated", "an Authorization: Bearer <api key> header is required",
                           headers={"WWW-Authenticate": "Bearer"})
        token = token.strip()
        if not token.isascii():  # every key is ASCII; a byte the header decoded past that is none
            raise ApiError(401, "unauthenticated", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        presented = token.encode()
        for key, caller in self._keys:
            if hmac.compare_digest(key, presented):
                if permission not in caller.permissions:
                    raise ApiError(403, "forbidden", f"this API key may not {permission.replace(':', ' ')}")
                return caller
        raise ApiError(401, "unauthenticated", "unknown API key", headers={"WWW-Authenticate": "Bearer"})


def fingerprint_key(api_key: str) -> bytes:
    return hmac.new(api_key.encode(), b"gateway idempotency fingerprint v1", hashlib.sha256).digest()
