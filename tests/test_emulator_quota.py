"""The emulators enforce an account quota with each provider's own 429, over real HTTP.

Each emulator runs on loopback with a token bucket (emulators/quota.py); requests are built,
sent and classified by the gateway's own provider client (tests/gateway_calls.py), so the test
also proves the gateway reads every provider's quota answer as `unavailable` (never charged,
safe to fail over). The limits are low (a few requests a second) so that a request sent right
after another is past the quota however loaded the machine is; the recovery waits for the
bucket's refill, which is the behaviour under test and bounded by the answer's own hint.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from domain.outcome import Outcome
from domain.secret import Secret
from domain.types import Card, Operation, PaymentOrder
from emulators.quota import Quota, QuotaPlan
from emulators.server import EmulatorServer
from gateway.drill.process import child_env, free_port
from gateway.emulator_launch import start_emulator
from providers.base import ProviderResponse
from tests.gateway_calls import GatewayCalls, start_client

KINDS = ("stripe", "adyen", "checkout")
RECOVERY_LIMIT_S = 5.0
_seq = itertools.count()


def order() -> PaymentOrder:
    pid = f"pay_quota_{next(_seq)}"
    return PaymentOrder(payment_id=pid, amount=1000, currency="EUR", capture=True, merchant_reference=f"ref-{pid}",
                        card=Card(number=Secret("4242424242424242"), exp_month=3, exp_year=2030, cvc=Secret("737"),
                                  holder_name="J Smith"))


async def emulator_and_client(kind: str, quota: QuotaPlan | None) -> tuple[EmulatorServer, GatewayCalls]:
    server = await start_emulator(kind, quota=quota)
    client = await start_client(kind, server.url, merchant_account="GatewayTestECOM")
    return server, GatewayCalls(client)


@pytest.fixture(params=KINDS)
async def limited(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, EmulatorServer, GatewayCalls]]:
    """An emulator launched with a quota of 2 requests a second, 3 back to back."""
    server, calls = await emulator_and_client(request.param, QuotaPlan(rate_limit_per_s=2, burst=3))
    try:
        yield request.param, server, calls
    finally:
        await calls.close()
        await server.stop()


async def wire(calls: GatewayCalls, payment: PaymentOrder, key: str) -> ProviderResponse:
    return await calls.transport.send(calls.mapping.build(Operation.AUTHORIZE, payment, key), 2.0)


def assert_provider_shape(kind: str, answer: ProviderResponse) -> None:
    """Each provider's documented rate-limit answer."""
    assert answer.status == 429
    if kind == "stripe":  # docs.stripe.com/rate-limits: the reason header, no Retry-After
        assert orjson.loads(answer.body)["error"]["code"] == "rate_limit"
        assert answer.headers["Stripe-Rate-Limited-Reason"] == "global-rate"
        assert "Retry-After" not in answer.headers
    elif kind == "checkout":  # a 429 with no body; Retry-After tells it from a key still in flight
        assert answer.body == b"" and answer.headers["Cko-Request-Id"] and float(answer.headers["Retry-After"]) > 0
    else:  # Adyen: an internal-type error saying "too many requests"
        doc = orjson.loads(answer.body)
        assert (doc["status"], doc["errorType"]) == (429, "internal")
        assert "too many requests" in doc["message"].lower()


async def test_past_the_quota_each_provider_answers_its_429_and_charges_nothing(
        limited: tuple[str, EmulatorServer, GatewayCalls]) -> None:
    kind, server, calls = limited
    outcomes = [await calls.call(Operation.AUTHORIZE, order(), f"k-{i}") for i in range(3)]
    assert [r.outcome for r in outcomes] == [Outcome.APPROVED] * 3  # the burst
    refused = order()
    over = await calls.call(Operation.AUTHORIZE, refused, "k-over")
    assert over.outcome is Outcome.UNAVAILABLE and over.http_status == 429
    assert_provider_shape(kind, await wire(calls, order(), "k-wire"))
    assert len(server.emulator.ledger.charges()) == 3  # a 429 is answered before processing
    assert server.emulator.quota.limited >= 2


async def test_the_quota_recovers_and_the_refused_key_is_processed_afresh(
        limited: tuple[str, EmulatorServer, GatewayCalls]) -> None:
    _kind, server, calls = limited
    for i in range(3):
        await calls.call(Operation.AUTHORIZE, order(), f"k-{i}")
    refused = order()
    assert (await calls.call(Operation.AUTHORIZE, refused, "k-again")).http_status == 429
    started = time.monotonic()
    while True:  # bounded: the bucket refills one token every 0.5 s
        result = await calls.call(Operation.AUTHORIZE, refused, "k-again")
        if result.outcome is not Outcome.UNAVAILABLE:
            break
        assert time.monotonic() - started < RECOVERY_LIMIT_S, "the quota never recovered"
        await asyncio.sleep(0.05)  # the refill is time itself: there is no event to await
    assert result.outcome is Outcome.APPROVED
    assert time.monotonic() - started > 0.2  # recovered by the refill, not at once
    assert len(server.emulator.ledger.find_by_ref(refused.payment_id)) == 1  # the same key: one charge


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_requests_never_get_more_than_the_quota(kind: str) -> None:
    server, calls = await emulator_and_client(kind, QuotaPlan(rate_limit_per_s=1, burst=4))
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(calls.call(Operation.AUTHORIZE, order(), f"c-{i}") for i in range(12)))
        elapsed = time.monotonic() - started
        approved = sum(r.outcome is Outcome.APPROVED for r in results)
        assert 4 <= approved <= 4 + int(elapsed * 1) + 1
        assert all(r.outcome in (Outcome.APPROVED, Outcome.UNAVAILABLE) for r in results)
        assert len(server.emulator.ledger.charges()) == approved
    finally:
        await calls.close()
        await server.stop()


async def test_the_control_api_sets_reads_and_clears_the_quota() -> None:
    server, calls = await emulator_and_client("stripe", None)
    url = f"{server.admin_url}/_emulator/quota"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert (await resp.json())["plan"]["rate_limit_per_s"] is None
            async with http.put(url, json={"rate_limit_per_s": 0}) as resp:
                assert resp.status == 422  # validated: a quota of zero would refuse everything
            async with http.put(url, json={"burst": 5}) as resp:
                assert resp.status == 422  # a burst with no rate is no plan
            async with http.put(url, json={"rate_limit_per_s": 1, "burst": 1}) as resp:
                assert resp.status == 200
            first = await calls.call(Operation.AUTHORIZE, order(), "a-1")
            second = await calls.call(Operation.AUTHORIZE, order(), "a-2")
            assert (first.outcome, second.outcome) == (Outcome.APPROVED, Outcome.UNAVAILABLE)
            async with http.get(url) as resp:
                doc = await resp.json()
                assert doc["plan"] == {"rate_limit_per_s": 1.0, "burst": 1} and doc["limited"] == 1
            async with http.delete(url) as resp:
                assert resp.status == 200
            # On the wire (the gateway's client now holds the provider off for its 429's wait):
            # the emulator's quota is gone, every request is answered.
            answers = [await wire(calls, order(), f"a-{i}") for i in range(3, 8)]
            assert [a.status for a in answers] == [200] * 5
    finally:
        await calls.close()
        await server.stop()


async def test_the_cli_launches_an_emulator_with_its_quota() -> None:
    port = free_port("127.0.0.1")
    admin = free_port("127.0.0.1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "emulator", "checkout", "--port", str(port), "--admin-port", str(admin),
        "--no-tls", "--rate-limit-per-s", "25", "--burst", "50", env=child_env({}),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        doc = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            deadline = time.monotonic() + 30
            while doc is None and time.monotonic() < deadline and proc.returncode is None:
                try:
                    async with http.get(f"http://127.0.0.1:{admin}/_emulator/quota") as resp:
                        doc = await resp.json()
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.05)  # the child is still starting: no event crosses processes
        assert doc is not None, "the emulator did not come up"
        assert doc["plan"] == {"rate_limit_per_s": 25.0, "burst": 50}
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def test_the_bucket_refills_at_its_rate_and_holds_at_most_its_burst() -> None:
    now = [0.0]
    quota = Quota(clock=lambda: now[0])
    quota.set(QuotaPlan(rate_limit_per_s=10, burst=2))
    assert [quota.take() for _ in range(3)][:2] == [None, None]
    assert quota.limited == 1
    now[0] += 0.1  # one token
    assert quota.take() is None and quota.take() == pytest.approx(0.1)
    now[0] += 60  # a long quiet spell still holds only the burst
    assert [quota.take() is None for _ in range(3)] == [True, True, False]
    assert QuotaPlan(rate_limit_per_s=25).capacity == 25  # default burst: one second's worth
