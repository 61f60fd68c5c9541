"""Browser sessions for the console: an admin API key, presented once, becomes a signed cookie.

The cookie is ``<client name>.<expiry>.<signature>`` where the signature is an HMAC-SHA256
keyed with that client's API key. So:

* the cookie never contains the key, and nobody without the key can forge one;
* every worker and every restart accepts it (no server-side session table, no process secret);
* rotating or removing the admin key (or its admin permission) ends its sessions at once.

It is set ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no cross-site request carries
it), ``Path=/console`` and ``Secure`` when the gateway serves TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable

from gateway.http.auth import Caller
from gateway.config import ClientKey

COOKIE = "gateway_console"
COOKIE_PATH = "/console"
DEFAULT_TTL_S = 8 * 3600  # one shift
_DOMAIN = b"gateway-console-session\x00"  # this HMAC signs nothing else


class SessionSigner:
    def __init__(self, clients: Iterable[ClientKey], *, ttl_s: int = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._admins = {c.name: (c.key.get_secret_value().encode(), Caller(c.name, frozenset(c.permissions)))
                        for c in clients if "admin" in c.permissions}

    def admin_for_key(self, presented: str) -> Caller | None:
        """The admin client whose key this is (constant-time comparison against each)."""
        if not presented.isascii():  # every key is ASCII
            return None
        found = None
        for key, caller in self._admins.values():
            if hmac.compare_digest(key, presented.encode()):
                found = caller
        return found

    def issue(self, caller: Caller) -> str:
        key, _ = self._admins[caller.name]
        payload = f"{caller.name}.{int(self._clock()) + self.ttl_s}"
        return f"{payload}.{_sign(key, payload)}"

    def verify(self, cookie: str) -> Caller | None:
        if not cookie.isascii():  # ours is ASCII; compare_digest refuses other text with a TypeError
            return None
        payload, _, signature = cookie.rpartition(".")
        name, _, expires = payload.rpartition(".")
        entry = self._admins.get(name)
        if entry is None or not expires.isdigit():
            return None
        key, caller = entry
        if not hmac.compare_digest(_sign(key, payload), signature):
            return None
        if int(expires) < self._clock():
            return None
        return caller


def _sign(key: bytes, payload: str) -> str:
    digest = hmac.new(key, _DOMAIN + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
