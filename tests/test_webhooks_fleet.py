"""Two gateway processes on one PostgreSQL journal, every notification delivered to both (as a
provider retrying through a load balancer would): each event is journalled once, applied once,
and its payment has exactly one `webhook` line across both replicas' transaction logs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from emulators.faults import FaultRule
from gateway.drill.process import GatewayProcess, free_port
from tests.conftest import AUTH, card_payment, charges, gateway_config_data, pg_schema, set_faults
from tests.webhook_shapes import WEBHOOK_ENV, WEBHOOK_PROVIDERS, adyen_item, adyen_notification

PAYMENTS = 6
WAIT_S = 30.0
JSON = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def _webhook_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in WEBHOOK_ENV.items():
        monkeypatch.setenv(name, value)


async def test_replicas_sharing_a_journal_apply_each_notification_once(tmp_path: Path, dev_certs, emulators,  # type: ignore[no-untyped-def]
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async with pg_schema() as dsn:
        monkeypatch.setenv("GATEWAY_PG_DSN", dsn)
        replicas = []
        for name in ("one", "two"):
            port = free_port("127.0.0.1")
            data = gateway_config_data(tmp_path / name, dev_certs, emulators, ("adyen", "stripe"),
                                       providers={**WEBHOOK_PROVIDERS, "adyen": {**WEBHOOK_PROVIDERS["adyen"],
                                                                                 "breaker": {"fail_max": 100}}},
                                       storage={"backend": "postgres"},
                                       server={"host": "127.0.0.1", "port": port})
            config = tmp_path / f"{name}.yaml"
            config.write_text(yaml.safe_dump(data))
            replicas.append(GatewayProcess(config, f"http://127.0.0.1:{port}", {}, tmp_path / f"{name}.log"))
        set_faults(emulators["adyen"], FaultRule(kind="error", status=500, after_processing=True,
                                                 operations=("authorize",)))
        try:
            for replica in replicas:
                await replica.start()
            async with aiohttp.ClientSession() as session:
                ids = []
                for i in range(PAYMENTS):
                    async with session.post(f"{replicas[i % 2].url}/v1/payments", json=card_payment(),
                                            headers={**AUTH, "Idempotency-Key": f"fleet-webhook-{i}"}) as resp:
                        doc = await resp.json()
                    assert doc["status"] == "pending"
                    ids.append(doc["id"])
                bodies = [adyen_notification(adyen_item("AUTHORISATION", charge.id, pid, 1299))
                          for pid in ids for charge in charges(emulators["adyen"], pid)]

                async def deliver(url: str, body: bytes) -> int:
                    async with session.post(f"{url}/v1/webhooks/adyen", data=body, headers=JSON) as resp:
                        return resp.status

                answers = await asyncio.gather(*(deliver(r.url, b) for b in bodies for r in replicas))
                assert answers == [200] * (2 * PAYMENTS)

                async def statuses() -> list[str]:
                    out = []
                    for pid in ids:
                        async with session.get(f"{replicas[1].url}/v1/payments/{pid}", headers=AUTH) as resp:
                            out.append((await resp.json())["status"])
                    return out

                give_up = time.monotonic() + WAIT_S
                while await statuses() != ["approved"] * PAYMENTS:  # applied by whichever replica leased it
                    assert time.monotonic() < give_up, await statuses()
                    await asyncio.sleep(0.05)
        finally:
            for replica in replicas:
                await replica.stop()
    lines = [orjson.loads(line) for f in sorted(tmp_path.glob("*/logs/*.jsonl"))
             for line in f.read_bytes().splitlines() if line.strip()]
    webhook_lines = sorted(line["payment_id"] for line in lines if line["event"] == "webhook")
    assert webhook_lines == sorted(ids), "each payment settled once, by one replica"
