"""Certificate expiry: `collect` over real files and real TLS handshakes to real emulators, and
the watcher's metrics, once-per-crossing warnings and routing around an expired client cert."""

from __future__ import annotations

import io
import json
import shutil
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app_keys import CONFIG, METRICS, OPS_LOG, POOL
from gateway.certs.check import CertReport, Thresholds, collect
from gateway.certs.devca import DevCertLayout, generate_dev_certs, issue_dev_pair, write_pem_pair
from gateway.certs.inspect import CertStatus
from gateway.certs.rotate import provider_target, rotate
from gateway.app_keys import CERT_WATCHER
from gateway.certs.watcher import CertificateWatcher
from gateway.config import GatewayConfig, parse_config
from gateway.metrics import Metrics
from gateway.provider_pool import ProviderPool
from gateway.txlog import build_ops_logger
from emulators.server import EmulatorServer
from tests.conftest import AUTH, card_payment, gateway_config_data

CLIENT_CN = "gateway-client-stripe"


@pytest.fixture
def certs(dev_certs: DevCertLayout, tmp_path: Path) -> DevCertLayout:
    """A private copy of the dev certificates: same CA, so the emulators accept its client certs,
    but rotating or breaking them here touches no other test."""
    shutil.copytree(dev_certs.root, tmp_path / "certs")
    return DevCertLayout(tmp_path / "certs")


def _config(tmp_path: Path, certs: DevCertLayout, emulators: dict[str, Any], *, server_tls: bool = False,
            **provider_tls: str) -> GatewayConfig:
    data = gateway_config_data(tmp_path, certs, emulators, order=("stripe",))
    data["providers"]["stripe"]["tls"].update(provider_tls)
    if server_tls:
        data["server"] = {"tls": {"cert": str(certs.server_cert()), "key": str(certs.server_key())}}
    return parse_config(data)


def _by_kind(reports: list[CertReport]) -> dict[tuple[str, str], CertReport]:
    return {(r.provider, r.kind): r for r in reports}


async def _swap_emulator_cert(server: EmulatorServer, days: float) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.admin_url}/_emulator/certificate", json={"days_valid": days}) as resp:
            assert resp.status == 200


def _events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def _watcher_on(app: web.Application, stream: io.StringIO | None = None, **kwargs: Any) -> CertificateWatcher:
    """A watcher over a running app's pool. If the app runs its own watcher, let its start-up pass
    finish first (its run_once waits on the same lock); it then sleeps for its interval."""
    existing = app.get(CERT_WATCHER)
    if existing is not None:
        await existing.run_once()
    ops = build_ops_logger(stream) if stream is not None else app[OPS_LOG]
    return CertificateWatcher(app[CONFIG], app[POOL].client_contexts(), app[METRICS], ops,
                              on_certificate_problem=app[POOL].set_certificate_problem, **kwargs)


# --- collect ---------------------------------------------------------------------------------


async def test_collect_lists_every_certificate_the_gateway_uses(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    config = _config(tmp_path, certs, emulators, server_tls=True)
    reports = _by_kind(await collect(config, now=datetime.now(UTC)))
    assert set(reports) == {("stripe", "client"), ("stripe", "ca"), ("stripe", "endpoint"), ("gateway", "server")}
    assert all(r.status is CertStatus.OK and r.error is None for r in reports.values())
    endpoint = reports[("stripe", "endpoint")]
    assert endpoint.location == f"127.0.0.1:{emulators['stripe'].port}"
    assert endpoint.subject == "CN=emulator-stripe"
    assert "127.0.0.1" in endpoint.sans
    assert reports[("stripe", "client")].location == str(certs.client_cert("stripe"))
    assert reports[("stripe", "client")].days_left == pytest.approx(365, abs=1)
    assert reports[("stripe", "ca")].days_left == pytest.approx(3650, abs=1)
    assert reports[("gateway", "server")].subject == "CN=gateway"
    assert not any(r.kind == "endpoint" for r in await collect(config, now=datetime.now(UTC),
                                                                probe_endpoints=False))


async def test_endpoint_swapped_to_3_days_is_critical_and_an_expired_one_is_expired(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    config = _config(tmp_path, certs, emulators)
    await _swap_emulator_cert(emulators["stripe"], 3)
    endpoint = _by_kind(await collect(config, now=datetime.now(UTC)))[("stripe", "endpoint")]
    assert endpoint.status is CertStatus.CRITICAL
    assert endpoint.days_left == pytest.approx(3, abs=0.01)
    assert endpoint.subject == "CN=stripe-emulator" and endpoint.error is None

    await _swap_emulator_cert(emulators["stripe"], -1)
    endpoint = _by_kind(await collect(config, now=datetime.now(UTC)))[("stripe", "endpoint")]
    assert endpoint.status is CertStatus.EXPIRED  # read despite the failed verification
    assert endpoint.seen and endpoint.days_left == pytest.approx(-1, abs=0.01)
    assert endpoint.error is not None and "expired" in endpoint.error


async def test_endpoint_from_another_ca_is_invalid_and_a_dead_one_unreachable(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    other = generate_dev_certs(tmp_path / "other", ["stripe"])
    config = _config(tmp_path, certs, emulators, ca=str(other.ca_cert()))
    endpoint = _by_kind(await collect(config, now=datetime.now(UTC)))[("stripe", "endpoint")]
    assert endpoint.status is CertStatus.INVALID
    assert endpoint.seen and endpoint.subject == "CN=emulator-stripe"
    assert endpoint.error is not None and "does not verify" in endpoint.error

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{sock.getsockname()[1]}"
    data = gateway_config_data(tmp_path, certs, emulators, order=("stripe",))
    data["providers"]["stripe"]["base_url"] = dead
    endpoint = _by_kind(await collect(parse_config(data), now=datetime.now(UTC)))[("stripe", "endpoint")]
    assert endpoint.status is CertStatus.INVALID and not endpoint.seen
    assert endpoint.error is not None and endpoint.error.startswith("unreachable")


async def test_missing_and_garbled_files_are_invalid_reports(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    config = _config(tmp_path, certs, emulators)
    certs.client_key("stripe").write_bytes(certs.server_key().read_bytes())  # a key of another pair
    certs.provider_ca("stripe").write_bytes(b"not a certificate")
    reports = _by_kind(await collect(config, now=datetime.now(UTC), probe_endpoints=False))
    client, ca = reports[("stripe", "client")], reports[("stripe", "ca")]
    assert client.status is CertStatus.INVALID and "does not match" in (client.error or "")
    assert ca.status is CertStatus.INVALID and not ca.seen
    certs.client_cert("stripe").unlink()
    client = _by_kind(await collect(config, now=datetime.now(UTC), probe_endpoints=False))[("stripe", "client")]
    assert client.status is CertStatus.INVALID and "cannot read" in (client.error or "")


def test_thresholds_are_validated_and_ranked() -> None:
    limits = Thresholds.parse("30,14,7")
    assert (limits.warn_days, limits.critical_days) == (30, 7)
    assert [limits.crossed(d) for d in (40, 29, 13, 6)] == [None, 30, 14, 7]
    for bad in ("7,14", "30,-1", "", "a,b"):
        with pytest.raises(ValueError):
            Thresholds.parse(bad)


# --- the watcher -------------------------------------------------------------------------------


async def test_watcher_warns_once_per_threshold_crossing(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    """A clock the test moves: the same 40-day certificate crosses 30, 14, 7 days, then expires."""
    cert_pem, key_pem = issue_dev_pair(certs, usage="client", common_name=CLIENT_CN, days_valid=40)
    write_pem_pair(cert_pem, key_pem, certs.client_cert("stripe"), certs.client_key("stripe"))
    config = _config(tmp_path, certs, emulators)
    pool, metrics, stream = ProviderPool(config), Metrics(), io.StringIO()
    start = datetime.now(UTC)
    now = start
    watcher = CertificateWatcher(config, pool.client_contexts(), metrics, build_ops_logger(stream),
                                 on_certificate_problem=pool.set_certificate_problem, probe_endpoints=False,
                                 clock=lambda: now)

    async def tick(days: float) -> list[tuple[str, Any]]:
        nonlocal now
        now = start + timedelta(days=days)
        before = len(_events(stream))
        await watcher.run_once()
        return [(e["event"], e.get("threshold_days")) for e in _events(stream)[before:]]

    assert await tick(0) == []
    assert await tick(11) == [("certificate_expiring", 30)]
    assert await tick(11.5) == []
    assert await tick(27) == [("certificate_expiring", 14)]
    assert await tick(34) == [("certificate_expiring", 7)]
    assert _gauge(metrics, "gateway_certificate_status", provider="stripe", kind="client") == 2
    assert await tick(34.5) == []
    assert pool["stripe"].certificate_problem is None
    assert sorted(await tick(41)) == [("certificate_expired", None), ("provider_certificate_state", None)]
    assert pool["stripe"].certificate_problem == "client_certificate_expired"
    assert _gauge(metrics, "gateway_certificate_status", provider="stripe", kind="client") == 3
    expiry = _gauge(metrics, "gateway_certificate_expiry_seconds", provider="stripe", kind="client",
                    subject=f"CN={CLIENT_CN}")
    assert expiry == pytest.approx(-86_400, abs=600)
    assert await tick(42) == []

    # A fresh certificate (90 days from the real now: 49 left on the test's clock) is loaded,
    # the provider is usable again, and nothing is warned about it.
    fresh_cert, fresh_key = issue_dev_pair(certs, usage="client", common_name=CLIENT_CN, days_valid=90)
    rotate(provider_target(config, "stripe"), fresh_cert, fresh_key, now=datetime.now(UTC))
    events = await tick(42)
    assert [e for e, _ in events] == ["certificate_reloaded", "provider_certificate_state"]
    assert pool["stripe"].certificate_problem is None
    assert _gauge(metrics, "gateway_certificate_status", provider="stripe", kind="client") == 0


async def test_watcher_exports_endpoint_metrics_and_keeps_them_through_an_outage(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    config = _config(tmp_path, certs, emulators)
    metrics, stream = Metrics(), io.StringIO()
    watcher = CertificateWatcher(config, (_pool := ProviderPool(config)).client_contexts(), metrics, build_ops_logger(stream),
                                 on_certificate_problem=_pool.set_certificate_problem)
    await _swap_emulator_cert(emulators["stripe"], 3)
    await watcher.run_once()
    labels = {"provider": "stripe", "kind": "endpoint"}
    assert _gauge(metrics, "gateway_certificate_status", **labels) == 2
    expiry = _gauge(metrics, "gateway_certificate_expiry_seconds", **labels, subject="CN=stripe-emulator")
    assert expiry == pytest.approx(3 * 86_400, abs=60)
    assert _gauge(metrics, "gateway_certificate_status", provider="stripe", kind="client") == 0
    assert _gauge(metrics, "gateway_certificate_status", provider="stripe", kind="ca") == 0

    await emulators["stripe"].set_outage(True)
    await watcher.run_once()
    await watcher.run_once()
    assert _gauge(metrics, "gateway_certificate_status", **labels) == 2  # last known, not "invalid"
    events = [e["event"] for e in _events(stream)]
    assert events.count("certificate_probe_failed") == 1
    assert events.count("certificate_expiring") == 1  # the endpoint's, once

    await emulators["stripe"].set_outage(False)
    await _swap_emulator_cert(emulators["stripe"], 200)
    await watcher.run_once()
    assert _gauge(metrics, "gateway_certificate_status", **labels) == 0
    assert "certificate_probe_recovered" in [e["event"] for e in _events(stream)]


async def test_expired_client_certificate_makes_the_provider_unusable_until_rotated(
    tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer], start_gateway: Any
) -> None:
    expired = issue_dev_pair(certs, usage="client", common_name=CLIENT_CN, days_valid=-1)
    write_pem_pair(*expired, certs.client_cert("stripe"), certs.client_key("stripe"))
    config = _config(tmp_path, certs, emulators)
    client = await start_gateway(config)
    watcher = await _watcher_on(client.app, probe_endpoints=False)
    await watcher.run_once()

    handle = client.app[POOL]["stripe"]
    assert handle.certificate_problem == "client_certificate_expired"
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["providers"]["stripe"]["reason"] == "client_certificate_expired"
    metrics_text = await (await client.get("/metrics")).text()
    assert 'gateway_certificate_status{kind="client",provider="stripe"} 3.0' in metrics_text

    fresh = issue_dev_pair(certs, usage="client", common_name=CLIENT_CN, days_valid=90)
    rotate(provider_target(config, "stripe"), *fresh, now=datetime.now(UTC))
    await watcher.reload_now()
    assert handle.certificate_problem is None
    assert (await client.get("/readyz")).status == 200
    # The reloaded pair is accepted by the emulator's mTLS: a payment goes through.
    resp = await client.post("/v1/payments", json=card_payment(),
                             headers={**AUTH, "Idempotency-Key": "cert-recovered-1"})
    assert resp.status == 201
    assert (await resp.json())["status"] == "approved"
