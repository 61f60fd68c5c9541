"""A provider's connection pool is at least as wide as its bulkhead.

Every call the bulkhead admits needs a connection. With a smaller pool (the embedded default
once had a bulkhead of 200 calls and 100 connections), calls past the pool's width waited for a
connection, and aiohttp counts that wait against the connect timeout: a healthy provider
answering in a second at a peak was "not connected", failed over, and its breaker opened. The
bulkhead is the limit that queues with its own deadline-aware refusal; the pool follows it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from emulators.faults import FaultRule
from emulators.server import EmulatorServer
from gateway.app_keys import POOL
from gateway.config import ConfigError, GatewayConfig
from tests.conftest import AUTH, card_payment, set_faults

WIDTH = 40  # the pool follows the bulkhead: exactly this many connections
SLOW_MS = 600  # past the test config's 300 ms connect timeout: a wait for a connection would fail


async def test_calls_at_the_bulkheads_width_to_a_slow_provider_all_get_a_connection(
        make_config: Callable[..., GatewayConfig], start_gateway: Callable[..., Any],
        emulators: dict[str, EmulatorServer]) -> None:
    config = make_config(order=("stripe", "adyen"),
                         providers={"stripe": {"bulkhead": {"max_concurrent": WIDTH, "max_queue": 0}, "timeout_ms": 2000}})
    assert config.providers["stripe"].connections == WIDTH
    client = await start_gateway(config)
    set_faults(emulators["stripe"], FaultRule(kind="latency", latency_ms=SLOW_MS, operations=("authorize",)))

    async def pay() -> dict[str, Any]:
        resp = await client.post("/v1/payments", json=card_payment(),
                                 headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
        return await resp.json()

    docs = await asyncio.gather(*(pay() for _ in range(WIDTH)))
    outcomes = {(d["status"], d["provider"]) for d in docs}
    codes = {a.get("raw_code") for d in docs for a in d["attempts"]} - {None}
    assert outcomes == {("approved", "stripe")}, (outcomes, codes)
    assert client.app[POOL]["stripe"].breaker.state == "closed"


def test_a_pool_narrower_than_the_bulkhead_is_refused_naming_the_field(
        make_config: Callable[..., GatewayConfig]) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config(providers={"stripe": {"max_connections": 50, "bulkhead": {"max_concurrent": 80}}})
    message = str(raised.value)
    assert "providers.stripe" in message and "max_connections" in message and "80" in message, message
    assert make_config(providers={"stripe": {"max_connections": 300}}).providers["stripe"].connections == 300
