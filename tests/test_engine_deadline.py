"""The caller's own deadline is the caller's business: a try cut short to fit it says nothing
about the provider's health, so it never opens the breaker every other payment shares."""

from __future__ import annotations

import uuid

from emulators.faults import FaultPlan, FaultRule
from gateway.app_keys import POOL
from tests.conftest import AUTH, card_payment


async def test_a_callers_short_request_timeout_never_opens_the_shared_breaker(make_config, start_gateway,
                                                                                emulators) -> None:
    client = await start_gateway(make_config(order=("stripe", "adyen")))
    stripe = emulators["stripe"].emulator
    stripe.faults.set(FaultPlan(rules=(FaultRule(kind="latency", latency_ms=3000, operations=("authorize",)),)))
    # The caller's 400 ms ends long before the provider's 3 s answer, yet leaves room for the claim's
    # journal write on a loaded machine (at 80 ms the deadline sometimes passed before the call).
    for _ in range(6):  # twice the breaker's fail_max (3)
        headers = {**AUTH, "Idempotency-Key": str(uuid.uuid4()), "Request-Timeout": "400"}
        resp = await client.post("/v1/payments", json=card_payment(), headers=headers)
        assert resp.status == 201 and (await resp.json())["status"] == "pending"  # answered within its deadline

    assert client.app[POOL]["stripe"].breaker.state == "closed"
    stripe.faults.set(FaultPlan(rules=()))
    healthy = await client.post("/v1/payments", json=card_payment(),
                                headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
    doc = await healthy.json()
    assert doc["status"] == "approved" and doc["provider"] == "stripe"
