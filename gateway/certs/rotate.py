"""Rotate a certificate/key pair on disk: validate first, swap atomically, keep the old pair.

The running gateway never reads these files on a request path: its certificate watcher sees the
new content, checks it again and loads it into the live TLS context (`reload_cert_chain`), so new
connections present the new pair and connections in flight keep theirs. This module only makes
sure that what lands on disk is right, and that it can be undone:

* nothing is written unless every check passes; a refusal lists every reason;
* the previous pair is kept next to the live one as ``<file>.prev`` for `rollback`, unless its
  key does not match (then the ``.prev`` already there is kept instead: never a broken pair);
* the swap is crash-safe (`gateway.certs.swap`): written down before any file changes, each
  file replaced atomically, and completed by the next `rotate`, `rollback` or watcher pass if
  the process dies in between. Rotating to the pair already live changes nothing, so running
  an interrupted `rotate` again is safe.

Which CA the chain must verify against: ``--ca`` when given (the CA that issued the new
certificate, e.g. the one the provider accepts client certificates from). Without it, the bundle
the configuration already trusts on that side: ``providers.<name>.tls.ca`` for a client
certificate (in dev that is the dev CA, which issues the client certificates too) and
``server.tls.client_ca`` for the gateway's server certificate. With neither, rotation is refused.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.certs.devca import Usage
from gateway.certs.inspect import CertInfo, CertStatus, inspect_pem, key_matches_cert, verify_chain
from gateway.certs.swap import Pair, PairLocation, SwapError, locked, recover, swap
from gateway.config import GatewayConfig

_WILDCARD_BINDS = {"0.0.0.0", "::", ""}
_EKU = {"client": (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        "server": (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")}


class RotationRefused(Exception):
    """Nothing on disk was changed, beyond completing an interrupted swap (``recovered`` names
    its operation); ``reasons`` says every check that failed."""

    def __init__(self, target: str, reasons: list[str], recovered: str | None = None) -> None:
        super().__init__(f"{target}: " + "; ".join(reasons))
        self.target = target
        self.reasons = reasons
        self.recovered = recovered


@dataclass(frozen=True)
class PairTarget:
    """Where one live pair lives and what a replacement must satisfy."""

    label: str  # "provider stripe" / "gateway server certificate", for messages
    usage: Usage
    cert: Path
    key: Path
    trusted_ca: Path | None  # the chain is checked against this unless --ca is given
    hostnames: tuple[str, ...] = ()  # server: names the SAN must cover

    @property
    def location(self) -> PairLocation:
        return PairLocation(self.cert, self.key)

    @property
    def prev_cert(self) -> Path:
        return self.location.prev_cert

    @property
    def prev_key(self) -> Path:
        return self.location.prev_key


@dataclass(frozen=True)
class RotationResult:
    target: PairTarget
    installed: CertInfo  # the pair now live
    previous_serial: str | None  # None: there was no pair before
    previous_kept: bool = True  # False: the pair replaced did not match its key; `.prev` left as it was
    unchanged: bool = False  # the pair was already live: nothing was written
    recovered: str | None = None  # an interrupted swap completed first (its operation)


def provider_target(config: GatewayConfig, name: str) -> PairTarget:
    provider = config.providers.get(name)
    if provider is None:
        raise RotationRefused(f"provider {name}", [f"no provider {name!r} in the configuration "
                                                  f"(known: {', '.join(sorted(config.providers))})"])
    tls = provider.tls
    if tls.client_cert is None or tls.client_key is None:
        raise RotationRefused(f"provider {name}", [f"providers.{name}.tls has no client_cert/client_key to rotate"])
    return PairTarget(f"provider {name} client certificate", "client", tls.client_cert, tls.client_key, tls.ca)


def server_target(config: GatewayConfig, hostnames: tuple[str, ...] = ()) -> PairTarget:
    """The gateway's own server pair. The SAN must cover ``hostnames`` (default: server.host;
    a wildcard bind such as 0.0.0.0 says nothing about the name clients use, so it needs them)."""
    tls = config.server.tls
    label = "gateway server certificate"
    if tls is None:
        raise RotationRefused(label, ["server.tls is not configured"])
    names = hostnames or (config.server.host,)
    if any(n in _WILDCARD_BINDS for n in names):
        raise RotationRefused(label, [f"server.host is {config.server.host!r}, a wildcard bind: pass --hostname "
                                      "with each name clients connect to"])
    return PairTarget(label, "server", tls.cert, tls.key, tls.client_ca, tuple(names))


def validate_pair(target: PairTarget, cert_pem: bytes, key_pem: bytes, *, ca_pem: bytes | None, ca_source: str,
                  now: datetime, min_days: float) -> tuple[CertInfo, list[str]]:
    """Every reason the pair may not replace ``target`` (empty: it may), and what it is."""
    info = inspect_pem(cert_pem, now=now)
    if info.status is CertStatus.INVALID:
        return info, [f"the certificate file is not a PEM certificate ({info.error})"]
    reasons: list[str] = []
    if not key_matches_cert(cert_pem, key_pem):
        reasons.append("the private key does not match the certificate (or is not an unencrypted PEM key)")
    reasons += _validity_reasons(info, "the certificate")
    if info.status not in (CertStatus.EXPIRED, CertStatus.NOT_YET_VALID) and info.days_left < min_days:
        reasons.append(f"the certificate expires on {info.not_after:%Y-%m-%d %H:%M} UTC, in {info.days_left:.1f} "
                       f"days: fewer than the required {min_days:g} (--min-days)")
    if ca_pem is None:
        reasons.append(f"no CA to verify the chain against: {target.label} has no CA bundle in the configuration, "
                       "pass --ca")
    else:
        chain_problem = _chain_problem(cert_pem, ca_pem, now)
        if chain_problem:
            reasons.append(f"{chain_problem} (CA: {ca_source})")
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    eku_problem = _eku_problem(leaf, target.usage)
    if eku_problem:
        reasons.append(eku_problem)
    for host in target.hostnames:
        if not san_covers(info.sans, host):
            sans = ", ".join(info.sans) or "none"
            reasons.append(f"the certificate's names (SAN: {sans}) do not cover {host!r}")
    return info, reasons


def rotate(target: PairTarget, cert_pem: bytes, key_pem: bytes, *, now: datetime, min_days: float = 7,
           ca_pem: bytes | None = None, ca_source: str | None = None) -> RotationResult:
    """Validate, then install the pair with the current one kept as ``.prev``.

    ``ca_pem`` is what the chain must verify against; None means the target's configured CA.
    Raises `RotationRefused` (nothing changed) when any check fails.
    """
    if ca_pem is None and target.trusted_ca is not None:
        ca_source = str(target.trusted_ca)
        try:
            ca_pem = target.trusted_ca.read_bytes()
        except OSError as exc:
            raise RotationRefused(target.label, [f"cannot read the CA bundle {target.trusted_ca}: {exc.strerror}"]) \
                from None
    info, reasons = validate_pair(target, cert_pem, key_pem, ca_pem=ca_pem, ca_source=ca_source or "--ca",
                                  now=now, min_days=min_days)
    if reasons:
        raise RotationRefused(target.label, reasons)
    return _install(target, Pair(cert_pem, key_pem), info, operation="rotate")


def rollback(target: PairTarget, *, now: datetime) -> RotationResult:
    """Put the ``.prev`` pair back; the pair it replaces becomes ``.prev`` (so rollback undoes itself).

    A rollback that a crash interrupted is completed and counts as this one: running an
    interrupted `rollback` again rolls back once, not twice.

    Refused when there is no previous pair, or it is not usable now (key mismatch, expired, not
    yet valid): rolling back to a certificate the provider would reject helps no one. The chain
    and --min-days are not checked again: the pair was in service before.
    """
    location = target.location
    with locked(location):
        recovered = _recover(target)
        if recovered == "rollback":  # the interrupted one was this very request: once is enough
            live = location.live()
            assert live is not None  # recover just wrote it
            info = inspect_pem(live.cert_pem, now=now)
            return RotationResult(target, info, info.serial, unchanged=True, recovered=recovered)
        previous = location.previous()
        if previous is None:
            raise RotationRefused(target.label, [f"no previous pair to roll back to ({target.prev_cert} and "
                                                 f"{target.prev_key} must both exist)"], recovered)
        info = inspect_pem(previous.cert_pem, now=now)
        if info.status is CertStatus.INVALID:
            raise RotationRefused(target.label, [f"{target.prev_cert} is not a PEM certificate ({info.error})"],
                                  recovered)
        reasons = _validity_reasons(info, "the previous certificate")
        if not previous.matches:
            reasons.append(f"{target.prev_key} does not match {target.prev_cert}")
        if reasons:
            raise RotationRefused(target.label, reasons, recovered)
        return _swap_in(target, previous, info, "rollback", recovered)


def install_pair(target: PairTarget, cert_pem: bytes, key_pem: bytes, *, now: datetime) -> RotationResult:
    """Install without validation, still keeping ``.prev`` (dev only: `certs issue-dev` uses it to
    stage expiring or expired certificates on purpose)."""
    return _install(target, Pair(cert_pem, key_pem), inspect_pem(cert_pem, now=now), operation="install")


def san_covers(sans: tuple[str, ...], host: str) -> bool:
    """Whether a certificate with ``sans`` is valid for ``host`` (RFC 6125: a wildcard stands for
    exactly one left-most label; IP addresses match IP SANs only)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for san in sans:
        if ip is not None:
            try:
                if ipaddress.ip_address(san) == ip:
                    return True
            except ValueError:
                continue
        elif _dns_match(san.lower(), host.lower().rstrip(".")):
            return True
    return False


def _dns_match(pattern: str, host: str) -> bool:
    if not pattern.startswith("*."):
        return pattern == host
    first, _, rest = host.partition(".")
    return bool(first) and rest == pattern[2:]


def _chain_problem(cert_pem: bytes, ca_pem: bytes, now: datetime) -> str | None:
    """Each certificate in the file must be issued by the next one (leaf, then intermediates),
    the last by a CA in ``ca_pem``, and every intermediate must be valid now."""
    chain = [c.public_bytes(Encoding.PEM) for c in x509.load_pem_x509_certificates(cert_pem)]
    for index, (child, parent) in enumerate(zip(chain, chain[1:], strict=False)):
        if not verify_chain(child, parent):
            return f"certificate #{index + 1} in the file is not issued by certificate #{index + 2}"
        if inspect_pem(parent, now=now).status in (CertStatus.EXPIRED, CertStatus.NOT_YET_VALID):
            return f"intermediate certificate #{index + 2} in the file is not valid now"
    if not verify_chain(chain[-1], ca_pem):
        what = "the certificate is" if len(chain) == 1 else "the last certificate in the file is"
        return f"{what} not issued by the CA"
    return None


def _eku_problem(cert: x509.Certificate, usage: Usage) -> str | None:
    """The certificate must allow ``usage``; without an EKU extension it allows every purpose."""
    oid, name = _EKU[usage]
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if oid in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        return None
    names = {oid: name for oid, name in _EKU.values()}
    present = ", ".join(names.get(o, o.dotted_string) for o in eku) or "none"
    return f"the certificate's extended key usage ({present}) does not include {name}, needed for a {usage} certificate"


def _install(target: PairTarget, new: Pair, info: CertInfo, *, operation: str) -> RotationResult:
    with locked(target.location):
        recovered = _recover(target)
        if target.location.live() == new:  # e.g. an interrupted rotate run again
            return RotationResult(target, info, info.serial, unchanged=True, recovered=recovered)
        return _swap_in(target, new, info, operation, recovered)


def _swap_in(target: PairTarget, new: Pair, info: CertInfo, operation: str, recovered: str | None) -> RotationResult:
    """Under the lock: ``new`` goes live, the live pair becomes ``.prev`` if its key matches."""
    current = target.location.live()
    keep = current if current is not None and current.matches else None
    swap(target.location, new, keep, operation=operation)
    return RotationResult(target, info, _serial(current.cert_pem) if current is not None else None,
                          previous_kept=keep is not None or current is None, recovered=recovered)


def _recover(target: PairTarget) -> str | None:
    try:
        return recover(target.location)
    except SwapError as exc:
        raise RotationRefused(target.label, [str(exc)]) from None


def _validity_reasons(info: CertInfo, what: str) -> list[str]:
    if info.status is CertStatus.EXPIRED and info.not_after is not None:
        return [f"{what} expired on {info.not_after:%Y-%m-%d %H:%M} UTC"]
    if info.status is CertStatus.NOT_YET_VALID and info.not_before is not None:
        return [f"{what} is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC"]
    return []


def _serial(cert_pem: bytes) -> str | None:
    try:
        return f"{x509.load_pem_x509_certificates(cert_pem)[0].serial_number:x}"
    except ValueError:
        return None
