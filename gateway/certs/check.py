"""Every certificate the gateway depends on, rated against expiry thresholds.

`collect` lists, for each provider, the client certificate we present and the CA bundle we trust
(files), the gateway's own server certificate, and each provider endpoint's server certificate
as it is served right now (a live TLS handshake). The CLI (`gateway certs check`) prints it and
the watcher turns it into metrics and warnings. Nothing here raises on a bad certificate: a
problem is a report with a status and a reason, so one broken file never hides the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import ssl
from collections.abc import Container, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.certs.inspect import CertInfo, CertStatus, inspect_pem, key_matches_cert
from gateway.certs.tls import TlsFileError, client_context
from gateway.config import GatewayConfig, ProviderConfig, ProviderTls

Kind = Literal["client", "ca", "server", "endpoint"]
GATEWAY = "gateway"  # the `provider` of the gateway's own certificates

# Statuses that make a certificate unusable right now (not merely close to expiry).
UNUSABLE = frozenset({CertStatus.EXPIRED, CertStatus.NOT_YET_VALID, CertStatus.INVALID})


class CertificateProblem(StrEnum):
    """Why a provider's TLS files make it unusable: the router's skip reason and `/readyz`'s."""

    CLIENT_EXPIRED = "client_certificate_expired"
    CLIENT_NOT_YET_VALID = "client_certificate_not_yet_valid"
    CLIENT_INVALID = "client_certificate_invalid"  # unreadable, garbled, or its key does not match
    CA_INVALID = "ca_bundle_invalid"  # the CA bundle did not load: no server can be verified


CLIENT_PROBLEM = {CertStatus.EXPIRED: CertificateProblem.CLIENT_EXPIRED,
                  CertStatus.NOT_YET_VALID: CertificateProblem.CLIENT_NOT_YET_VALID,
                  CertStatus.INVALID: CertificateProblem.CLIENT_INVALID}


@dataclass(frozen=True)
class Thresholds:
    """Days-left thresholds, largest first: under the first a certificate is ``warn``, under the
    last ``critical``; every one of them is a crossing the watcher logs once (default 30/14/7)."""

    days: tuple[float, ...] = (30, 14, 7)

    def __post_init__(self) -> None:
        if not self.days or any(d <= 0 for d in self.days):
            raise ValueError("thresholds must be positive numbers of days")
        if list(self.days) != sorted(set(self.days), reverse=True):
            raise ValueError("thresholds must be distinct and in decreasing order, e.g. 30,14,7")

    @classmethod
    def parse(cls, text: str) -> Thresholds:
        """``"30,14,7"`` -> Thresholds((30, 14, 7)); ValueError with the reason otherwise."""
        try:
            days = tuple(float(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"not a list of numbers: {text!r}") from None
        return cls(days)

    @property
    def warn_days(self) -> float:
        return self.days[0]

    @property
    def critical_days(self) -> float:
        return self.days[-1]

    def crossed(self, days_left: float) -> float | None:
        """The smallest threshold ``days_left`` is under (None: under none of them)."""
        under = [d for d in self.days if days_left < d]
        return under[-1] if under else None

    def rank(self, info: CertInfo | CertReport) -> int:
        """0 for ok, 1.. for each threshold crossed, len+1 when unusable: rises as things worsen."""
        if info.status in UNUSABLE:
            return len(self.days) + 1
        return sum(1 for d in self.days if info.days_left < d)


@dataclass(frozen=True)
class CertReport:
    """One certificate the gateway uses. ``location`` is a file path or ``host:port``.

    ``seen`` is False when no certificate could be read at all (missing file, endpoint that did
    not answer); the status is then ``invalid`` and ``error`` says why.
    """

    provider: str
    kind: Kind
    location: str
    subject: str
    sans: tuple[str, ...]
    issuer: str
    serial: str
    not_before: datetime | None
    not_after: datetime | None
    days_left: float
    status: CertStatus
    error: str | None = None
    seen: bool = True

    @classmethod
    def from_info(cls, provider: str, kind: Kind, location: str, info: CertInfo, *,
                  error: str | None = None, status: CertStatus | None = None) -> CertReport:
        return cls(provider=provider, kind=kind, location=location, subject=info.subject, sans=info.sans,
                   issuer=info.issuer, serial=info.serial, not_before=info.not_before, not_after=info.not_after,
                   days_left=info.days_left, status=status or info.status, error=error or info.error,
                   seen=info.not_after is not None)

    @classmethod
    def unseen(cls, provider: str, kind: Kind, location: str, error: str) -> CertReport:
        return cls(provider=provider, kind=kind, location=location, subject="", sans=(), issuer="", serial="",
                   not_before=None, not_after=None, days_left=-math.inf, status=CertStatus.INVALID,
                   error=error, seen=False)

    @property
    def ok(self) -> bool:
        return self.status is CertStatus.OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dates in ISO 8601, an unknown ``days_left`` as null."""
        doc = dataclasses.asdict(self)
        doc["sans"] = list(self.sans)
        doc["status"] = self.status.value
        doc["not_before"] = self.not_before.isoformat() if self.not_before else None
        doc["not_after"] = self.not_after.isoformat() if self.not_after else None
        doc["days_left"] = round(self.days_left, 3) if math.isfinite(self.days_left) else None
        return doc


def collect_files(config: GatewayConfig, *, now: datetime, thresholds: Thresholds = Thresholds(),
                  skip_pairs: Container[tuple[str, str]] = ()) -> list[CertReport]:
    """The certificate files named by ``config`` (blocking file reads: call it in a thread).

    ``skip_pairs`` holds (provider, kind) pairs the caller reads and reports itself.
    """
    reports: list[CertReport] = []
    for name, provider in config.providers.items():
        tls = provider.tls
        if tls.client_cert is not None and tls.client_key is not None and (name, "client") not in skip_pairs:
            files = PairFiles.read(tls.client_cert, tls.client_key)
            reports.append(rate_pair(name, "client", files, now=now, thresholds=thresholds))
        if tls.ca is not None:
            reports.extend(_bundle_reports(name, tls.ca, now, thresholds))
    server_tls = config.server.tls
    if server_tls is not None:
        if (GATEWAY, "server") not in skip_pairs:
            files = PairFiles.read(server_tls.cert, server_tls.key)
            reports.append(rate_pair(GATEWAY, "server", files, now=now, thresholds=thresholds))
        if server_tls.client_ca is not None:
            reports.extend(_bundle_reports(GATEWAY, server_tls.client_ca, now, thresholds))
    return reports


async def probe_provider_endpoints(config: GatewayConfig, *, now: datetime, thresholds: Thresholds = Thresholds(),
                          timeout_s: float = 3.0) -> list[CertReport]:
    """The server certificate each HTTPS provider presents now, probed concurrently."""
    probes = [probe_endpoint(name, provider, now=now, thresholds=thresholds, timeout_s=timeout_s)
              for name, provider in config.providers.items() if provider.base_url.startswith("https://")]
    return list(await asyncio.gather(*probes))


async def collect(config: GatewayConfig, *, now: datetime, probe_endpoints: bool = True, timeout_s: float = 3.0,
                  thresholds: Thresholds = Thresholds()) -> list[CertReport]:
    """Files (read in a thread) and, unless ``probe_endpoints`` is False, live endpoints."""
    files = await asyncio.to_thread(collect_files, config, now=now, thresholds=thresholds)
    if not probe_endpoints:
        return files
    return files + await probe_provider_endpoints(config, now=now, thresholds=thresholds, timeout_s=timeout_s)


async def probe_endpoint(name: str, provider: ProviderConfig, *, now: datetime,
                         thresholds: Thresholds = Thresholds(), timeout_s: float = 3.0) -> CertReport:
    """Handshake with the provider as the gateway would (its CA bundle, its client certificate)
    and rate the certificate served. If verification fails (expired, wrong CA, wrong name) the
    handshake is repeated without verification only to read the certificate, and the report
    carries the verification error: an expired endpoint is reported as expired, not unreachable.
    """
    url = urlsplit(provider.base_url)
    host, port = url.hostname or "", url.port or 443
    location = f"{host}:{port}"
    try:
        verifying, reading = await asyncio.to_thread(_probe_contexts, provider.tls)
    except (OSError, TlsFileError) as exc:
        return CertReport.unseen(name, "endpoint", location, f"cannot build the TLS context: {exc}")
    verify_error: str | None = None
    try:
        der = await _peer_certificate(host, port, verifying, timeout_s)
    except ssl.SSLCertVerificationError as exc:
        verify_error = exc.verify_message or str(exc)
        try:
            der = await _peer_certificate(host, port, reading, timeout_s)
        except (OSError, TimeoutError) as exc2:
            return CertReport.unseen(name, "endpoint", location, f"does not verify ({verify_error}); "
                                                                 f"unreadable without verification: {exc2}")
    except TimeoutError:
        return CertReport.unseen(name, "endpoint", location, f"no TLS handshake within {timeout_s:g}s")
    except OSError as exc:  # refused, reset, TLS alert (ssl.SSLError is an OSError)
        return CertReport.unseen(name, "endpoint", location, f"unreachable: {exc}")
    if der is None:
        return CertReport.unseen(name, "endpoint", location, "the server presented no certificate")
    pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
    info = inspect_pem(pem, now=now, warn_days=thresholds.warn_days, critical_days=thresholds.critical_days,
                       path=location)
    if verify_error is None:
        return CertReport.from_info(name, "endpoint", location, info)
    # Expired / not yet valid keep that status; any other failure (CA, hostname) makes it invalid.
    status = info.status if info.status in UNUSABLE else CertStatus.INVALID
    return CertReport.from_info(name, "endpoint", location, info, status=status,
                                error=f"does not verify: {verify_error}")


def worst(reports: Iterable[CertReport]) -> CertStatus:
    order = [CertStatus.OK, CertStatus.WARN, CertStatus.CRITICAL, CertStatus.NOT_YET_VALID, CertStatus.EXPIRED,
             CertStatus.INVALID]
    return max((r.status for r in reports), key=order.index, default=CertStatus.OK)


@dataclass(frozen=True)
class PairFiles:
    """A certificate and its key as read from disk; a file that cannot be read is ``None``
    with the reason in ``cert_error``/``key_error``."""

    cert: Path
    key: Path
    cert_pem: bytes | None
    key_pem: bytes | None
    cert_error: str | None = None
    key_error: str | None = None

    @classmethod
    def read(cls, cert: Path, key: Path) -> PairFiles:
        """Blocking: call it in a thread from async code."""
        (cert_pem, cert_error), (key_pem, key_error) = _read(cert), _read(key)
        return cls(cert, key, cert_pem, key_pem, cert_error, key_error)

    @property
    def digest(self) -> bytes:
        """Changes whenever either file's content (or readability) does."""
        parts = [self.cert_pem or b"", self.key_pem or b"", (self.cert_error or "").encode(),
                 (self.key_error or "").encode()]
        return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()


def rate_pair(provider: str, kind: Kind, files: PairFiles, *, now: datetime,
              thresholds: Thresholds = Thresholds()) -> CertReport:
    """The certificate's report; invalid also when its key is unreadable or does not match."""
    location = str(files.cert)
    if files.cert_pem is None:
        return CertReport.unseen(provider, kind, location, f"cannot read: {files.cert_error}")
    report = CertReport.from_info(provider, kind, location, _rate(files.cert_pem, now, thresholds, location))
    if report.status is CertStatus.INVALID:
        return report
    if files.key_pem is None:
        return dataclasses.replace(report, status=CertStatus.INVALID,
                                   error=f"key {files.key}: cannot read: {files.key_error}")
    if not key_matches_cert(files.cert_pem, files.key_pem):
        return dataclasses.replace(report, status=CertStatus.INVALID,
                                   error=f"key {files.key} does not match this certificate (or is not a PEM key)")
    return report


def unusable_reason(report: CertReport) -> str | None:
    """Why a certificate cannot be used at all right now (None: it can, however close to expiry)."""
    if report.status is CertStatus.EXPIRED:
        return "the certificate has expired"
    if report.status is CertStatus.NOT_YET_VALID:
        return "the certificate is not valid yet"
    if report.status is CertStatus.INVALID:
        return report.error or "invalid"
    return None


def _read(path: Path) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return None, exc.strerror or str(exc)


def _bundle_reports(provider: str, path: Path, now: datetime, thresholds: Thresholds) -> list[CertReport]:
    """One report per CA certificate in the bundle: any of them may be the one that expires."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [CertReport.unseen(provider, "ca", str(path), f"cannot read: {exc.strerror}")]
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        return [CertReport.unseen(provider, "ca", str(path), f"not a PEM certificate bundle: {exc}")]
    reports = []
    for index, cert in enumerate(certs):
        location = str(path) if len(certs) == 1 else f"{path}#{index}"
        info = _rate(cert.public_bytes(Encoding.PEM), now, thresholds, location)
        reports.append(CertReport.from_info(provider, "ca", location, info))
    return reports


def _rate(pem: bytes, now: datetime, thresholds: Thresholds, location: str) -> CertInfo:
    return inspect_pem(pem, now=now, warn_days=thresholds.warn_days, critical_days=thresholds.critical_days,
                       path=location)


def _probe_contexts(tls: ProviderTls) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(verifying, read-only) contexts, both presenting the client certificate if it loads, so
    a server that insists on one still completes the handshake (TLS 1.2 asks before we verify)."""
    verifying = client_context(tls.ca)
    reading = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    reading.check_hostname = False
    reading.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        for ctx in (verifying, reading):
            with contextlib.suppress(OSError, ssl.SSLError):
                ctx.load_cert_chain(tls.client_cert, tls.client_key)
    return verifying, reading


async def _peer_certificate(host: str, port: int, ctx: ssl.SSLContext, timeout_s: float) -> bytes | None:
    async with asyncio.timeout(timeout_s):
        _reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.close()
        # The server may answer our close with an alert (e.g. it disliked our client certificate).
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await writer.wait_closed()
