"""Circuit breaker, bulkhead and retry budget (DESIGN rule 8), end to end through real emulators.

Shares the multi-provider fixtures of test_engine_failover.py.
"""

from __future__ import annotations

import pytest

from gateway.breaker import BreakerOpen, NoVerdict, ProviderBreaker, ProviderFailure

import asyncio
import time

from domain.secret import Secret
from domain.types import Card, Operation, PaymentOrder
from gateway.app_keys import POOL
from gateway.config import EngineConfig, ProviderConfig
from gateway.metrics import Metrics
from gateway.provider_client import ProviderClient
from gateway.provider_pool import make_handle
from emulators.faults import FaultRule
from tests.conftest import charges, entries, journal, metrics_text, pay, set_faults, steps, txlog

RESET_TIMEOUT_S = 0.5


async def readiness(client) -> dict:  # type: ignore[no-untyped-def]
    return (await (await client.get("/readyz")).json())["providers"]


# -- 8. circuit breaker ---------------------------------------------------------------------------


async def test_breaker_opens_skips_primary_and_closes_after_half_open_trial(engine_config, start_gateway,
                                                                            stripes) -> None:
    config = engine_config(providers={"primary": {"breaker": {"fail_max": 3, "reset_timeout_s": RESET_TIMEOUT_S},
                                                  "retry": {"max_attempts": 1}}})
    client = await start_gateway(config)
    await stripes["primary"].set_outage(True)

    for n in range(3):
        status, doc = await pay(client)
        assert status == 201 and doc["status"] == "approved" and doc["provider"] == "backup"
        assert steps(doc) == [("primary", 1, "authorize", "unavailable"), ("backup", 1, "authorize", "approved")]
        assert doc["attempts"][0]["raw_code"] == "connect_failed"
        state = (await readiness(client))["primary"]
        assert state["breaker"] == ("open" if n == 2 else "closed")

    text = await metrics_text(client)
    assert 'gateway_breaker_state{provider="primary"} 2.0' in text
    assert 'gateway_breaker_state{provider="backup"} 0.0' in text
    ready = await readiness(client)
    assert ready["primary"] == {**ready["primary"], "usable": False, "reason": "breaker_open", "breaker": "open"}
    assert ready["backup"]["usable"] is True

    # The primary is back, but the breaker has not let it be tried: a call would show in its ledger.
    await stripes["primary"].set_outage(False)
    status, doc = await pay(client)
    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "backup"
    assert [(a["provider"], a["outcome"], a["raw_code"]) for a in doc["attempts"]] == [
        ("primary", "skipped", "breaker_open"), ("backup", "approved", "succeeded")]
    assert stripes["primary"].emulator.ledger.snapshot()["entries"] == []
    record = await journal(client, doc["id"])
    assert record.attempts[0].outcome == "skipped" and record.attempts[0].breaker_state == "open"
    [line] = await txlog(client, doc["id"])
    assert line["attempts"][0]["outcome"] == "skipped" and line["attempts"][0]["raw_code"] == "breaker_open"

    # No event marks the end of the open period (pybreaker checks the clock on the next call),
    # so wait out exactly what the configuration says, measured from the recorded transition.
    breaker = client.app[POOL]["primary"].breaker
    remaining = breaker.changed_at + config.providers["primary"].breaker.reset_timeout_s - time.time()
    await asyncio.sleep(max(0.0, remaining) + 0.02)
    assert (await readiness(client))["primary"]["usable"] is True

    status, doc = await pay(client)
    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "approved")]
    assert len(charges(stripes["primary"], doc["id"])) == 1
    assert entries(stripes["backup"], doc["id"]) == []
    text = await metrics_text(client)
    assert 'gateway_breaker_state{provider="primary"} 0.0' in text
    assert 'gateway_breaker_transitions_total{provider="primary",to_state="open"} 1.0' in text
    assert 'gateway_breaker_transitions_total{provider="primary",to_state="half-open"} 1.0' in text
    assert 'gateway_breaker_transitions_total{provider="primary",to_state="closed"} 1.0' in text
    ready = await readiness(client)
    assert ready["primary"]["breaker"] == "closed" and ready["primary"]["usable"] is True
    assert sum(len(s.emulator.ledger.charges()) for s in stripes.values()) == 5


async def test_failed_half_open_trial_reopens(engine_config, start_gateway, stripes) -> None:
    config = engine_config(providers={"primary": {"breaker": {"fail_max": 2, "reset_timeout_s": RESET_TIMEOUT_S},
                                                  "retry": {"max_attempts": 1}}})
    client = await start_gateway(config)
    await stripes["primary"].set_outage(True)
    for _ in range(2):
        await pay(client)
    assert (await readiness(client))["primary"]["breaker"] == "open"

    breaker = client.app[POOL]["primary"].breaker
    remaining = breaker.changed_at + RESET_TIMEOUT_S - time.time()
    await asyncio.sleep(max(0.0, remaining) + 0.02)

    status, doc = await pay(client)  # the trial call meets the outage still going on
    assert status == 201 and doc["provider"] == "backup"
    assert steps(doc) == [("primary", 1, "authorize", "unavailable"), ("backup", 1, "authorize", "approved")]
    ready = await readiness(client)
    assert ready["primary"]["breaker"] == "open" and ready["primary"]["usable"] is False

    status, doc = await pay(client)
    assert [a["outcome"] for a in doc["attempts"]] == ["skipped", "approved"]
    assert 'gateway_breaker_transitions_total{provider="primary",to_state="open"} 2.0' in await metrics_text(client)


async def test_declines_do_not_trip_the_breaker(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"breaker": {"fail_max": 2}}},
                                               route={"cascade_on": []}))
    for _ in range(4):
        _, doc = await pay(client, {"amount": 100, "currency": "EUR", "merchant_reference": "order-d",
                                    "payment_method": {"type": "card", "number": "4000000000009995",
                                                       "exp_month": 12, "exp_year": 2030}})
        assert doc["status"] == "declined" and doc["provider"] == "primary"
    ready = await readiness(client)
    assert ready["primary"]["breaker"] == "closed" and ready["primary"]["usable"] is True


# -- 9. retry budget ------------------------------------------------------------------------------


async def test_retry_budget_stops_retries_once_spent(engine_config, start_gateway, stripes) -> None:
    # ratio 0 and a floor of 0.1 retries/s over a 10 s window: exactly one retry for the whole gateway
    config = engine_config(providers={"primary": {"retry": {"max_attempts": 4}}},
                           engine={"retry_budget_ratio": 0, "retry_budget_min_per_s": 0.1,
                                   "retry_budget_window_s": 10})
    client = await start_gateway(config)
    await stripes["primary"].set_outage(True)

    primary_tries = []
    for _ in range(3):
        status, doc = await pay(client)
        assert status == 201 and doc["status"] == "approved" and doc["provider"] == "backup"
        primary_tries.append(sum(1 for a in doc["attempts"] if a["provider"] == "primary"))
        assert [a["provider"] for a in doc["attempts"]][-1] == "backup"

    assert primary_tries == [2, 1, 1]
    assert 'gateway_retries_total{provider="primary"} 1.0' in await metrics_text(client)
    assert sum(line["retries"] for line in await txlog(client)) == 1


async def test_without_budget_pressure_retries_reach_max_attempts(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"retry": {"max_attempts": 4}}}))
    await stripes["primary"].set_outage(True)

    for _ in range(2):
        _, doc = await pay(client)
        assert [a["try"] for a in doc["attempts"] if a["provider"] == "primary"] == [1, 2, 3, 4]
        assert doc["provider"] == "backup"


async def test_half_open_lets_a_single_trial_through(engine_config, start_gateway, stripes) -> None:
    config = engine_config(providers={"primary": {"breaker": {"fail_max": 1, "reset_timeout_s": RESET_TIMEOUT_S},
                                                  "retry": {"max_attempts": 1}}})
    client = await start_gateway(config)
    await stripes["primary"].set_outage(True)
    await pay(client)
    assert (await readiness(client))["primary"]["breaker"] == "open"
    await stripes["primary"].set_outage(False)
    # the trial is slow, so every other payment arrives while it is still running
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=300, operations=("authorize",)))
    breaker = client.app[POOL]["primary"].breaker
    await asyncio.sleep(max(0.0, breaker.changed_at + RESET_TIMEOUT_S - time.time()) + 0.02)

    answers = await asyncio.gather(*(pay(client) for _ in range(6)))

    docs = [doc for _, doc in answers]
    assert all(status == 201 and doc["status"] == "approved" for status, doc in answers)
    assert sorted(doc["provider"] for doc in docs) == ["backup"] * 5 + ["primary"]
    assert len(stripes["primary"].emulator.ledger.snapshot()["entries"]) == 1
    for doc in docs:
        if doc["provider"] == "backup":
            assert (doc["attempts"][0]["provider"], doc["attempts"][0]["raw_code"]) == ("primary", "breaker_open")
    assert (await readiness(client))["primary"]["breaker"] == "closed"


async def test_an_attempt_that_never_asked_the_provider_gives_no_verdict() -> None:
    """The gateway's own deadline inside the guard, a wait for a connection, a call cancelled
    at shutdown: none says anything about the provider. pybreaker's `calling()` counted each
    as a failure (one at fail_max 1 opened the breaker) and a normal exit as a success."""
    breaker = ProviderBreaker("primary", fail_max=1, reset_timeout_s=60)
    with pytest.raises(NoVerdict):
        async with breaker.guard():
            raise NoVerdict("the deadline left no time for the call")
    entered = asyncio.Event()

    async def cut_short() -> None:
        async with breaker.guard():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(cut_short())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "closed"
    with pytest.raises(ProviderFailure):
        async with breaker.guard():
            raise ProviderFailure("a 503")
    assert breaker.state == "open"


async def _primary_client(stripes, dev_certs) -> ProviderClient:  # type: ignore[no-untyped-def]
    """The gateway's own call to the primary emulator: timeout_ms 300, a breaker of fail_max 2."""
    cfg = ProviderConfig(kind="stripe", base_url=stripes["primary"].url, api_key_env="STRIPE_API_KEY",
                         timeout_ms=300, breaker={"fail_max": 2, "reset_timeout_s": 60},
                         tls={"ca": str(dev_certs.provider_ca("stripe")),
                              "client_cert": str(dev_certs.client_cert("stripe")),
                              "client_key": str(dev_certs.client_key("stripe"))})
    client = ProviderClient(make_handle("primary", cfg, EngineConfig()), Metrics())
    await client.handle.transport.start()
    return client


def _order() -> PaymentOrder:
    return PaymentOrder(payment_id="pay_cutshort", amount=1000, currency="EUR", capture=True,
                        merchant_reference="m-cut", card=Card(number=Secret("4242424242424242"), exp_month=3,
                                                              exp_year=2030, cvc=Secret("123")))


async def test_a_429_between_two_failures_does_not_clear_them(stripes, dev_certs) -> None:
    """A 429 is the account's quota, not the provider's health: no verdict. It counted as a
    success, resetting the count, so 503s mixed with 429s never tripped the breaker."""
    client = await _primary_client(stripes, dev_certs)

    async def authorize(key: str) -> str | None:
        attempt = client.new_attempt(Operation.AUTHORIZE, 1, key)
        return (await client.call(Operation.AUTHORIZE, _order(), key, time.monotonic() + 5, attempt)).raw_code

    try:
        set_faults(stripes["primary"], FaultRule(kind="error", status=503, operations=("authorize",)))
        await authorize("k1")
        set_faults(stripes["primary"], FaultRule(kind="rate_limit", retry_after_s=0.05, operations=("authorize",)))
        await authorize("k2")
        assert client.handle.breaker.state == "closed" and client.handle.held_off_s() > 0
        await asyncio.sleep(client.handle.held_off_s() + 0.01)  # time itself: the 429's Retry-After
        set_faults(stripes["primary"], FaultRule(kind="error", status=503, operations=("authorize",)))
        await authorize("k3")
        assert client.handle.breaker.state == "open", "the second 503 trips it: the 429 between cleared nothing"
    finally:
        await client.handle.transport.close()


async def test_a_timeout_the_deadline_cut_short_neither_counts_nor_clears_the_providers_failures(
        stripes, dev_certs) -> None:
    """A try the caller's deadline cut under half of timeout_ms timed out: the provider had far
    less time than it is given, so no verdict (it counted as a success, resetting the count of a
    failing provider's timeouts). One that had most of its time is judged: a review showed eight
    read timeouts in a row at 450 of 500 ms leaving the breaker closed."""
    client = await _primary_client(stripes, dev_certs)
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=1000, operations=("authorize",)))
    order = _order()

    async def authorize(seconds_left: float, key: str) -> str | None:
        attempt = client.new_attempt(Operation.AUTHORIZE, 1, key)
        result = await client.call(Operation.AUTHORIZE, order, key, time.monotonic() + seconds_left, attempt)
        return result.raw_code

    try:
        assert await authorize(5.0, "k1") == "read_timeout"  # the provider's own 300 ms: a failure
        assert await authorize(0.1, "k2") == "read_timeout"  # cut to 100 ms, under half its 300 ms
        assert client.handle.breaker.state == "closed"
        assert await authorize(0.2, "k2b") == "read_timeout"  # 200 ms, most of its time: judged
        assert client.handle.breaker.state == "open", "a hanging provider trips whatever the deadlines"
    finally:
        await client.handle.transport.close()


async def test_an_attempt_admitted_before_a_trip_gives_no_verdict_after_it() -> None:
    """Review of the guard: a call admitted while closed that ends after the breaker tripped and
    its reset elapsed acted as a second trial (its success closed the breaker while the real
    trial was out), and a success ending under an operator's hold turned the state closed."""
    breaker = ProviderBreaker("primary", fail_max=1, reset_timeout_s=0.0)
    stale_in, stale_out = asyncio.Event(), asyncio.Event()

    async def stale() -> None:
        async with breaker.guard():
            stale_in.set()
            await stale_out.wait()

    task = asyncio.create_task(stale())
    await stale_in.wait()
    with pytest.raises(ProviderFailure):
        async with breaker.guard():
            raise ProviderFailure("a 503")  # trips; the reset (0 s) has elapsed at once
    assert breaker.state == "open"
    stale_out.set()
    await task  # its success lands after the trip
    assert breaker.state == "open", "only a trial admitted after the trip may close it"

    breaker = ProviderBreaker("primary", fail_max=5, reset_timeout_s=60)
    stale_in, stale_out = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(stale())
    await stale_in.wait()
    breaker.force_open(hold=True)  # an operator drains the provider
    stale_out.set()
    await task
    assert breaker.held_open and breaker.state == "open"


async def test_a_trial_without_a_verdict_leaves_the_next_call_as_the_trial() -> None:
    breaker = ProviderBreaker("primary", fail_max=1, reset_timeout_s=0.0)
    breaker.force_open()
    with pytest.raises(NoVerdict):
        async with breaker.guard():
            raise NoVerdict("no connection in time")
    assert breaker.allows_call() and breaker.state != "closed"  # neither closed nor re-opened
    async with breaker.guard():
        pass  # the provider answered
    assert breaker.state == "closed"
    breaker.force_open()
    with pytest.raises(ProviderFailure):
        async with breaker.guard():
            raise ProviderFailure("still down")
    assert breaker.state == "open"


# -- bulkhead ------------------------------------------------------------------------------------


async def test_full_bulkhead_moves_on_to_backup_without_calling(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"bulkhead": {"max_concurrent": 1,
                                                                                   "max_queue": 0}}}))
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=200, operations=("authorize",)))

    answers = await asyncio.gather(*(pay(client) for _ in range(4)))

    docs = [doc for _, doc in answers]
    assert all(status == 201 and doc["status"] == "approved" for status, doc in answers)
    assert sorted(doc["provider"] for doc in docs) == ["backup"] * 3 + ["primary"]
    assert len(stripes["primary"].emulator.ledger.snapshot()["entries"]) == 1
    for doc in docs:
        if doc["provider"] == "backup":
            first = doc["attempts"][0]
            assert (first["provider"], first["raw_code"]) == ("primary", "bulkhead_full")
            assert [a["provider"] for a in doc["attempts"]].count("primary") == 1  # not retried
    assert (await readiness(client))["primary"]["breaker"] == "closed"  # a full bulkhead is not a failure


async def test_an_operator_hold_keeps_the_breaker_open_past_its_reset_timeout() -> None:
    """Draining a provider for maintenance: no trial call may reach it until released."""
    breaker = ProviderBreaker("primary", fail_max=3, reset_timeout_s=0.0)
    breaker.force_open(hold=True)
    assert not breaker.allows_call()  # the reset timeout (0 s) has long passed
    with pytest.raises(BreakerOpen):
        async with breaker.guard():
            pass
    breaker.force_close()
    assert breaker.allows_call()
    async with breaker.guard():
        pass
    assert breaker.state == "closed"


async def test_waiting_for_a_bulkhead_slot_ends_at_the_deadline() -> None:
    import asyncio
    import time

    from gateway.bulkhead import Bulkhead, BulkheadTimeout

    bulkhead = Bulkhead(max_concurrent=1, max_queue=5)
    release = asyncio.Event()

    async def hold() -> None:
        async with bulkhead.slot(time.monotonic() + 5):
            await release.wait()

    holder = asyncio.create_task(hold())
    while bulkhead.active == 0:
        await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(BulkheadTimeout):
        async with bulkhead.slot(time.monotonic() + 0.05):
            pass
    assert time.monotonic() - started < 1.0
    assert bulkhead.waiting == 0
    release.set()
    await holder
