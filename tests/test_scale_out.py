"""Scale-out (DESIGN "Real components"): several replicas, one PostgreSQL, one Redis.

Two (or three) real gateway apps in one process, each with its own aiohttp server, transaction
log and in-process breakers, share the journal and idempotency records through PostgreSQL
(`storage.backend: postgres`) and breaker state through Redis (`breaker_sync.backend: redis`),
in front of the same Stripe-kind emulators. Real services only: PostgreSQL at
GATEWAY_TEST_PG_DSN and Redis at GATEWAY_TEST_REDIS_URL (`.ci/run` starts both); the tests fail
when they are down. Each test gets its own PostgreSQL schema and its own Redis key prefix.

Tests that take Redis away run a redis-server of their own on a free port (tests/redis_server.py),
and operator holds are shown with real `gateway serve` processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis import asyncio as aioredis

import aiohttp
import yaml

from gateway.app_keys import BREAKER_SYNC, POOL
from gateway.drill.process import GatewayProcess, free_port
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
from tests.redis_server import RedisServer

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WAIT_S = 5.0  # bound on every wait for a change to cross the fleet


ADMIN_KEY = "test-fleet-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def fleet_data(tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer],
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., dict[str, Any]]]:
    """`make(replica, **engine_config_data kwargs)`: the configuration data of a replica of one
    fleet (its own log directory, one PostgreSQL schema, one Redis prefix, an admin key for the
    console)."""
    monkeypatch.setenv("GATEWAY_KEY_ADMIN", ADMIN_KEY)
    monkeypatch.setenv("GATEWAY_REDIS_URL", REDIS_URL)
    prefix = f"gateway-test:{uuid.uuid4().hex}"
    async with pg_schema() as dsn:
        monkeypatch.setenv("GATEWAY_PG_DSN", dsn)

        def make(replica: str, **kwargs: Any) -> dict[str, Any]:
            data = engine_config_data(tmp_path / replica, dev_certs, stripes, ("primary", "backup"), **kwargs)
            data["auth"]["clients"].append({"name": "ops", "key_env": "GATEWAY_KEY_ADMIN", "permissions": ["admin"]})
            data["storage"] = {"backend": "postgres"}
            data["breaker_sync"] = {"backend": "redis", "channel_prefix": prefix}
            return data

        try:
            yield make
        finally:
            redis = aioredis.from_url(REDIS_URL)
            try:
                await redis.delete(f"{prefix}:state", f"{prefix}:holds")
            finally:
                await redis.aclose()


@pytest.fixture
def fleet(fleet_data: Callable[..., dict[str, Any]]) -> Callable[..., GatewayConfig]:
    """`make(replica, **engine_config_data kwargs)`: configs for replicas of one fleet."""
    return lambda replica, **kwargs: parse_config(fleet_data(replica, **kwargs))


@pytest.fixture
async def own_redis(fleet_data: Callable[..., dict[str, Any]],
                    monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RedisServer]:
    """A Redis of this test's own (taken away and brought back), used by the fleet's configs
    (set up after `fleet_data`, so its URL is the one they read)."""
    server = RedisServer()
    await server.start()
    monkeypatch.setenv("GATEWAY_REDIS_URL", server.url)
    try:
        yield server
    finally:
        await server.stop()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait for a change another process or server makes, polling (it sends no event here)."""
    give_up = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


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


# -- (d) Redis goes away and comes back -------------------------------------------------------------


async def test_a_trip_and_a_hold_made_while_redis_was_down_are_shared_when_it_returns(
        fleet, own_redis: RedisServer, start_gateway, stripes) -> None:
    trip = {"primary": {"breaker": {"fail_max": 2, "reset_timeout_s": 30}, "retry": {"max_attempts": 2}}}
    a = await start_gateway(fleet("a", providers=trip))
    b = await start_gateway(fleet("b", providers=trip))
    for client in (a, b):
        assert (await (await client.get("/readyz")).json())["breaker_sync"] == {"status": "ok"}
        assert "gateway_breaker_sync_connected 1.0" in await (await client.get("/metrics")).text()

    await own_redis.stop()

    async def degraded(client: TestClient) -> bool:
        return not client.app[BREAKER_SYNC].connected

    for client in (a, b):
        await eventually(lambda client=client: degraded(client), "the replica notices Redis is gone")
    ready = await b.get("/readyz")
    doc = await ready.json()
    assert ready.status == 200 and doc["ready"] is True, "Redis is optional: degraded, never unready"
    assert doc["breaker_sync"]["status"] == "degraded" and "Redis unreachable" in doc["breaker_sync"]["reason"]
    metrics = await (await b.get("/metrics")).text()
    assert "gateway_breaker_sync_connected 0.0" in metrics
    assert 'gateway_breaker_sync_errors_total{kind="connection"}' in metrics

    # While Redis is down: A's primary trips, and an operator holds A's backup (a console action).
    await stripes["primary"].set_outage(True)
    status, doc = await pay(a)
    assert status == 201 and doc["provider"] == "backup"
    a_primary = a.app[POOL]["primary"].breaker
    assert a_primary.state == "open"
    held = await a.post("/console/actions/breaker", headers=ADMIN,
                        json={"provider": "backup", "state": "open", "confirm": True})
    assert held.status == 200
    assert b.app[POOL]["primary"].breaker.state == "closed" and not b.app[POOL]["backup"].breaker.held_open

    async def gave_up() -> bool:  # both changes failed to publish: only a republish can share them now
        return a.app[BREAKER_SYNC].publish_errors >= 2

    await eventually(gave_up, "A gives up publishing its changes", timeout_s=30)
    b_primary_open, b_backup_open = breaker_event(b, "primary", "open"), breaker_event(b, "backup", "open")
    await own_redis.start()  # back, and empty: nothing of the fleet's state survived in it

    await asyncio.wait_for(asyncio.gather(b_primary_open.wait(), b_backup_open.wait()), WAIT_S)
    b_primary = b.app[POOL]["primary"].breaker
    assert abs(b_primary._cb._state_storage.opened_at.timestamp() - a_primary.changed_at) < 0.01
    b_backup = b.app[POOL]["backup"].breaker

    async def hold_shared() -> bool:  # the hold travels beside the state change, not inside it
        return b_backup.held_open

    await eventually(hold_shared, "B holds the backup open too")
    assert not b_backup.allows_call()
    await eventually(lambda: _is_connected(a), "A resubscribed")
    assert (await (await a.get("/readyz")).json())["breaker_sync"] == {"status": "ok"}


async def _is_connected(client: TestClient) -> bool:
    return client.app[BREAKER_SYNC].connected


# -- (e) operator holds are fleet state, with real processes -----------------------------------------


class Replica:
    """One `gateway serve` process of the fleet, with its console and readiness over HTTP."""

    def __init__(self, name: str, data: dict[str, Any], tmp_path: Path) -> None:
        port = free_port("127.0.0.1")
        data["server"] = {"host": "127.0.0.1", "port": port}
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(data))
        self.url = f"http://127.0.0.1:{port}"
        self.process = GatewayProcess(config, self.url, {}, tmp_path / f"{name}.log")

    async def provider(self, session: aiohttp.ClientSession, name: str) -> dict[str, Any]:
        async with session.get(f"{self.url}/readyz") as resp:
            return (await resp.json())["providers"][name]

    async def breaker(self, session: aiohttp.ClientSession, provider: str, state: str) -> dict[str, Any]:
        async with session.post(f"{self.url}/console/actions/breaker", headers=ADMIN,
                                json={"provider": provider, "state": state, "confirm": True}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def test_an_operator_hold_holds_on_every_replica_until_released_and_survives_a_restart(
        fleet_data, own_redis: RedisServer, stripes, tmp_path: Path) -> None:
    # A short reset timeout: a hold must outlast it (no trial call while held).
    quick = {name: {"breaker": {"fail_max": 5, "reset_timeout_s": 0.2}} for name in ("primary", "backup")}
    one = Replica("one", fleet_data("one", providers=quick), tmp_path)
    two = Replica("two", fleet_data("two", providers=quick), tmp_path)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        await one.process.start()
        await two.process.start()
        try:
            await one.breaker(session, "primary", "open")

            async def drained(replica: Replica) -> bool:
                return (await replica.provider(session, "primary"))["usable"] is False

            async def serving(replica: Replica) -> bool:
                return (await replica.provider(session, "primary"))["usable"] is True

            await eventually(lambda: drained(two), "the hold reaches the other process")
            await asyncio.sleep(0.4)  # past the reset timeout: still held, no half-open trial
            assert await drained(two) and await drained(one)

            await two.process.stop()
            await two.process.start()  # a new process reads the holds from Redis before serving
            assert (await two.provider(session, "primary"))["breaker"] == "open" and await drained(two)

            released = await two.breaker(session, "primary", "closed")  # released on another replica
            assert released["state"] == "closed"
            await eventually(lambda: serving(one), "the release reaches the replica that set the hold")
            async with session.post(f"{one.url}/v1/payments", json=card_payment(), headers=idem()) as resp:
                doc = await resp.json()
            assert resp.status == 201 and doc["provider"] == "primary"
            assert len(charges(stripes["primary"], doc["id"])) == 1
        finally:
            await asyncio.gather(one.process.stop(), two.process.stop())
