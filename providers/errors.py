"""Transport failures, split by the one thing the engine must know: could the provider have
processed the request?

Modelled on httpx's exception tree. aiohttp's own errors are translated into these in exactly
one place (`providers.transport`) and never leak past it.
"""

from __future__ import annotations


class TransportError(Exception):
    """A call produced no HTTP answer."""

    code: str = "transport_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotSent(TransportError):
    """The request never reached the provider (refused, connect timeout, TLS handshake,
    no pool slot): safe to retry or to fail over."""

    code = "not_sent"


class MaybeSent(TransportError):
    """The request may have been processed (read timeout, reset after sending): the result is
    unknown until a status query or an idempotent replay settles it."""

    code = "maybe_sent"
