"""The `Gateway-Signature` header: how the checkout knows a notification is ours and recent.

    Gateway-Signature: t=1764590000,v1=<hex>,v1=<hex>

`t` is the Unix time of signing; each `v1` is the hex HMAC-SHA256, keyed with one active secret
(UTF-8), over the bytes `"{t}." + body`. One `v1` per secret in `notifications.secret_env`, so
during a rotation a receiver that knows either secret verifies. A receiver recomputes the HMAC
with its secret(s), compares in constant time against every `v1`, and refuses a `t` more than a
few minutes from its clock (a replayed capture of an old delivery). The same construction as
Stripe's `Stripe-Signature`, which checkout teams already know how to verify.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_HEADER = "Gateway-Signature"


def signature_header(body: bytes, secrets: Sequence[str], timestamp: int) -> str:
    signed = str(timestamp).encode() + b"." + body
    macs = (hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets)
    return ",".join([f"t={timestamp}", *(f"v1={mac}" for mac in macs)])
