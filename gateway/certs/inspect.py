"""Read certificates and judge them, for the expiry watcher and for rotation checks.

Nothing here raises on a bad file: a watcher that crashes on one garbled certificate stops
reporting on all the others, so problems become an ``INVALID`` status with a reason instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

_SECONDS_PER_DAY = 86_400


class CertStatus(StrEnum):
    """How urgent a certificate is; the string values are stable for metrics and logs."""

    OK = "ok"
    WARN = "warn"
    CRITICAL = "critical"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    INVALID = "invalid"


@dataclass(frozen=True)
class CertInfo:
    """What the watcher needs to know about one certificate (the leaf, if the PEM is a chain).

    For an ``INVALID`` certificate the dates are ``None`` and ``days_left`` is ``-inf``, so any
    "fewer than N days left" check treats it as unusable rather than healthy.
    """

    path: str | None
    subject: str
    sans: tuple[str, ...]
    issuer: str
    serial: str
    not_before: datetime | None
    not_after: datetime | None
    days_left: float
    status: CertStatus
    error: str | None = None


def inspect_pem(
    data: bytes,
    *,
    now: datetime,
    warn_days: float = 30,
    critical_days: float = 7,
    path: str | None = None,
) -> CertInfo:
    """Describe the first certificate in ``data`` and rate it against ``now``.

    ``now`` is a parameter (not read from the clock) so callers and tests decide the instant.
    A naive ``now`` is a caller bug and raises ``ValueError``; bad certificate data never raises.
    """
    _require_aware(now)
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except ValueError as exc:
        return _invalid(path, f"not a PEM certificate: {exc}")
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    days_left = (not_after - now).total_seconds() / _SECONDS_PER_DAY
    return CertInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        sans=_sans(cert),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        not_before=not_before,
        not_after=not_after,
        days_left=days_left,
        status=_status(now, not_before, not_after, days_left, warn_days, critical_days),
    )


def inspect_file(
    path: str | Path,
    *,
    now: datetime,
    warn_days: float = 30,
    critical_days: float = 7,
) -> CertInfo:
    """Like :func:`inspect_pem`, reading ``path``; a missing or unreadable file is ``INVALID``."""
    _require_aware(now)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return _invalid(str(path), f"cannot read: {exc}")
    return inspect_pem(
        data, now=now, warn_days=warn_days, critical_days=critical_days, path=str(path)
    )


def key_matches_cert(cert_pem: bytes, key_pem: bytes) -> bool:
    """True if the private key belongs to the certificate (leaf); garbage on either side is False.

    Checked before swapping a pair in: a mismatched pair makes every TLS handshake fail.
    """
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return _spki(key.public_key()) == _spki(cert.public_key())


def verify_chain(cert_pem: bytes, ca_pem: bytes) -> bool:
    """True if a CA certificate in ``ca_pem`` directly issued the leaf in ``cert_pem``.

    Checks the issuer name, the signature against the CA's public key, and that the issuer is
    marked as a CA. It deliberately ignores validity dates (that is :func:`inspect_pem`'s job)
    and does not walk intermediates: our dev CA and the provider bundles issue leaves directly.
    """
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return False
    return any(_is_ca(ca) and _directly_issued(leaf, ca) for ca in cas)


def _status(
    now: datetime,
    not_before: datetime,
    not_after: datetime,
    days_left: float,
    warn_days: float,
    critical_days: float,
) -> CertStatus:
    if now < not_before:
        return CertStatus.NOT_YET_VALID
    if now >= not_after:
        return CertStatus.EXPIRED
    if days_left < critical_days:
        return CertStatus.CRITICAL
    if days_left < warn_days:
        return CertStatus.WARN
    return CertStatus.OK


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS names then IP addresses, as plain strings comparable with a hostname."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = names.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _directly_issued(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _invalid(path: str | None, error: str) -> CertInfo:
    return CertInfo(
        path=path,
        subject="",
        sans=(),
        issuer="",
        serial="",
        not_before=None,
        not_after=None,
        days_left=-math.inf,
        status=CertStatus.INVALID,
        error=error,
    )


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (use datetime.now(UTC))")
