"""A gateway SIGKILLed while its authorize call hangs at the provider (the provider has charged):
after the restart another process's reconciler takes the payment over and settles it, and the
journal and the transaction log still hold the authorize attempt that charged (write-ahead: the
attempt is journalled before the call, whichever candidate it is). Real `gateway serve`
processes, real emulators over mTLS, a real PostgreSQL journal (shared, so the takeover waits
for the payment's deadline, as on a fleet)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from emulators.faults import FaultRule
from emulators.server import EmulatorServer
from gateway.drill.process import GatewayProcess, free_port
from tests.conftest import AUTH, card_payment, charges, gateway_config_data, set_faults

SETTLE_WITHIN_S = 60.0  # deadline (3 s) + abandon margin (5 s) + a reconciler interval (5 s), on a loaded machine
LOG_POLL_S = 0.02


async def _provider_has(server: EmulatorServer, done: Any, within_s: float, what: str) -> None:
    """Until the emulator's ledger shows `done` (the gateway's call is in flight)."""
    until = time.monotonic() + within_s
    while time.monotonic() < until:
        if done(server.emulator.ledger):
            return
        await asyncio.sleep(LOG_POLL_S)
    raise AssertionError(f"the provider never received the {what} call")


async def _charged(server: EmulatorServer, within_s: float) -> str:
    """The payment id of the first charge the emulator holds."""
    await _provider_has(server, lambda ledger: ledger.charges(), within_s, "authorize")
    return server.emulator.ledger.charges()[0].payment_ref


async def _captured(server: EmulatorServer, payment_id: str, within_s: float) -> None:
    await _provider_has(server, lambda ledger: any(e.captured for e in ledger.find_by_ref(payment_id)), within_s,
                        "capture")


def _gateways(tmp_path: Path, dev_certs: Any, emulators: dict[str, EmulatorServer],
              order: tuple[str, ...]) -> tuple[str, GatewayProcess, GatewayProcess]:
    """One configuration on the shared PostgreSQL journal: its URL, the process to kill and the
    one started after it."""
    port = free_port("127.0.0.1")
    data = gateway_config_data(tmp_path, dev_certs, emulators, order,
                               every_provider={"timeout_ms": 2500}, engine={"deadline_ms": 3000},
                               storage={"backend": "postgres"}, server={"host": "127.0.0.1", "port": port})
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    url = f"http://127.0.0.1:{port}"
    return (url, GatewayProcess(config, url, {}, tmp_path / "first.log"),
            GatewayProcess(config, url, {}, tmp_path / "second.log"))


def _log_lines(tmp_path: Path, payment_id: str) -> list[dict[str, Any]]:
    """The payment's transaction-log lines, from both processes' files."""
    lines = [orjson.loads(line) for f in sorted((tmp_path / "logs").glob("*.jsonl"))
             for line in f.read_bytes().splitlines() if line.strip()]
    return [line for line in lines if line.get("payment_id") == payment_id]


async def _settled(session: aiohttp.ClientSession, payment_id: str) -> dict[str, Any]:
    until = time.monotonic() + SETTLE_WITHIN_S
    while time.monotonic() < until:
        async with session.get(f"/v1/payments/{payment_id}", headers=AUTH) as resp:
            doc = await resp.json()
        if doc["status"] not in ("received", "attempting", "pending") and not doc["status"].endswith("_pending"):
            return doc
        await asyncio.sleep(0.2)
    raise AssertionError(f"{payment_id} not settled within {SETTLE_WITHIN_S:g} s: {doc['status']}")


@pytest.mark.parametrize("provider", ["checkout", "stripe"])
async def test_killed_during_an_authorize_the_takeover_keeps_the_attempt_that_charged(
        provider: str, tmp_path: Path, dev_certs, emulators, pg_dsn: str,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PG_DSN", pg_dsn)
    other = "stripe" if provider == "checkout" else "checkout"
    url, doomed, restarted = _gateways(tmp_path, dev_certs, emulators, (provider, other))
    # The provider charges, then holds the answer: the gateway is killed while it waits.
    set_faults(emulators[provider], FaultRule(kind="timeout_after", hang_s=60, operations=("authorize",)))
    await doomed.start()
    try:
        async with aiohttp.ClientSession(base_url=url) as session:
            request = asyncio.create_task(session.post(
                "/v1/payments", json=card_payment(), headers={**AUTH, "Idempotency-Key": "crash-attempt-1"}))
            payment_id = await _charged(emulators[provider], within_s=2.0)
            await doomed.kill()
            with pytest.raises(aiohttp.ClientError):  # the process died before it answered
                await request
            set_faults(emulators[provider])

            await restarted.start()
            doc = await _settled(session, payment_id)
    finally:
        await restarted.stop()
        await doomed.kill()

    assert doc["status"] == "approved" and doc["provider"] == provider
    [charge] = charges(emulators[provider], payment_id)
    assert charge.idempotency_key == f"{payment_id}-{provider}-auth"
    assert charges(emulators[other], payment_id) == []
    authorized = [(a["provider"], a["try"], a["operation"]) for a in doc["attempts"]]
    assert (provider, 1, "authorize") in authorized, doc["attempts"]

    ours = _log_lines(tmp_path, payment_id)
    # Settled at its takeover: its one line is the reconciliation's (README, "Pending payments").
    assert [(line["event"], line["status"]) for line in ours] == [("reconciliation", "approved")]
    assert (provider, 1, "authorize") in [(a["provider"], a["try"], a["operation"]) for a in ours[0]["attempts"]]


async def test_killed_during_a_capture_the_takeover_keeps_the_capture_attempt(
        tmp_path: Path, dev_certs, emulators, pg_dsn: str,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PG_DSN", pg_dsn)
    url, doomed, restarted = _gateways(tmp_path, dev_certs, emulators, ("stripe",))
    await doomed.start()
    try:
        async with aiohttp.ClientSession(base_url=url) as session:
            async with session.post("/v1/payments", json=card_payment(capture=False),
                                    headers={**AUTH, "Idempotency-Key": "crash-capture-pay"}) as resp:
                payment_id = (await resp.json())["id"]
            set_faults(emulators["stripe"], FaultRule(kind="timeout_after", hang_s=60, operations=("capture",)))
            request = asyncio.create_task(session.post(
                f"/v1/payments/{payment_id}/capture", json={}, headers={**AUTH, "Idempotency-Key": "crash-capture-1"}))
            await _captured(emulators["stripe"], payment_id, within_s=2.0)
            await doomed.kill()
            with pytest.raises(aiohttp.ClientError):  # the process died before it answered
                await request
            set_faults(emulators["stripe"])

            await restarted.start()
            doc = await _settled(session, payment_id)
    finally:
        await restarted.stop()
        await doomed.kill()

    assert doc["status"] == "captured" and doc["captured_amount"] == 1299, orjson.dumps(doc).decode()
    assert ("stripe", 1, "capture") in [(a["provider"], a["try"], a["operation"]) for a in doc["attempts"]], \
        doc["attempts"]
    ours = _log_lines(tmp_path, payment_id)
    assert [(line["event"], line["status"]) for line in ours] == [("payment", "approved"),
                                                                  ("reconciliation", "captured")]
    assert ("stripe", 1, "capture") in [(a["provider"], a["try"], a["operation"]) for a in ours[-1]["attempts"]]
