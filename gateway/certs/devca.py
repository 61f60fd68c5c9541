"""A throwaway certificate authority for development, demos and tests.

It issues every certificate the gateway needs locally (its server certificate, one mTLS client
certificate per provider, and the provider emulators' server certificates), so TLS and mTLS
run for real on a laptop instead of being switched off in dev. Keys are EC P-256 and stored
unencrypted: this is for dev only, never for production material.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.certs.inspect import CertStatus, inspect_pem, key_matches_cert, verify_chain

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Usage = Literal["server", "client"]

LOCAL_SANS: tuple[str, ...] = ("localhost", "127.0.0.1")
CA_COMMON_NAME = "payment-gateway dev CA"
GATEWAY_SERVER_CN = "gateway"
CA_LIFETIME = timedelta(days=3650)
LEAF_LIFETIME = timedelta(days=365)
RENEW_WITHIN_DAYS = 30
# Backdate every certificate a little so a peer whose clock runs slightly slow accepts it.
CLOCK_SKEW = timedelta(minutes=5)

_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
CERT_MODE = 0o644
KEY_MODE = 0o600


@dataclass(frozen=True)
class DevCertLayout:
    """Where each dev certificate lives under ``root``; the only place these paths are spelled."""

    root: Path

    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    def server_cert(self) -> Path:
        return self.root / "gateway" / "server.pem"

    def server_key(self) -> Path:
        return self.root / "gateway" / "server.key"

    def client_cert(self, name: str) -> Path:
        """The client certificate the gateway presents to provider ``name``."""
        return self._provider_dir(name) / "client.pem"

    def client_key(self, name: str) -> Path:
        return self._provider_dir(name) / "client.key"

    def provider_ca(self, name: str) -> Path:
        """The CA bundle that verifies provider ``name``'s server certificate."""
        return self._provider_dir(name) / "ca.pem"

    def emulator_cert(self, name: str) -> Path:
        """The server certificate of the local emulator standing in for provider ``name``."""
        return self._emulator_dir(name) / "server.pem"

    def emulator_key(self, name: str) -> Path:
        return self._emulator_dir(name) / "server.key"

    def _provider_dir(self, name: str) -> Path:
        return self.root / "providers" / _safe_name(name)

    def _emulator_dir(self, name: str) -> Path:
        return self.root / "emulators" / _safe_name(name)


@dataclass(frozen=True)
class _LeafSpec:
    common_name: str
    sans: tuple[str, ...]
    usage: Usage


def create_ca(common_name: str, not_after: datetime) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA that may only issue leaves (path length 0), valid from now."""
    key = _new_key()
    name = _name(common_name)
    builder = (
        _base_builder(name, key, datetime.now(UTC) - CLOCK_SKEW, not_after)
        .issuer_name(name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
    )
    return builder.sign(key, hashes.SHA256()), key


def issue_certificate(
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    sans: Sequence[str],
    not_before: datetime,
    not_after: datetime,
    usage: Usage,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """Sign a leaf for ``usage``; entries of ``sans`` that parse as IP addresses become IP SANs.

    Pass ``key`` to renew a certificate for an existing key; otherwise a new key is made.
    """
    if key is None:
        key = _new_key()
    builder = (
        _base_builder(_name(common_name), key, not_before, not_after)
        .issuer_name(ca_cert.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([_EKU[usage]]), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(_san(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_pair(cert: x509.Certificate, key: PrivateKey, cert_path: Path, key_path: Path) -> None:
    """Write PEM files, each atomically, so a reader never sees a half-written file.

    The key is written first (mode 0600): if we stop in between, the old certificate is left
    next to a key it does not match, which :func:`generate_dev_certs` detects and repairs.
    """
    write_pem_pair(_cert_pem(cert), _key_pem(key), cert_path, key_path)


def write_pem_pair(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> None:
    """`write_pair` for material already in PEM form (key first, each file atomically)."""
    atomic_write(key_path, key_pem, KEY_MODE)
    atomic_write(cert_path, cert_pem, CERT_MODE)


def generate_dev_certs(
    root: Path, providers: Sequence[str], *, force: bool = False
) -> DevCertLayout:
    """Make sure every dev certificate under ``root`` exists and is usable; return the layout.

    Idempotent so it can run at every dev start-up: a certificate is only (re)issued when it is
    missing, garbled, not matching its key, not issued by the current CA, not for the expected
    names, or expiring within 30 days; ``force`` reissues everything, CA included. A new CA
    therefore reissues every leaf, since none of them verifies against it any more.
    """
    layout = DevCertLayout(Path(root))
    for name in providers:
        _safe_name(name)  # refuse bad names before writing anything
    run = _ensure_ca(layout, datetime.now(UTC), force)
    server = _LeafSpec(GATEWAY_SERVER_CN, LOCAL_SANS, "server")
    run.ensure_leaf(layout.server_cert(), layout.server_key(), server)
    for name in providers:
        client = _LeafSpec(f"gateway-client-{name}", (), "client")
        emulator = _LeafSpec(f"emulator-{name}", LOCAL_SANS, "server")
        run.ensure_leaf(layout.client_cert(name), layout.client_key(name), client)
        run.ensure_ca_copy(layout.provider_ca(name))
        run.ensure_leaf(layout.emulator_cert(name), layout.emulator_key(name), emulator)
    return layout


def issue_dev_pair(
    layout: DevCertLayout,
    *,
    usage: Usage,
    common_name: str,
    days_valid: float,
    not_before_days: float = 0,
    sans: Sequence[str] | None = None,
) -> tuple[bytes, bytes]:
    """A PEM (cert, key) signed by the dev CA that expires ``days_valid`` days from now.

    Lets tests and demos stage any expiry situation with real certificates: negative
    ``days_valid`` gives one that has already expired, positive ``not_before_days`` one that is
    not valid yet (its start is kept before its end, so an expired one was briefly valid).
    ``sans`` defaults to localhost/127.0.0.1 for servers and none for clients.
    """
    ca_cert, ca_key = _load_pair(layout.ca_cert(), layout.ca_key())
    now = datetime.now(UTC)
    not_after = now + timedelta(days=days_valid)
    not_before = min(now + timedelta(days=not_before_days), not_after) - CLOCK_SKEW
    if sans is None:
        sans = LOCAL_SANS if usage == "server" else ()
    cert, key = issue_certificate(
        ca_cert=ca_cert,
        ca_key=ca_key,
        common_name=common_name,
        sans=sans,
        not_before=not_before,
        not_after=not_after,
        usage=usage,
    )
    return _cert_pem(cert), _key_pem(key)


@dataclass(frozen=True)
class _Run:
    """One pass of :func:`generate_dev_certs`: the CA to sign with, the instant, and ``force``."""

    ca_cert: x509.Certificate
    ca_key: PrivateKey
    now: datetime
    force: bool

    @property
    def ca_pem(self) -> bytes:
        return _cert_pem(self.ca_cert)

    def ensure_leaf(self, cert_path: Path, key_path: Path, spec: _LeafSpec) -> None:
        if not self.force and self._leaf_is_fresh(cert_path, key_path, spec):
            return
        cert, key = issue_certificate(
            ca_cert=self.ca_cert,
            ca_key=self.ca_key,
            common_name=spec.common_name,
            sans=spec.sans,
            not_before=self.now - CLOCK_SKEW,
            not_after=self.now + LEAF_LIFETIME,
            usage=spec.usage,
        )
        write_pair(cert, key, cert_path, key_path)

    def ensure_ca_copy(self, path: Path) -> None:
        if self.force or _read(path) != self.ca_pem:
            atomic_write(path, self.ca_pem, CERT_MODE)

    def _leaf_is_fresh(self, cert_path: Path, key_path: Path, spec: _LeafSpec) -> bool:
        cert_pem, key_pem = _read(cert_path), _read(key_path)
        if cert_pem is None or key_pem is None:
            return False
        info = inspect_pem(cert_pem, now=self.now, warn_days=RENEW_WITHIN_DAYS)
        return (
            info.status is CertStatus.OK
            and info.subject == _name(spec.common_name).rfc4514_string()
            and set(info.sans) == set(spec.sans)
            and key_matches_cert(cert_pem, key_pem)
            and verify_chain(cert_pem, self.ca_pem)
        )


def _ensure_ca(layout: DevCertLayout, now: datetime, force: bool) -> _Run:
    cert_path, key_path = layout.ca_cert(), layout.ca_key()
    if not force and _ca_is_fresh(cert_path, key_path, now):
        cert, key = _load_pair(cert_path, key_path)
    else:
        cert, key = create_ca(CA_COMMON_NAME, now + CA_LIFETIME)
        write_pair(cert, key, cert_path, key_path)
    return _Run(cert, key, now, force)


def _ca_is_fresh(cert_path: Path, key_path: Path, now: datetime) -> bool:
    cert_pem, key_pem = _read(cert_path), _read(key_path)
    if cert_pem is None or key_pem is None:
        return False
    return (
        inspect_pem(cert_pem, now=now, warn_days=RENEW_WITHIN_DAYS).status is CertStatus.OK
        and key_matches_cert(cert_pem, key_pem)
        and verify_chain(cert_pem, cert_pem)
    )


def _base_builder(
    subject: x509.Name, key: PrivateKey, not_before: datetime, not_after: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Copy the CA's own SubjectKeyIdentifier (RFC 5280 requires CAs to carry one) rather than
    recomputing it, so chain building matches even a CA whose tool derives identifiers otherwise.
    """
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _san(sans: Sequence[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([_general_name(value) for value in sans])


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _ca_key_usage() -> x509.KeyUsage:
    return _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True)


def _leaf_key_usage() -> x509.KeyUsage:
    return _key_usage(digital_signature=True, key_cert_sign=False, crl_sign=False)


def _key_usage(*, digital_signature: bool, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, PrivateKey):
        raise TypeError(f"{key_path}: expected an EC or RSA private key")
    return cert, key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write to a temp file in the same directory, then rename over ``path``.

    ``os.replace`` is atomic on one filesystem, so readers see the old file or the new one;
    the temp file is created 0600 and only then given ``mode``, so a key is never world-readable.
    The file and then its directory are fsynced, so the rename survives a power cut too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the renames and removals in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_name(name: str) -> str:
    """Provider names become directory names; refuse anything that could escape ``root``."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"invalid provider name: {name!r}")
    return name
