"""Certificates: dev CA layout, TLS/mTLS with hot reload, and inspection, all with real certs."""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.certs.devca import (
    DevCertLayout,
    generate_dev_certs,
    issue_certificate,
    issue_dev_pair,
    write_pair,
)
from gateway.certs.inspect import (
    CertStatus,
    inspect_file,
    inspect_pem,
    key_matches_cert,
    verify_chain,
)
from gateway.certs.tls import client_context, reload_cert_chain, server_context

PROVIDERS = ("stripe", "adyen")


@pytest.fixture
def layout(tmp_path: Path) -> DevCertLayout:
    return generate_dev_certs(tmp_path / "certs", PROVIDERS)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _serial(path: Path) -> int:
    return _load(path).serial_number


def _leaf_pairs(layout: DevCertLayout) -> list[tuple[Path, Path]]:
    pairs = [(layout.server_cert(), layout.server_key())]
    for name in PROVIDERS:
        pairs.append((layout.client_cert(name), layout.client_key(name)))
        pairs.append((layout.emulator_cert(name), layout.emulator_key(name)))
    return pairs


def _snapshot(root: Path) -> dict[Path, tuple[int, int, bytes]]:
    """Inode, mtime and content of every file: an atomic rewrite always changes the inode."""
    return {
        path: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _write(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


# --- generate_dev_certs -------------------------------------------------------------------


def _assert_consistent(layout: DevCertLayout) -> None:
    """Every leaf matches its key and chains to the current CA; bundles are copies of it."""
    ca_pem = layout.ca_cert().read_bytes()
    for cert_path, key_path in _leaf_pairs(layout):
        cert_pem = cert_path.read_bytes()
        assert key_matches_cert(cert_pem, key_path.read_bytes()), cert_path
        assert verify_chain(cert_pem, ca_pem), cert_path
    for name in PROVIDERS:
        assert layout.provider_ca(name).read_bytes() == ca_pem


def test_every_leaf_matches_its_key_and_chains_to_the_dev_ca(layout: DevCertLayout) -> None:
    _assert_consistent(layout)


def test_certificates_carry_names_and_usages(layout: DevCertLayout) -> None:
    now = datetime.now(UTC)
    server = inspect_file(layout.server_cert(), now=now)
    assert set(server.sans) == {"localhost", "127.0.0.1"}
    assert 364 < server.days_left <= 365
    assert inspect_file(layout.client_cert("stripe"), now=now).subject == (
        "CN=gateway-client-stripe"
    )
    assert inspect_file(layout.ca_cert(), now=now).days_left > 3649
    usages = {
        layout.server_cert(): ExtendedKeyUsageOID.SERVER_AUTH,
        layout.emulator_cert("adyen"): ExtendedKeyUsageOID.SERVER_AUTH,
        layout.client_cert("adyen"): ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    for path, usage in usages.items():
        extensions = _load(path).extensions
        assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_keys_are_owner_only_and_certs_world_readable(layout: DevCertLayout) -> None:
    keys = [layout.ca_key(), *(key for _, key in _leaf_pairs(layout))]
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600, key
    for cert, _ in _leaf_pairs(layout):
        assert cert.stat().st_mode & 0o777 == 0o644, cert


def test_second_run_rewrites_nothing(layout: DevCertLayout) -> None:
    before = _snapshot(layout.root)
    generate_dev_certs(layout.root, PROVIDERS)
    assert _snapshot(layout.root) == before


def test_new_provider_only_adds_its_own_files(layout: DevCertLayout) -> None:
    before = _snapshot(layout.root)
    generate_dev_certs(layout.root, (*PROVIDERS, "checkout"))
    after = _snapshot(layout.root)
    added = set(after) - set(before)
    assert {after[path] for path in before} == set(before.values())
    assert added == {
        layout.client_cert("checkout"),
        layout.client_key("checkout"),
        layout.provider_ca("checkout"),
        layout.emulator_cert("checkout"),
        layout.emulator_key("checkout"),
    }


def test_force_reissues_everything(layout: DevCertLayout) -> None:
    certs = [layout.ca_cert(), *(cert for cert, _ in _leaf_pairs(layout))]
    serials = {path: _serial(path) for path in certs}
    generate_dev_certs(layout.root, PROVIDERS, force=True)
    assert all(_serial(path) != serials[path] for path in certs)
    _assert_consistent(layout)


def test_expiring_leaf_is_renewed_and_the_rest_kept(layout: DevCertLayout) -> None:
    cert_pem, key_pem = issue_dev_pair(
        layout, usage="server", common_name="gateway", days_valid=10
    )
    layout.server_cert().write_bytes(cert_pem)
    layout.server_key().write_bytes(key_pem)
    before = _snapshot(layout.root)
    generate_dev_certs(layout.root, PROVIDERS)
    after = _snapshot(layout.root)
    changed = {path for path in before if after[path] != before[path]}
    assert changed == {layout.server_cert(), layout.server_key()}
    assert inspect_file(layout.server_cert(), now=datetime.now(UTC)).days_left > 364


def test_broken_files_are_repaired(layout: DevCertLayout) -> None:
    ca_serial = _serial(layout.ca_cert())
    layout.client_cert("stripe").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    layout.emulator_key("adyen").unlink()
    layout.server_key().write_bytes(layout.client_key("adyen").read_bytes())  # wrong key
    generate_dev_certs(layout.root, PROVIDERS)
    assert _serial(layout.ca_cert()) == ca_serial
    _assert_consistent(layout)


def test_new_ca_reissues_every_leaf(layout: DevCertLayout) -> None:
    serials = {cert: _serial(cert) for cert, _ in _leaf_pairs(layout)}
    layout.ca_key().unlink()
    generate_dev_certs(layout.root, PROVIDERS)
    assert all(_serial(cert) != serial for cert, serial in serials.items())
    _assert_consistent(layout)


@pytest.mark.parametrize("name", ["", "..", "../evil", "a/b"])
def test_provider_names_cannot_escape_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid provider name"):
        generate_dev_certs(tmp_path / "certs", ["stripe", name])
    assert not (tmp_path / "certs").exists()


def test_write_pair_leaves_no_temp_files(layout: DevCertLayout, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    cert, key = issue_certificate(
        ca_cert=_load(layout.ca_cert()),
        ca_key=_key(layout.ca_key()),
        common_name="svc",
        sans=["svc.internal", "10.0.0.1", "::1"],
        not_before=now,
        not_after=now + timedelta(days=1),
        usage="server",
    )
    target = tmp_path / "out"
    write_pair(cert, key, target / "svc.pem", target / "svc.key")
    assert sorted(p.name for p in target.iterdir()) == ["svc.key", "svc.pem"]
    assert inspect_file(target / "svc.pem", now=now).sans == ("svc.internal", "10.0.0.1", "::1")


# --- inspect ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days_valid", "not_before_days", "status"),
    [
        (365, 0, CertStatus.OK),
        (20, 0, CertStatus.WARN),
        (5, 0, CertStatus.CRITICAL),
        (-1, 0, CertStatus.EXPIRED),
        (10, 2, CertStatus.NOT_YET_VALID),
    ],
)
def test_status_follows_time_left(
    layout: DevCertLayout, days_valid: float, not_before_days: float, status: CertStatus
) -> None:
    cert_pem, _ = issue_dev_pair(
        layout,
        usage="client",
        common_name="c",
        days_valid=days_valid,
        not_before_days=not_before_days,
    )
    assert inspect_pem(cert_pem, now=datetime.now(UTC)).status is status


def test_thresholds_are_configurable(layout: DevCertLayout) -> None:
    cert_pem, _ = issue_dev_pair(layout, usage="client", common_name="c", days_valid=20)
    now = datetime.now(UTC)
    assert inspect_pem(cert_pem, now=now, warn_days=14).status is CertStatus.OK
    assert inspect_pem(cert_pem, now=now, critical_days=21).status is CertStatus.CRITICAL


def test_info_describes_the_leaf(layout: DevCertLayout) -> None:
    cert_pem, _ = issue_dev_pair(layout, usage="server", common_name="emu", days_valid=20)
    chain = cert_pem + layout.ca_cert().read_bytes()
    now = datetime.now(UTC)
    info = inspect_pem(chain, now=now, path="x.pem")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert info.subject == "CN=emu"
    assert info.issuer == "CN=payment-gateway dev CA"
    assert info.serial == f"{cert.serial_number:x}"
    assert info.sans == ("localhost", "127.0.0.1")
    assert info.not_after == cert.not_valid_after_utc
    assert info.not_after is not None and info.not_after.tzinfo is UTC
    assert info.days_left == pytest.approx(20, abs=0.01)
    assert (info.path, info.error) == ("x.pem", None)


_TRUNCATED_PEM = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("content", [None, b"", b"not a certificate", _TRUNCATED_PEM])
def test_missing_or_garbled_file_is_invalid_not_an_error(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "cert.pem"
    if content is not None:
        path.write_bytes(content)
    info = inspect_file(path, now=datetime.now(UTC))
    assert info.status is CertStatus.INVALID
    assert info.error
    assert info.path == str(path)
    assert info.days_left == -math.inf


def test_naive_now_is_refused(layout: DevCertLayout) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        inspect_file(layout.server_cert(), now=datetime.now())


def test_key_must_match_cert(layout: DevCertLayout) -> None:
    cert_pem = layout.server_cert().read_bytes()
    assert key_matches_cert(cert_pem, layout.server_key().read_bytes())
    assert not key_matches_cert(cert_pem, layout.client_key("stripe").read_bytes())
    assert not key_matches_cert(cert_pem, b"garbage")
    assert not key_matches_cert(b"garbage", layout.server_key().read_bytes())


def test_chain_needs_the_issuing_ca(layout: DevCertLayout, tmp_path: Path) -> None:
    other = generate_dev_certs(tmp_path / "other", ["stripe"])
    cert_pem = layout.server_cert().read_bytes()
    assert verify_chain(cert_pem, layout.ca_cert().read_bytes())
    assert not verify_chain(cert_pem, other.ca_cert().read_bytes())
    assert verify_chain(cert_pem, other.ca_cert().read_bytes() + layout.ca_cert().read_bytes())
    assert not verify_chain(cert_pem, b"garbage")


def test_a_leaf_cannot_act_as_a_ca(layout: DevCertLayout) -> None:
    """A correct signature is not enough: the issuer must be marked as a CA."""
    now = datetime.now(UTC)
    forged, _ = issue_certificate(
        ca_cert=_load(layout.server_cert()),
        ca_key=_key(layout.server_key()),
        common_name="forged",
        sans=["localhost"],
        not_before=now,
        not_after=now + timedelta(days=1),
        usage="server",
    )
    forged_pem = forged.public_bytes(Encoding.PEM)
    assert not verify_chain(forged_pem, layout.server_cert().read_bytes())


# --- TLS / mTLS ---------------------------------------------------------------------------


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@contextlib.asynccontextmanager
async def _serve(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    """A real aiohttp HTTPS server on a free loopback port; yields the port."""
    app = web.Application()
    app.router.add_get("/", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def _mtls_server(layout: DevCertLayout) -> ssl.SSLContext:
    return server_context(
        layout.server_cert(),
        layout.server_key(),
        client_ca=layout.ca_cert(),
        require_client_cert=True,
    )


def _gateway_client(layout: DevCertLayout, name: str = "stripe") -> ssl.SSLContext:
    return client_context(layout.ca_cert(), layout.client_cert(name), layout.client_key(name))


async def _get(port: int, ctx: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        async with session.get(f"https://127.0.0.1:{port}/") as resp:
            return resp.status


def _peer_serial(writer: asyncio.StreamWriter) -> int:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def _raw_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One HTTP/1.1 request on an already open connection; returns the status code."""
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    return int((await reader.readline()).split()[1])


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_mtls_accepts_a_client_cert_from_the_ca(layout: DevCertLayout) -> None:
    async with _serve(_mtls_server(layout)) as port:
        assert await _get(port, _gateway_client(layout)) == 200


async def test_mtls_rejects_a_client_without_cert(layout: DevCertLayout) -> None:
    async with _serve(_mtls_server(layout)) as port:
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(port, client_context(layout.ca_cert()))


async def test_mtls_rejects_a_client_cert_from_another_ca(
    layout: DevCertLayout, tmp_path: Path
) -> None:
    other = generate_dev_certs(tmp_path / "other", ["stripe"])
    # Trusts our server, so the failure can only be our server refusing the client cert.
    foreign = client_context(
        layout.ca_cert(), other.client_cert("stripe"), other.client_key("stripe")
    )
    async with _serve(_mtls_server(layout)) as port:
        with pytest.raises(aiohttp.ClientConnectionError):
            await _get(port, foreign)


async def test_mtls_rejection_surfaces_late_under_tls13(layout: DevCertLayout) -> None:
    """Pin a trap for the adapter layer: in TLS 1.3 the client finishes its handshake before
    the server checks the client certificate, so a rejected client certificate arrives as
    ServerDisconnectedError (the "maybe sent" family), not as a connect error. Under TLS 1.2
    the same rejection is a ClientConnectorError.
    """
    tls12 = client_context(layout.ca_cert())
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    async with _serve(_mtls_server(layout)) as port:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await _get(port, client_context(layout.ca_cert()))
        with pytest.raises(aiohttp.ClientConnectorError):
            await _get(port, tls12)


async def test_client_verifies_server_chain_and_hostname(
    layout: DevCertLayout, tmp_path: Path
) -> None:
    async with _serve(_mtls_server(layout)) as port:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(port, client_context(None))  # system trust store lacks the dev CA
    cert_pem, key_pem = issue_dev_pair(
        layout, usage="server", common_name="x", days_valid=30, sans=["elsewhere.example"]
    )
    cert, key = _write(tmp_path, "elsewhere", cert_pem, key_pem)
    async with _serve(server_context(cert, key)) as port:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(port, client_context(layout.ca_cert()))


def test_requiring_client_certs_needs_a_client_ca(layout: DevCertLayout) -> None:
    with pytest.raises(ValueError, match="client_ca"):
        server_context(layout.server_cert(), layout.server_key(), require_client_cert=True)


async def test_server_reload_serves_new_connections_with_the_new_cert(
    layout: DevCertLayout, tmp_path: Path
) -> None:
    ctx, client = _mtls_server(layout), _gateway_client(layout)
    old_serial = _serial(layout.server_cert())
    new_pem, new_key_pem = issue_dev_pair(layout, usage="server", common_name="gw", days_valid=90)
    new_cert, new_key = _write(tmp_path, "rotated", new_pem, new_key_pem)
    async with _serve(ctx) as port:
        old_reader, old_writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        assert _peer_serial(old_writer) == old_serial

        reload_cert_chain(ctx, new_cert, new_key)

        new_reader, new_writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        assert _peer_serial(new_writer) == _serial(new_cert) != old_serial
        # The connection established before the swap keeps its pair and keeps working.
        assert await _raw_get(old_reader, old_writer) == 200
        assert _peer_serial(old_writer) == old_serial
        assert await _raw_get(new_reader, new_writer) == 200
        assert await _get(port, client) == 200
        await _close(old_writer)
        await _close(new_writer)


async def test_failed_reload_keeps_the_old_pair(layout: DevCertLayout, tmp_path: Path) -> None:
    ctx, client = _mtls_server(layout), _gateway_client(layout)
    new_pem, _ = issue_dev_pair(layout, usage="server", common_name="gw", days_valid=90)
    new_cert = tmp_path / "rotated.pem"
    new_cert.write_bytes(new_pem)
    async with _serve(ctx) as port:
        with pytest.raises(ssl.SSLError):
            reload_cert_chain(ctx, new_cert, layout.client_key("stripe"))  # key of another cert
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        assert _peer_serial(writer) == _serial(layout.server_cert())
        assert await _raw_get(reader, writer) == 200
        await _close(writer)


async def test_client_reload_replaces_an_expired_client_cert(
    layout: DevCertLayout, tmp_path: Path
) -> None:
    expired_pem, expired_key_pem = issue_dev_pair(
        layout, usage="client", common_name="gateway-client-stripe", days_valid=-1
    )
    expired = _write(tmp_path, "expired", expired_pem, expired_key_pem)
    client = client_context(layout.ca_cert(), *expired)
    async with _serve(_mtls_server(layout)) as port:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as session:
            url = f"https://127.0.0.1:{port}/"
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(url)
            reload_cert_chain(client, layout.client_cert("stripe"), layout.client_key("stripe"))
            async with session.get(url) as resp:
                assert resp.status == 200
