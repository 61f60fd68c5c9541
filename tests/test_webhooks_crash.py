"""A gateway SIGKILLed between journalling a webhook and applying it: after the restart the event
is applied once (one state change, one transaction-log line), and the provider's re-delivery
(it never got an answer) changes nothing. Real processes, real emulators, real SQLite."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from emulators.faults import FaultRule
from gateway.drill.process import GatewayProcess, free_port
from gateway.webhooks.routes import CRASH_ENV
from tests.conftest import AUTH, card_payment, charges, gateway_config_data, set_faults
from tests.webhook_shapes import WEBHOOK_ENV, WEBHOOK_PROVIDERS, adyen_item, adyen_notification


@pytest.fixture(autouse=True)
def _webhook_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in WEBHOOK_ENV.items():
        monkeypatch.setenv(name, value)


async def test_killed_after_journalling_a_webhook_it_is_applied_once_after_the_restart(
        tmp_path: Path, dev_certs, emulators) -> None:  # type: ignore[no-untyped-def]
    port = free_port("127.0.0.1")
    data = gateway_config_data(tmp_path, dev_certs, emulators, ("adyen", "stripe"), providers=WEBHOOK_PROVIDERS,
                               server={"host": "127.0.0.1", "port": port})
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    url = f"http://127.0.0.1:{port}"
    doomed = GatewayProcess(config, url, {CRASH_ENV: "journalled"}, tmp_path / "first.log")
    restarted = GatewayProcess(config, url, {}, tmp_path / "second.log")
    set_faults(emulators["adyen"], FaultRule(kind="error", status=500, after_processing=True,
                                             operations=("authorize",)))
    await doomed.start()
    try:
        async with aiohttp.ClientSession(base_url=url) as session:
            async with session.post("/v1/payments", json=card_payment(),
                                    headers={**AUTH, "Idempotency-Key": "crash-webhook-1"}) as resp:
                doc = await resp.json()
            assert doc["status"] == "pending"
            [charge] = charges(emulators["adyen"], doc["id"])
            body = adyen_notification(adyen_item("AUTHORISATION", charge.id, doc["id"], 1299))
            with pytest.raises(aiohttp.ClientError):  # the process died before it answered
                await session.post("/v1/webhooks/adyen", data=body, headers={"Content-Type": "application/json"})
            await doomed.kill()
            assert not doomed.running

            await restarted.start()  # applies what the journal holds before it serves
            async with session.get(f"/v1/payments/{doc['id']}", headers=AUTH) as resp:
                assert (await resp.json())["status"] == "approved"
            async with session.post("/v1/webhooks/adyen", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                assert (resp.status, await resp.text()) == (200, "[accepted]")  # the re-delivery: a repeat
            async with session.get(f"/v1/payments/{doc['id']}", headers=AUTH) as resp:
                assert (await resp.json())["status"] == "approved"
    finally:
        await restarted.stop()
        await doomed.kill()
    lines = [orjson.loads(line) for f in sorted((tmp_path / "logs").glob("*.jsonl"))
             for line in f.read_bytes().splitlines() if line.strip()]
    assert [(line["event"], line["status"]) for line in lines if line.get("payment_id") == doc["id"]] == [
        ("payment", "pending"), ("webhook", "approved")]
