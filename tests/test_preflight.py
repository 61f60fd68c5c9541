"""`gateway preflight`: each problem it exists for, staged for real (certificates issued on the fly,
emulators over mTLS, files the probe cannot write), and no payment ever reaching an emulator."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
import yaml
from typer.testing import CliRunner, Result

from gateway.certs.devca import (
    DevCertLayout,
    generate_dev_certs,
    issue_dev_pair,
    write_pem_pair,
)
from gateway.cli import app
from gateway.config import parse_config
from gateway.journal.sqlite import SqliteStore
from gateway.preflight import (
    PreflightReport,
    Window,
    WorstCase,
    deadline_findings,
    return_url_findings,
    route_backup_findings,
    run_preflight,
    store_findings,
)
from aiohttp import ClientSession

from emulators.faults import FaultRule
from emulators.server import EmulatorServer
from gateway.app_keys import RECONCILER
from gateway.config import EngineConfig
from gateway.provider_pool import make_handle
from providers.base import ProviderRequest
from tests.conftest import card_payment, gateway_config_data, journal, pay, set_faults

# Three providers of 2 tries × 1000 ms + 5 ms backoff each: 6015 ms through the whole route.
ROOMY_DEADLINE = {"deadline_ms": 8000}


@pytest.fixture
def certs(tmp_path: Path, dev_certs: DevCertLayout) -> DevCertLayout:
    """A copy of the session's dev certificates (same CA, so the emulators still trust what it
    issues) that a test may overwrite."""
    return DevCertLayout(Path(shutil.copytree(dev_certs.root, tmp_path / "certs")))


def _data(tmp_path: Path, certs: DevCertLayout, emulators: Any, **overrides: Any) -> dict[str, Any]:
    data = gateway_config_data(tmp_path, certs, emulators, **overrides)
    for provider in data["providers"].values():
        # Probes check reachability, not speed: a loaded 2-core machine can take longer than the
        # shared test config's 300 ms for three concurrent mTLS handshakes.
        provider["connect_timeout_ms"] = 900  # below timeout_ms (1000), or preflight warns about it
    if "engine" not in overrides:
        data["engine"] = ROOMY_DEADLINE
    data["server"] = {"tls": {"cert": str(certs.server_cert()), "key": str(certs.server_key()),
                              "client_ca": str(certs.ca_cert())}}
    return data


async def _preflight(data: dict[str, Any], window: Window | None = None,
                     margin: timedelta = timedelta(days=7)) -> PreflightReport:
    now = datetime.now(UTC)
    return await run_preflight(parse_config(data), window=window or Window.default(now), margin=margin, now=now)


def _found(report: PreflightReport) -> set[tuple[str, str]]:
    return {(f.id, f.subject) for f in report.findings}


def _assert_no_payment_reached(emulators: dict[str, EmulatorServer]) -> None:
    for server in emulators.values():
        snapshot = server.emulator.ledger.snapshot()
        assert (snapshot["charges"], snapshot["entries"]) == (0, []), server.url


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(app, ["preflight", *map(str, args)])


async def _cli_async(*args: str | Path) -> Result:
    """The command runs its own event loop, so from a test's loop it runs in a thread."""
    return await asyncio.to_thread(_cli, *args)


def _config_file(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- a clean configuration -----------------------------------------------------------------------


async def test_clean_config_passes_and_sends_no_payment(tmp_path: Path, certs: DevCertLayout,
                                                        emulators: dict[str, EmulatorServer]) -> None:
    config_file = _config_file(tmp_path, _data(tmp_path, certs, emulators))

    result = await _cli_async("--config", config_file, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["ok"], doc["findings"], doc["incomplete"]) == (True, [], [])
    # client + CA per provider, the gateway's server certificate and its client CA, 3 endpoints
    assert doc["checked"] == {"certificates": 11, "providers": 3, "routes": 1, "stores": 2}

    table = await _cli_async("--config", config_file, "--window", "2026-11-27T00:00Z/2026-11-28T23:59Z")
    assert table.exit_code == 0, table.output
    assert "ready" in table.stdout and "2026-11-27 00:00" in table.stdout

    _assert_no_payment_reached(emulators)
    # The probes leave nothing behind: no journal database, no log directory, no scratch file.
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


# --- certificates --------------------------------------------------------------------------------


async def test_client_cert_expiring_inside_the_window_fails(tmp_path: Path, certs: DevCertLayout,
                                                            emulators: dict[str, EmulatorServer]) -> None:
    pair = issue_dev_pair(certs, usage="client", common_name="gateway-client-stripe", days_valid=2)
    write_pem_pair(*pair, certs.client_cert("stripe"), certs.client_key("stripe"))
    data = _data(tmp_path, certs, emulators)

    report = await _preflight(data)  # now → now + 1 day, + 7 days margin
    assert _found(report) == {("cert.expires", "stripe client certificate")}
    assert report.exit_code() == 1
    assert "within the margin after the sale" in report.findings[0].message
    # The certificate still works today: the provider itself is fine.
    now = datetime.now(UTC)
    short = await _preflight(data, Window(now, now + timedelta(days=1)), margin=timedelta(0))
    assert short.findings == [] and short.exit_code() == 0

    result = await _cli_async("--config", _config_file(tmp_path, data), "--json")
    assert result.exit_code == 1
    assert [f["id"] for f in json.loads(result.stdout)["findings"]] == ["cert.expires"]
    _assert_no_payment_reached(emulators)


async def test_provider_endpoint_cert_expiring_fails(tmp_path: Path, certs: DevCertLayout,
                                                     emulators: dict[str, EmulatorServer]) -> None:
    cert, key = tmp_path / "adyen-short.pem", tmp_path / "adyen-short.key"
    write_pem_pair(*issue_dev_pair(certs, usage="server", common_name="adyen-emulator", days_valid=1), cert, key)
    emulators["adyen"].reload_certificate(cert, key)

    report = await _preflight(_data(tmp_path, certs, emulators))
    assert _found(report) == {("cert.expires", "adyen endpoint certificate")}
    assert "during the sale" in report.findings[0].message
    _assert_no_payment_reached(emulators)


# --- providers -----------------------------------------------------------------------------------


async def test_provider_down_fails(tmp_path: Path, certs: DevCertLayout,
                                   emulators: dict[str, EmulatorServer]) -> None:
    await emulators["checkout"].set_outage(True)

    report = await _preflight(_data(tmp_path, certs, emulators))
    # Once, as the provider: not again as an unreadable endpoint certificate.
    assert _found(report) == {("provider.unreachable", "provider checkout")}
    assert "connect" in report.findings[0].message
    _assert_no_payment_reached(emulators)


async def test_mtls_refused_with_a_client_cert_from_another_ca(tmp_path: Path, certs: DevCertLayout,
                                                               emulators: dict[str, EmulatorServer]) -> None:
    other = generate_dev_certs(tmp_path / "other-ca", ["stripe"])
    data = _data(tmp_path, certs, emulators)
    data["providers"]["stripe"]["tls"].update(client_cert=str(other.client_cert("stripe")),
                                              client_key=str(other.client_key("stripe")))

    report = await _preflight(data)
    # The file itself is valid for months: only a real handshake shows the provider refuses it.
    assert _found(report) == {("provider.tls_refused", "provider stripe")}
    _assert_no_payment_reached(emulators)


async def test_api_key_refused_fails(tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The status query is a real request: a provider that rejects our key is caught too."""
    monkeypatch.setenv("STRIPE_API_KEY", "pk_test_publishable_by_mistake")  # Stripe wants a secret key

    report = await _preflight(_data(tmp_path, certs, emulators))
    assert _found(report) == {("provider.auth_refused", "provider stripe")}
    assert "STRIPE_API_KEY" in report.findings[0].message
    _assert_no_payment_reached(emulators)


async def _requests(server: EmulatorServer) -> dict[str, int]:
    """The emulator's own count of the API requests it received, by operation (its control API)."""
    async with ClientSession() as http, http.get(f"{server.admin_url}/_emulator/requests") as resp:
        return (await resp.json())["by_operation"]


async def test_a_pending_adyen_payment_and_preflight_never_ask_adyen_for_a_payment(
        tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer], start_gateway: Any) -> None:
    """Adyen has no payment lookup. A payment left pending there, a reconciler pass and a preflight
    run send it authorisations and the probe (`POST /paymentMethods`) only: the emulator counts no
    lookup, though it would count one (its `GET /v71/payments?reference=` stands in for the lookup
    Adyen lacks, so a regression is seen rather than lost in a 404)."""
    adyen = emulators["adyen"]
    data = _data(tmp_path, certs, emulators, order=("adyen", "stripe", "checkout"))
    client = await start_gateway(parse_config(data))
    set_faults(adyen, FaultRule(kind="error", status=500, after_processing=True, operations=("authorize",)))
    status, doc = await pay(client, card_payment())
    assert (status, doc["status"], doc["provider"]) == (201, "pending", "adyen")
    assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 0
    assert (await journal(client, doc["id"])).status.value == "pending"
    adyen.emulator.faults.clear()

    report = await _preflight(data)
    assert [f for f in report.findings if f.id.startswith("provider.")] == []
    counted = await _requests(adyen)
    assert "status" not in counted and counted["payment_methods"] == 1 and counted["authorize"] >= 1, counted
    await client.close()

    # The counter is no blind spot: a lookup by our reference, were anything to send one, counts.
    cfg = parse_config(data).providers["adyen"]
    handle = make_handle("adyen", cfg, EngineConfig())
    await handle.transport.start()
    try:
        answer = await handle.transport.send(ProviderRequest(
            "GET", f"/v71/payments?merchantAccount=GatewayTestECOM&reference={doc['id']}",
            {"X-API-Key": cfg.api_key.get_secret_value()}), 2.0)
    finally:
        await handle.transport.close()
    assert answer.status == 200 and (await _requests(adyen))["status"] == 1


async def test_an_unwell_adyen_is_caught_by_its_payment_methods_probe(
        tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]) -> None:
    set_faults(emulators["adyen"], FaultRule(kind="error", status=503, operations=("payment_methods",)))

    report = await _preflight(_data(tmp_path, certs, emulators))
    assert _found(report) == {("provider.unhealthy", "provider adyen")}
    assert "HTTP 503 to POST /v71/paymentMethods" in report.findings[0].message
    _assert_no_payment_reached(emulators)


# --- routes and timing (configuration only) ------------------------------------------------------

_NOWHERE = {name: SimpleNamespace(url="https://127.0.0.1:9") for name in ("stripe", "adyen", "checkout")}


def _offline(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return gateway_config_data(tmp_path, DevCertLayout(tmp_path / "certs"), _NOWHERE, **overrides)


def test_route_with_one_provider_fails(tmp_path: Path) -> None:
    findings = route_backup_findings(parse_config(_offline(tmp_path, order=("stripe",))))
    assert [(f.id, f.severity, f.subject) for f in findings] == [("route.no_backup", "error", "route default")]


@pytest.mark.parametrize(("match", "capabilities", "message"), [
    ({"currencies": ["EUR", "USD"]}, {"adyen": {"currencies": ["EUR"]}, "checkout": {"currencies": ["eur", "GBP"]}},
     "currency USD: only stripe can take it; no backup"),
    ({}, {"adyen": {"countries": ["NL"]}, "checkout": {"countries": ["GB"]}},
     ("takes any country, but only stripe can take any country (the others only GB, NL): other countries "
      "have no backup")),
    ({"countries": ["JP"]}, {p: {"countries": ["NL"]} for p in ("stripe", "adyen", "checkout")},
     "no provider on the route can take country JP"),
])
def test_backups_that_cannot_take_the_route_fail(tmp_path: Path, match: dict[str, Any],
                                                 capabilities: dict[str, dict[str, Any]], message: str) -> None:
    data = _offline(tmp_path)
    data["routes"][0]["match"] = match
    for provider, caps in capabilities.items():
        data["providers"][provider].update(caps)
    findings = route_backup_findings(parse_config(data))
    assert [(f.id, f.severity, f.message) for f in findings] == [("route.backup_cannot_take", "error", message)]


def test_backups_that_can_take_the_route_pass(tmp_path: Path) -> None:
    data = _offline(tmp_path)
    data["routes"][0]["match"] = {"currencies": ["EUR", "USD"], "countries": ["NL"]}
    data["providers"]["adyen"].update(currencies=["EUR"], countries=["NL", "BE"])
    data["providers"]["checkout"].update(currencies=["USD", "EUR"])
    assert route_backup_findings(parse_config(data)) == []


def test_deadline_too_small_for_the_retries(tmp_path: Path) -> None:
    # Each provider: 2 tries × 1000 ms + min(20, 5) ms backoff = 2005 ms.
    assert WorstCase.of(parse_config(_offline(tmp_path)).providers["stripe"]).ms == 2005
    first = deadline_findings(parse_config(_offline(tmp_path, engine={"deadline_ms": 1500})))
    assert [(f.id, f.severity) for f in first] == [("route.deadline_first", "error")]
    assert "stripe alone can take 2 × 1000 ms + 5 ms backoff = 2005 ms" in first[0].message

    failover = deadline_findings(parse_config(_offline(tmp_path, engine={"deadline_ms": 4500})))
    assert [(f.id, f.severity) for f in failover] == [("route.deadline_failover", "warn")]
    assert ("if stripe, adyen hang, failover reaches checkout after 4010 ms with 490 ms of engine.deadline_ms 4500 "
            "left") in failover[0].message

    assert deadline_findings(parse_config(_offline(tmp_path, engine={"deadline_ms": 6015}))) == []


async def test_deadline_exit_codes(tmp_path: Path, certs: DevCertLayout,
                                   emulators: dict[str, EmulatorServer]) -> None:
    """An error fails; a warning alone passes unless --strict."""
    too_small = _config_file(tmp_path, _data(tmp_path, certs, emulators, engine={"deadline_ms": 1500}))
    result = await _cli_async("--config", too_small)
    assert result.exit_code == 1 and "route.deadline_first" in result.stdout and "NOT ready" in result.stdout

    tight = _config_file(tmp_path, _data(tmp_path, certs, emulators, engine={"deadline_ms": 4500}))
    assert (await _cli_async("--config", tight)).exit_code == 0
    strict = await _cli_async("--config", tight, "--strict", "--json")
    assert strict.exit_code == 1
    assert [f["id"] for f in json.loads(strict.stdout)["findings"]] == ["route.deadline_failover"]
    _assert_no_payment_reached(emulators)


# --- stores --------------------------------------------------------------------------------------


async def test_unwritable_store_and_log_dir_fail(tmp_path: Path, certs: DevCertLayout,
                                                 emulators: dict[str, EmulatorServer]) -> None:
    # Tests run as root, where a read-only directory still takes writes: a path under a regular
    # file cannot be created by anyone.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data = _data(tmp_path, certs, emulators, storage={"sqlite_path": str(blocker / "data" / "gateway.db")},
                 log={"dir": str(blocker / "logs")})

    report = await _preflight(data)
    assert _found(report) == {("store.not_writable", "storage.sqlite_path"), ("log.not_writable", "log.dir")}
    assert report.exit_code() == 1
    _assert_no_payment_reached(emulators)


async def test_store_probe_commits_a_write_and_leaves_the_journal_as_it_was(tmp_path: Path) -> None:
    db = tmp_path / "data" / "gateway.db"
    store = SqliteStore(db)
    await store.open()  # a gateway's journal, schema and all
    await store.close()

    def tables() -> list[str]:
        with sqlite3.connect(db) as conn:
            return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))

    before = tables()
    config = parse_config(_offline(tmp_path, storage={"sqlite_path": str(db)}, log={"dir": str(tmp_path / "logs")}))
    assert await store_findings(config) == []
    assert tables() == before and db.exists()
    assert not (tmp_path / "logs").exists()

    db.unlink()
    db.mkdir()  # a directory where the database should be
    [finding] = await store_findings(config)
    assert (finding.id, finding.severity) == ("store.not_writable", "error")


async def test_postgres_store_probe(tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PG_DSN", pg_dsn)
    config = parse_config(_offline(tmp_path, storage={"backend": "postgres"}, log={"dir": str(tmp_path / "logs")}))
    assert await store_findings(config) == []
    conn = await asyncpg.connect(pg_dsn, timeout=5)
    try:  # the probe's rows were rolled back
        assert await conn.fetchval("SELECT count(*) FROM payments") == 0
        assert await conn.fetchval("SELECT count(*) FROM idempotency") == 0
    finally:
        await conn.close()

    # A read-only session (a standby, or a role pinned read-only) takes no journal writes.
    monkeypatch.setenv("GATEWAY_PG_DSN", f"{pg_dsn}&default_transaction_read_only=on")
    read_only = parse_config(_offline(tmp_path, storage={"backend": "postgres"},
                                      log={"dir": str(tmp_path / "logs")}))
    [finding] = await store_findings(read_only)
    assert (finding.id, finding.subject) == ("store.not_writable", "storage.postgres (GATEWAY_PG_DSN)")
    assert "read-only" in finding.message and "gateway:gateway@" not in finding.message


# --- the command line ----------------------------------------------------------------------------


def test_cannot_run_exits_2(tmp_path: Path) -> None:
    missing = _cli("--config", tmp_path / "missing.yaml", "--json")
    assert missing.exit_code == 2
    assert json.loads(missing.stdout)["ok"] is False and "cannot read" in missing.output

    config_file = _config_file(tmp_path, _offline(tmp_path))
    for window in ("tomorrow", "2026-11-28T00:00Z/2026-11-27T00:00Z", "2026-11-27T00:00Z/"):
        result = _cli("--config", config_file, "--window", window)
        assert result.exit_code == 2 and "--window" in result.output, window
    assert _cli("--config", config_file, "--margin-days", "-1").exit_code == 2


def test_window_parsing() -> None:
    window = Window.parse("2026-11-27T00:00Z/2026-11-28T23:59Z")
    assert window.start == datetime(2026, 11, 27, tzinfo=UTC)
    assert window.end == datetime(2026, 11, 28, 23, 59, tzinfo=UTC)
    shifted = Window.parse("2026-11-27T01:00+01:00/2026-11-28T12:00")  # an offset; no zone is UTC
    assert (shifted.start, shifted.end) == (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, 12, tzinfo=UTC))
    days = Window.parse("2026-11-27/2026-11-28")  # a bare end date runs to the end of that day
    assert (days.start, days.end) == (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 29, tzinfo=UTC))
    assert Window.parse("2026-11-27T00:00Z/2026-11-28T00:00Z").to_dict() == {
        "start": "2026-11-27T00:00:00Z", "end": "2026-11-28T00:00:00Z"}


def test_a_route_of_redirecting_providers_needs_a_return_url_policy(tmp_path: Path) -> None:
    """Every provider kind may answer with a 3-D Secure action: the route must say what a payment
    without a return URL gets; an account without redirects (`redirects: false`) needs none."""
    data = _offline(tmp_path)
    data["routes"][0].pop("return_url")
    assert [(f.id, f.severity, f.subject) for f in return_url_findings(parse_config(data))] == [
        ("route.no_return_url_policy", "error", "route default")]
    for policy in ("required", "optional"):
        data["routes"][0]["return_url"] = policy
        assert return_url_findings(parse_config(data)) == []
    data["routes"][0].pop("return_url")
    for provider in data["providers"].values():
        provider["redirects"] = False
    assert return_url_findings(parse_config(data)) == []
