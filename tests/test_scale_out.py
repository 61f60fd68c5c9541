"""Scale-out (DESIGN "Real components"): several replicas, one PostgreSQL, one Redis.

Two (or three) real gateway apps in one process, each with its own aiohttp server, transaction
log and in-process breakers, share the journal and idempotency records through PostgreSQL
(`storage.backend: postgres`) and breaker state through Redis (`breaker_sync.backend: redis`),
in front of the same Stripe-kind emulators. Real services only: PostgreSQL at
GATEWAY_TEST_PG_DSN and Redis at GATEWAY_TEST_REDIS_URL (`.ci/run` starts both); the tests fail
when they are down. Each test gets its own PostgreSQL schema and its own Redis key prefix.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis import asyncio as aioredis

from gateway.app_keys import POOL
from gateway.app_keys import BREAKER_SYNC
from gateway.certs.devca import DevCertLayout
from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.journal.postgres import PostgresStore
from emulators.faults import FaultRule
from emulators.server import EmulatorServer
from tests.conftest import (
    AUTH,
    card_payment,
    charges,
    engine_config_data,
    entries,
    idem,
    pay,
    pg_schema,
    set_faults,
    txlog,
)

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WAIT_S = 5.0  # bound on every wait for a change to cross the fleet


@pytest.fixture
async def fleet(tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer],
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., GatewayConfig]]:
    """`make(replica, **engine_config_data kwargs)`: configs for replicas of one fleet."""
    prefix = f"gateway-test:{uuid.uuid4().hex}"
    async with pg_schema() as dsn:
        monkeypatch.setenv("GATEWAY_PG_DSN", dsn)
        monkeypatch.setenv("GATEWAY_REDIS_URL", REDIS_URL)

        def make(replica: str, **kwargs: Any) -> GatewayConfig:
            data = engine_config_data(tmp_path / replica, dev_certs, stripes, ("primary", "backup"), **kwargs)
            data["storage"] = {"backend": "postgres"}
            data["breaker_sync"] = {"backend": "redis", "channel_prefix": prefix}
            return parse_config(data)

        try:
            yield make
        finally:
            redis = aioredis.from_url(REDIS_URL)
            try:
                await redis.delete(f"{prefix}:state")
            finally:
                await redis.aclose()


def breaker_event(client: TestClient, provider: str, state: str) -> asyncio.Event:
    """Set when `provider`'s breaker on this replica changes to `state`."""
    event = asyncio.Event()

    def listener(_provider: str, _old: str, new: str) -> None:
        if new == state:
            event.set()

    client.app[POOL][provider].breaker.listeners.append(listener)
    return event


# -- configuration ----------------------------------------------------------------------------------


def test_missing_dsn_or_redis_url_is_a_config_error_naming_the_field(tmp_path: Path, dev_certs: DevCertLayout,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = {name: SimpleNamespace(url="https://127.0.0.1:1") for name in ("primary", "backup")}
    data = engine_config_data(tmp_path, dev_certs, nowhere, ("primary", "backup"))  # type: ignore[arg-type]
    monkeypatch.delenv("GATEWAY_PG_DSN", raising=False)
    monkeypatch.delenv("GATEWAY_REDIS_URL", raising=False)

    with pytest.raises(ConfigError, match=r"^storage: .*GATEWAY_PG_DSN.*storage\.postgres_dsn_env"):
        parse_config({**data, "storage": {"backend": "postgres"}})
    with pytest.raises(ConfigError, match=r"^breaker_sync: .*GATEWAY_REDIS_URL.*breaker_sync\.redis_url_env"):
        parse_config({**data, "breaker_sync": {"backend": "redis"}})

    monkeypatch.setenv("GATEWAY_PG_DSN", "postgresql://u:secret@127.0.0.1/db")
    config = parse_config({**data, "storage": {"backend": "postgres"}})
    assert config.breaker_sync.backend == "none"
    assert "secret" not in repr(config) and "secret" not in repr(PostgresStore("postgresql://u:secret@h/db"))


# -- (a) one Idempotency-Key, many copies, two replicas ----------------------------------------------


async def test_concurrent_copies_across_replicas_charge_once(fleet, start_gateway, stripes) -> None:
    a = await start_gateway(fleet("a"))
    b = await start_gateway(fleet("b"))
    # slow enough that the copies arrive while the first one is in flight
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=150, operations=("authorize",)))
    headers = idem()
    body = card_payment()

    async def one(client: TestClient) -> tuple[int, bytes]:
        resp = await client.post("/v1/payments", json=body, headers=headers)
        return resp.status, await resp.read()

    answers = await asyncio.gather(*(one(a if i % 2 else b) for i in range(20)))

    statuses = [status for status, _ in answers]
    assert set(statuses) <= {201, 409}, statuses
    created = [raw for status, raw in answers if status == 201]
    assert created and all(raw == created[0] for raw in created)
    conflicts = [orjson.loads(raw) for status, raw in answers if status == 409]
    assert conflicts and all(c["code"] == "idempotency_key_in_use" for c in conflicts)
    doc = orjson.loads(created[0])
    assert doc["status"] == "approved" and doc["provider"] == "primary"
    assert stripes["primary"].emulator.ledger.snapshot()["charges"] == 1
    assert len(charges(stripes["primary"], doc["id"])) == 1
    assert stripes["backup"].emulator.ledger.snapshot()["entries"] == []
    # exactly one transaction line in the whole fleet
    assert len(await txlog(a)) + len(await txlog(b)) == 1

    # afterwards either replica replays the stored answer byte for byte
    for client in (a, b):
        replay = await client.post("/v1/payments", json=body, headers=headers)
        assert replay.status == 201 and replay.headers.get("Idempotent-Replayed") == "true"
        assert await replay.read() == created[0]
    other = await b.post("/v1/payments", json=card_payment(amount=1), headers=headers)
    assert other.status == 422 and (await other.json())["code"] == "idempotency_key_reused"
    assert stripes["primary"].emulator.ledger.snapshot()["charges"] == 1


# -- (b) breaker state crosses the fleet ------------------------------------------------------------


async def test_breaker_tripped_on_one_replica_opens_on_the_others(fleet, start_gateway, stripes) -> None:
    trip = {"primary": {"breaker": {"fail_max": 2, "reset_timeout_s": 30}, "retry": {"max_attempts": 2}}}
    a = await start_gateway(fleet("a", providers=trip))
    b = await start_gateway(fleet("b", providers=trip))
    b_opened = breaker_event(b, "primary", "open")
    await stripes["primary"].set_outage(True)

    status, doc = await pay(a)  # two connect failures at the primary trip A's breaker, then the backup

    assert status == 201 and doc["provider"] == "backup"
    assert a.app[POOL]["primary"].breaker.state == "open"
    await asyncio.wait_for(b_opened.wait(), WAIT_S)
    b_breaker = b.app[POOL]["primary"].breaker
    assert b_breaker.state == "open" and not b_breaker.allows_call()
    # the reset timeout runs from A's trip, not from when B heard of it
    assert abs(b_breaker._cb._state_storage.opened_at.timestamp() - a.app[POOL]["primary"].breaker.changed_at) < 0.01
    assert b.app[BREAKER_SYNC].applied == 1 and b.app[BREAKER_SYNC].published == 0  # B did not echo it

    # The primary is healthy again: a call from B would now show in its ledger. B skips it.
    await stripes["primary"].set_outage(False)
    status, doc = await pay(b)
    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "backup"
    assert [(x["provider"], x["outcome"], x["raw_code"]) for x in doc["attempts"]] == [
        ("primary", "skipped", "breaker_open"), ("backup", "approved", "succeeded")]
    assert stripes["primary"].emulator.ledger.snapshot()["entries"] == []
    ready = (await (await b.get("/readyz")).json())["providers"]["primary"]
    assert ready["usable"] is False and ready["breaker"] == "open"
    assert 'gateway_breaker_state{provider="primary"} 2.0' in await (await b.get("/metrics")).text()

    # A replica started now takes the fleet's view from Redis before serving.
    c = await start_gateway(fleet("c", providers=trip))
    assert c.app[POOL]["primary"].breaker.state == "open"

    # Closing crosses the fleet too (here an operator's force_close on A).
    b_closed, c_closed = breaker_event(b, "primary", "closed"), breaker_event(c, "primary", "closed")
    a.app[POOL]["primary"].breaker.force_close()
    await asyncio.wait_for(asyncio.gather(b_closed.wait(), c_closed.wait()), WAIT_S)
    status, doc = await pay(b)
    assert doc["provider"] == "primary" and len(charges(stripes["primary"], doc["id"])) == 1


# -- (c) the journal is the fleet's ------------------------------------------------------------------


async def test_payment_journalled_by_one_replica_is_served_by_another(fleet, start_gateway, stripes) -> None:
    a = await start_gateway(fleet("a"))
    b = await start_gateway(fleet("b"))
    status, doc = await pay(a, card_payment(capture=False))
    assert status == 201 and doc["status"] == "approved"

    got = await b.get(f"/v1/payments/{doc['id']}", headers=AUTH)

    assert got.status == 200
    assert await got.json() == doc
    # a follow-up through B goes to the provider A used, with the journal A wrote
    captured = await b.post(f"/v1/payments/{doc['id']}/capture", json={}, headers=idem())
    assert captured.status == 200 and (await captured.json())["status"] == "captured"
    [entry] = entries(stripes["primary"], doc["id"])
    assert entry.captured == 1299
    after = await a.get(f"/v1/payments/{doc['id']}", headers=AUTH)
    assert (await after.json())["status"] == "captured"


async def test_replica_starts_and_pays_while_redis_is_unreachable(fleet, start_gateway, stripes,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared breaker state is an optimisation: without Redis each replica keeps its own."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("GATEWAY_REDIS_URL", f"redis://127.0.0.1:{closed_port}/0")
    a = await start_gateway(fleet("a"))

    status, doc = await pay(a)

    assert not a.app[BREAKER_SYNC].connected
    assert status == 201 and doc["status"] == "approved"
    assert len(charges(stripes["primary"], doc["id"])) == 1
