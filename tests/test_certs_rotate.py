"""Rotation: validated before anything is swapped, atomic with rollback, picked up by the watcher
without restart, and no request lost while it happens. Real certificates, real mTLS, the CLI
through typer's CliRunner."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from typer.testing import CliRunner, Result

from gateway.app_keys import CONFIG, METRICS, POOL
from gateway.cli.certs import certs_app
from gateway.certs.devca import DevCertLayout, generate_dev_certs, issue_dev_pair, write_pem_pair
from gateway.certs.tls import client_context, server_context
from gateway.app_keys import CERT_WATCHER
from gateway.certs.watcher import CertificateWatcher
from gateway.config import load_config, parse_config
from gateway.metrics import Metrics
from gateway.provider_pool import ProviderPool
from gateway.txlog import build_ops_logger
from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from tests.conftest import AUTH, card_payment, gateway_config_data

CLIENT_CN = "gateway-client-stripe"
runner = CliRunner()


@pytest.fixture
def certs(dev_certs: DevCertLayout, tmp_path: Path) -> DevCertLayout:
    """A private copy of the dev certificates (same CA as the emulators trust)."""
    shutil.copytree(dev_certs.root, tmp_path / "certs")
    return DevCertLayout(tmp_path / "certs")


def _config_data(tmp_path: Path, certs: DevCertLayout, url: str = "https://127.0.0.1:9") -> dict[str, Any]:
    data = gateway_config_data(tmp_path, certs, {"stripe": SimpleNamespace(url=url)}, order=("stripe",))  # type: ignore[dict-item]
    data["server"] = {"tls": {"cert": str(certs.server_cert()), "key": str(certs.server_key()),
                              "client_ca": str(certs.ca_cert())}}
    return data


@pytest.fixture
def config_file(tmp_path: Path, certs: DevCertLayout) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config_data(tmp_path, certs)))
    return path


def _cli(*args: str | Path) -> Result:
    return runner.invoke(certs_app, [str(a) for a in args])


def _write(tmp_path: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_bytes(pair[0])
    key.write_bytes(pair[1])
    return cert, key


def _snapshot(root: Path) -> dict[Path, tuple[int, int, bytes]]:
    """Inode, mtime and bytes of every file: any rewrite, even of the same bytes, shows."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _serial(pem: bytes) -> str:
    return f"{x509.load_pem_x509_certificate(pem).serial_number:x}"


# --- refusals: every check, nothing changed ----------------------------------------------------


def _client(layout: DevCertLayout, **kw: Any) -> tuple[bytes, bytes]:
    return issue_dev_pair(layout, usage="client", common_name=CLIENT_CN, **{"days_valid": 90, **kw})


def _wrong_key(layout: DevCertLayout, _tmp: Path) -> tuple[bytes, bytes]:
    return _client(layout)[0], _client(layout)[1]


def _wrong_ca(_layout: DevCertLayout, tmp: Path) -> tuple[bytes, bytes]:
    return _client(generate_dev_certs(tmp / "other-ca", ["stripe"]))


REFUSALS: dict[str, tuple[Callable[[DevCertLayout, Path], tuple[bytes, bytes]], list[str], str]] = {
    "expired": (lambda c, _: _client(c, days_valid=-1), [], "the certificate expired on"),
    "expires_in_5_days": (lambda c, _: _client(c, days_valid=5), [], "fewer than the required 7 (--min-days)"),
    "wrong_key": (_wrong_key, [], "the private key does not match the certificate"),
    "wrong_ca": (_wrong_ca, [], "the certificate is not issued by the CA"),
    "not_yet_valid": (lambda c, _: _client(c, not_before_days=2), [], "the certificate is not valid before"),
    "server_cert_as_client": (
        lambda c, _: issue_dev_pair(c, usage="server", common_name=CLIENT_CN, days_valid=90), [],
        "does not include clientAuth"),
    "server_wrong_san": (
        lambda c, _: issue_dev_pair(c, usage="server", common_name="gateway", days_valid=90, sans=["example.com"]),
        ["--server"], "(SAN: example.com) do not cover '127.0.0.1'"),
    "server_client_cert": (lambda c, _: _client(c), ["--server"], "does not include serverAuth"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_rotation_is_refused_with_the_reason_and_nothing_changes(
    case: str, tmp_path: Path, certs: DevCertLayout, config_file: Path
) -> None:
    make, target, reason = REFUSALS[case]
    cert, key = _write(tmp_path, "new", make(certs, tmp_path))
    before = _snapshot(certs.root)
    provider = [] if target else ["stripe"]
    result = _cli("rotate", *provider, *target, "--cert", cert, "--key", key, "--config", config_file)
    assert result.exit_code == 1, result.output
    assert "refused:" in result.output and "nothing was changed" in result.output
    assert reason in result.output
    assert _snapshot(certs.root) == before
    assert not list(certs.root.rglob("*.prev"))


def test_a_refusal_lists_every_reason(tmp_path: Path, certs: DevCertLayout, config_file: Path) -> None:
    other = generate_dev_certs(tmp_path / "other-ca", ["stripe"])
    cert_pem, _ = issue_dev_pair(other, usage="server", common_name="x", days_valid=2)
    cert, key = _write(tmp_path, "bad", (cert_pem, _client(certs)[1]))
    result = _cli("rotate", "stripe", "--cert", cert, "--key", key, "--config", config_file)
    assert result.exit_code == 1
    for reason in ("does not match", "fewer than the required 7", "not issued by the CA",
                   "does not include clientAuth"):
        assert reason in result.output


def test_without_a_configured_ca_the_server_rotation_needs_ca(tmp_path: Path, certs: DevCertLayout) -> None:
    data = _config_data(tmp_path, certs)
    del data["server"]["tls"]["client_ca"]
    config_file = tmp_path / "no-ca.yaml"
    config_file.write_text(yaml.safe_dump(data))
    pair = issue_dev_pair(certs, usage="server", common_name="gateway", days_valid=90)
    cert, key = _write(tmp_path, "srv", pair)
    result = _cli("rotate", "--server", "--cert", cert, "--key", key, "--config", config_file)
    assert result.exit_code == 1 and "pass --ca" in result.output
    result = _cli("rotate", "--server", "--cert", cert, "--key", key, "--ca", certs.ca_cert(), "--config",
                  config_file)
    assert result.exit_code == 0, result.output
    assert certs.server_cert().read_bytes() == pair[0]


# --- rotate and roll back ----------------------------------------------------------------------


def test_rotate_then_rollback_restores_the_exact_bytes(
    tmp_path: Path, certs: DevCertLayout, config_file: Path
) -> None:
    live_cert, live_key = certs.client_cert("stripe"), certs.client_key("stripe")
    old = (live_cert.read_bytes(), live_key.read_bytes())
    new = _client(certs, days_valid=60)
    cert, key = _write(tmp_path, "new", new)

    result = _cli("rotate", "stripe", "--cert", cert, "--key", key, "--config", config_file)
    assert result.exit_code == 0, result.output
    assert f"serial {_serial(old[0])} -> serial {_serial(new[0])}" in result.output
    assert (live_cert.read_bytes(), live_key.read_bytes()) == new
    assert (Path(f"{live_cert}.prev").read_bytes(), Path(f"{live_key}.prev").read_bytes()) == old
    assert live_key.stat().st_mode & 0o777 == 0o600

    result = _cli("rollback", "stripe", "--config", config_file)
    assert result.exit_code == 0, result.output
    assert (live_cert.read_bytes(), live_key.read_bytes()) == old
    assert Path(f"{live_cert}.prev").read_bytes() == new[0]  # so a second rollback re-applies it
    assert _cli("rollback", "stripe", "--config", config_file).exit_code == 0
    assert live_cert.read_bytes() == new[0]
    assert not [p for p in live_cert.parent.iterdir() if p.name.endswith(".tmp")]


def test_server_rotation_checks_the_configured_host_and_rolls_back(
    tmp_path: Path, certs: DevCertLayout, config_file: Path
) -> None:
    old = certs.server_cert().read_bytes()
    new = issue_dev_pair(certs, usage="server", common_name="gateway", days_valid=30)
    cert, key = _write(tmp_path, "srv", new)
    result = _cli("rotate", "--server", "--cert", cert, "--key", key, "--config", config_file)
    assert result.exit_code == 0, result.output
    assert certs.server_cert().read_bytes() == new[0]
    assert _cli("rollback", "--server", "--config", config_file).exit_code == 0
    assert certs.server_cert().read_bytes() == old


def test_rollback_needs_a_usable_previous_pair(tmp_path: Path, certs: DevCertLayout, config_file: Path) -> None:
    result = _cli("rollback", "stripe", "--config", config_file)
    assert result.exit_code == 1 and "no previous pair" in result.output
    live = certs.client_cert("stripe")
    expired = _client(certs, days_valid=-1)
    write_pem_pair(*expired, Path(f"{live}.prev"), Path(f"{certs.client_key('stripe')}.prev"))
    before = _snapshot(certs.root)
    result = _cli("rollback", "stripe", "--config", config_file)
    assert result.exit_code == 1 and "the previous certificate expired" in result.output
    assert _snapshot(certs.root) == before


def test_bad_invocations_exit_2(tmp_path: Path, certs: DevCertLayout, config_file: Path) -> None:
    cert, key = _write(tmp_path, "new", _client(certs))
    assert _cli("rotate", "stripe", "--cert", cert, "--key", key, "--config", tmp_path / "nope.yaml").exit_code == 2
    assert _cli("rotate", "stripe", "--cert", tmp_path / "nope.pem", "--key", key,
                "--config", config_file).exit_code == 2
    assert _cli("rotate", "stripe", "--server", "--cert", cert, "--key", key,
                "--config", config_file).exit_code == 2
    result = _cli("rotate", "nosuch", "--cert", cert, "--key", key, "--config", config_file)
    assert result.exit_code == 1 and "no provider 'nosuch'" in result.output


# --- check's exit codes, staged with issue-dev -------------------------------------------------


async def test_check_exits_0_when_fresh_1_with_a_5_day_cert_and_2_without_config(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    config_file = tmp_path / "live.yaml"
    config_file.write_text(yaml.safe_dump(_config_data(tmp_path, certs, emulators["stripe"].url)))

    async def check(*extra: str | Path) -> Result:  # the CLI runs its own event loop: a thread
        return await asyncio.to_thread(_cli, "check", "--config", config_file, *extra)

    fresh = await check()
    assert fresh.exit_code == 0, fresh.output
    assert "endpoint" in fresh.output and "ok" in fresh.output

    staged = _cli("issue-dev", "--provider", "stripe", "--days", "5", "--certs", certs.root)
    assert staged.exit_code == 0, staged.output
    result = await check("--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    client = next(c for c in doc["certificates"] if c["kind"] == "client")
    assert (doc["status"], client["status"]) == ("critical", "critical")
    assert client["days_left"] == pytest.approx(5, abs=0.01)
    endpoint = next(c for c in doc["certificates"] if c["kind"] == "endpoint")
    assert endpoint["status"] == "ok"
    assert (await check("--no-probe", "--thresholds", "4,3")).exit_code == 0  # 5 days is fine at 4/3

    assert _cli("rollback", "stripe", "--config", config_file).exit_code == 0
    assert (await check()).exit_code == 0
    missing = await asyncio.to_thread(_cli, "check", "--config", tmp_path / "missing.yaml")
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_issue_dev_writes_out_files_when_asked(tmp_path: Path, certs: DevCertLayout) -> None:
    before = _snapshot(certs.root)
    out_cert, out_key = tmp_path / "o.pem", tmp_path / "o.key"
    result = _cli("issue-dev", "--server", "--days", "3", "--certs", certs.root, "--out-cert", out_cert,
                  "--out-key", out_key)
    assert result.exit_code == 0, result.output
    assert _snapshot(certs.root) == before
    cert = x509.load_pem_x509_certificate(out_cert.read_bytes())
    days = (cert.not_valid_after_utc - datetime.now(UTC)).total_seconds() / 86_400
    assert days == pytest.approx(3, abs=0.01)
    assert _cli("issue-dev", "--certs", certs.root).exit_code == 2


# --- restart-free reload, observed from the server side ----------------------------------------


@asynccontextmanager
async def _mtls_echo(certs: DevCertLayout) -> AsyncIterator[str]:
    """A TLS server requiring a client certificate from the dev CA, answering with its serial."""

    async def serial(request: web.Request) -> web.Response:
        assert request.transport is not None
        der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return web.Response(text=f"{x509.load_der_x509_certificate(der).serial_number:x}")

    app = web.Application()
    app.router.add_get("/", serial)
    app_runner = web.AppRunner(app, access_log=None)
    await app_runner.setup()
    ctx = server_context(certs.emulator_cert("stripe"), certs.emulator_key("stripe"), client_ca=certs.ca_cert(),
                         require_client_cert=True)
    site = web.TCPSite(app_runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{app_runner.addresses[0][1]}/"
    finally:
        await app_runner.cleanup()


async def _presented_serial(url: str, ctx: Any) -> str:
    """The client certificate a *new* connection from ``ctx`` presents."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as session:
        async with session.get(url) as resp:
            return await resp.text()


async def test_a_bad_pair_on_disk_is_not_loaded_and_the_good_one_stays(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    """Files copied by hand, skipping `certs rotate`: the watcher still refuses what cannot work."""
    config = parse_config(gateway_config_data(tmp_path, certs, emulators, order=("stripe",)))
    pool, stream = ProviderPool(config), io.StringIO()
    watcher = CertificateWatcher(config, pool.client_contexts(), Metrics(), build_ops_logger(stream),
                                 on_certificate_problem=pool.set_certificate_problem, probe_endpoints=False)
    await watcher.run_once()
    ctx, live = pool["stripe"].ssl_context, (certs.client_cert("stripe"), certs.client_key("stripe"))
    original = _serial(live[0].read_bytes())
    async with _mtls_echo(certs) as url:
        assert await _presented_serial(url, ctx) == original
        for bad, reason in (((_client(certs)[0], _client(certs)[1]), "does not match"),
                            (_client(certs, days_valid=-1), "has expired")):
            write_pem_pair(*bad, *live)
            reports = await watcher.run_once()
            await watcher.run_once()
            client = next(r for r in reports if r.kind == "client")
            assert client.serial == original and reason in (client.error or "")
            assert pool["stripe"].certificate_problem is None
            assert await _presented_serial(url, ctx) == original
        refusals = [e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == "certificate_not_loaded"]
        assert len(refusals) == 2  # once per bad pair, not per pass

        good = _client(certs)
        write_pem_pair(*good, *live)
        await watcher.reload_now()
        assert await _presented_serial(url, ctx) == _serial(good[0])


async def test_the_gateway_server_certificate_is_reloaded_without_restart(
    tmp_path: Path, certs: DevCertLayout, config_file: Path
) -> None:
    config = load_config(config_file)
    ctx = server_context(certs.server_cert(), certs.server_key())  # what `gateway serve` listens with
    app = web.Application()
    app.router.add_get("/", _ok)
    app_runner = web.AppRunner(app, access_log=None)
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", 0, ssl_context=ctx).start()
    port = app_runner.addresses[0][1]
    metrics = Metrics()
    watcher = CertificateWatcher(config, (_pool := ProviderPool(config)).client_contexts(), metrics, build_ops_logger(io.StringIO()),
                                 on_certificate_problem=_pool.set_certificate_problem,
                                 server_ssl_context=ctx, probe_endpoints=False)
    try:
        await watcher.run_once()
        assert await _served_serial(port, certs) == _serial(certs.server_cert().read_bytes())
        new = issue_dev_pair(certs, usage="server", common_name="gateway", days_valid=20)
        cert, key = _write(tmp_path, "srv", new)
        assert _cli("rotate", "--server", "--cert", cert, "--key", key, "--config", config_file).exit_code == 0
        await watcher.reload_now()
        assert await _served_serial(port, certs) == _serial(new[0])
        assert metrics.registry.get_sample_value("gateway_certificate_status",
                                                 {"provider": "gateway", "kind": "server"}) == 1  # 20 days: warn
    finally:
        await app_runner.cleanup()


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _served_serial(port: int, certs: DevCertLayout) -> str:
    """The server certificate a new connection is offered (verified against the dev CA)."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(certs.ca_cert()),
                                                    server_hostname="127.0.0.1")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return f"{x509.load_der_x509_certificate(der).serial_number:x}"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_rotation_under_load_loses_no_payment(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer], start_gateway: Any
) -> None:
    data = gateway_config_data(tmp_path, certs, emulators, order=("stripe",))
    # Room for 50 concurrent mTLS handshakes on a loaded machine: a timeout would answer a safe
    # `pending`, not the `approved` this test checks the rotation for.
    data["providers"]["stripe"].update(connect_timeout_ms=2000, timeout_ms=4000)
    config_file = tmp_path / "running.yaml"
    config_file.write_text(yaml.safe_dump(data))
    client = await start_gateway(parse_config(data))
    app = client.app
    if (app_watcher := app.get(CERT_WATCHER)) is not None:
        await app_watcher.run_once()  # let the app's own start-up pass finish
    watcher = CertificateWatcher(app[CONFIG], app[POOL].client_contexts(), app[METRICS], build_ops_logger(io.StringIO()),
                                 on_certificate_problem=app[POOL].set_certificate_problem,
                                 probe_endpoints=False)
    await watcher.run_once()
    ctx = app[POOL]["stripe"].ssl_context
    old_serial = _serial(certs.client_cert("stripe").read_bytes())
    new = _client(certs)
    cert, key = _write(tmp_path, "new", new)
    ledger = emulators["stripe"].emulator.ledger
    # Each charge of the first wave is held 3 s at the provider, so it is in flight during the
    # swap even where a loaded machine spreads its handshakes out and the rotation's CLI is slow.
    emulators["stripe"].emulator.faults.set(FaultPlan(rules=(FaultRule(kind="latency", latency_ms=3000),)))

    async def pay() -> tuple[int, str]:
        resp = await client.post("/v1/payments", json=card_payment(),
                                 headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
        return resp.status, (await resp.json())["status"]

    async with _mtls_echo(certs) as url:
        assert await _presented_serial(url, ctx) == old_serial
        first_wave = [asyncio.create_task(pay()) for _ in range(25)]
        # Until charges are being processed at the provider: the ledger has no event to await, so
        # poll it, gently (a busy loop starves the gateway and emulator sharing this loop), with
        # room for 25 mTLS handshakes on a loaded two-core machine.
        async with asyncio.timeout(30):
            while _processing(ledger) < 5:
                await asyncio.sleep(0.005)
        rotated = await asyncio.to_thread(
            _cli, "rotate", "stripe", "--cert", cert, "--key", key, "--config", config_file)
        assert rotated.exit_code == 0, rotated.output
        await watcher.reload_now()
        in_flight_at_swap = sum(not t.done() for t in first_wave)
        emulators["stripe"].emulator.faults.set(FaultPlan())  # the second wave is answered at once
        second_wave = [asyncio.create_task(pay()) for _ in range(25)]
        results = await asyncio.gather(*first_wave, *second_wave)
        assert await _presented_serial(url, ctx) == _serial(new[0])

    assert in_flight_at_swap > 0
    assert results == [(201, "approved")] * 50
    assert len(ledger.charges()) == 50


def _processing(ledger: Any) -> int:
    """Charges the provider has accepted but not answered yet: requests in flight."""
    return sum(entry["status"] == "processing" for entry in ledger.snapshot()["entries"])
