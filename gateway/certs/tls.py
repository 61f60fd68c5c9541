"""TLS contexts for the gateway's server side and its calls to providers.

Each context is built once and kept for the life of the process. Rotating a certificate means
loading the new pair into that same object (:func:`reload_cert_chain`), not building a new one:
everything holding the context (the listening site, the client connector) picks the new pair up
on its next handshake, with no restart.
"""

from __future__ import annotations

import ssl
from pathlib import Path

_MIN_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(
    cert: Path,
    key: Path,
    *,
    client_ca: Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``cert``.

    With ``client_ca``, client certificates issued by it are checked (optional unless
    ``require_client_cert``). Requiring client certificates without saying who may issue them
    would reject every client, so that combination is refused up front.
    """
    if require_client_cert and client_ca is None:
        raise ValueError("require_client_cert needs client_ca to verify client certificates")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSION
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ client context that verifies the server and its hostname.

    ``ca`` is the bundle trusted for the server (``None``: the system's trust store, for
    providers with public certificates). ``cert``/``key`` is the client certificate presented
    for mTLS; ``key`` may be omitted when it is in the ``cert`` file, as with ``ssl``.
    """
    if key is not None and cert is None:
        raise ValueError("a client key without a client certificate")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = _MIN_VERSION
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def reload_cert_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None = None) -> None:
    """Swap the certificate and key of ``ctx`` in place; this is what makes rotation restart-free.

    OpenSSL copies a context's certificate into each connection when its handshake starts, so
    after this call new handshakes present the new pair, while connections already established
    (and requests in flight on them) keep the pair they negotiated with until they close.

    The pair is first loaded into a scratch context: a pair that does not load (missing file,
    key not matching) raises ``ssl.SSLError``/``OSError`` there and leaves ``ctx`` untouched,
    since a failed ``load_cert_chain`` on ``ctx`` itself could leave it without a usable key.
    """
    ssl.SSLContext(ctx.protocol).load_cert_chain(cert, key)
    ctx.load_cert_chain(cert, key)
