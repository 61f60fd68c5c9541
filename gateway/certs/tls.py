"""TLS contexts for the gateway's server side and its calls to providers.

Each context is built once and kept for the life of the process. Rotating a certificate means
loading the new pair into that same object (:func:`reload_cert_chain`), not building a new one:
everything holding the context (the listening site, the client connector) picks the new pair up
on its next handshake, with no restart.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.certs.inspect import key_matches_cert

_MIN_VERSION = ssl.TLSVersion.TLSv1_2


class TlsFileError(ValueError):
    """A certificate, key or CA bundle that does not load. ``path`` is the file at fault and the
    message names it with the problem (``/etc/gw/client.key: does not match the certificate
    /etc/gw/client.pem``), where OpenSSL would only say ``[SSL] PEM lib``."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


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
    load_pair(ctx, cert, key)
    if client_ca is not None:
        load_bundle(ctx, client_ca)
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
    if ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        ctx = untrusting_client_context()
        load_bundle(ctx, ca)
    ctx.minimum_version = _MIN_VERSION
    if cert is not None:
        load_pair(ctx, cert, key)
    return ctx


def untrusting_client_context() -> ssl.SSLContext:
    """A client context that verifies the server and its hostname but trusts no CA yet, so every
    handshake fails until `load_bundle` gives it one: what a provider whose CA bundle does not
    load gets, rather than the system's trust store standing in for the CA it was given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = _MIN_VERSION
    return ctx


def load_bundle(ctx: ssl.SSLContext, ca: Path) -> None:
    """Trust the CA certificates in ``ca``; `TlsFileError` naming the file if it does not load."""
    try:
        ctx.load_verify_locations(cafile=ca)
    except OSError as exc:  # ssl.SSLError included
        raise TlsFileError(ca, _bundle_problem(ca, exc)) from None


def load_pair(ctx: ssl.SSLContext, cert: Path, key: Path | None = None) -> None:
    """Present ``cert``/``key``; `TlsFileError` naming the file at fault if they do not load."""
    try:
        ctx.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError included
        path, problem = _pair_problem(cert, key, exc)
        raise TlsFileError(path, problem) from None


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


def _unreadable(path: Path) -> str | None:
    try:
        path.read_bytes()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return None


def _bundle_problem(ca: Path, exc: BaseException) -> str:
    problem = _unreadable(ca)
    if problem is not None:
        return problem
    try:
        x509.load_pem_x509_certificates(ca.read_bytes())
    except ValueError:
        return "not a PEM certificate bundle (empty or garbled)"
    return f"does not load as a CA bundle: {exc}"


def _pair_problem(cert: Path, key: Path | None, exc: BaseException) -> tuple[Path, str]:
    """Which of the two files is at fault, and how, in words: OpenSSL says ``PEM lib`` for most."""
    key_path = key or cert
    for path in (cert, key_path):
        problem = _unreadable(path)
        if problem is not None:
            return path, problem
    cert_pem, key_pem = cert.read_bytes(), key_path.read_bytes()
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return cert, "not a PEM certificate (empty or garbled)"
    try:
        load_pem_private_key(key_pem, password=None)
    except TypeError:
        return key_path, "the private key is encrypted (a passphrase is not supported)"
    except (ValueError, UnsupportedAlgorithm):
        return key_path, "not a PEM private key (empty or garbled)"
    if not key_matches_cert(cert_pem, key_pem):
        return key_path, f"does not match the certificate {cert}"
    return cert, f"does not load: {exc}"
