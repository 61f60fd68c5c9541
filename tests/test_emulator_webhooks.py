"""The emulators send webhooks like the real providers: real emulators on loopback, driven by
the gateway's own provider calls, posting to a small aiohttp receiver in the test.

What proves the signatures are the providers' own: the official SDKs verify them
(`stripe.Webhook.construct_event`, Adyen's `Adyen.util.is_valid_hmac_notification`) and
Checkout.com's documented scheme (hex HMAC-SHA256 of the raw body) is computed here, and all
three reject a notification once one byte of a signed value is changed. Retry schedules run
compressed by `WebhookTarget.time_factor`, so their intervals are measured in tenths of seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import Adyen.util
import orjson
import pytest
import stripe
from aiohttp import ClientSession, web

from domain.outcome import Outcome
from domain.secret import Secret
from domain.types import Card, FollowUp, Operation, PaymentOrder, ProviderResult
from emulators.faults import FaultPlan, FaultRule
from emulators.registry import EMULATORS
from emulators.server import EmulatorServer
from emulators.webhooks import WebhookSender, WebhookTarget
from gateway.certs.devca import DevCertLayout
from gateway.certs.tls import client_context, server_context
from gateway.emulator_launch import start_emulator
from providers.registry import KINDS
from tests.gateway_calls import GatewayCalls, start_client

SECRETS = {"stripe": "whsec_emulator_webhook_test",
           "adyen": "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056",
           "checkout": "cko-webhook-signature-key"}
# Compressions that make each provider's first two retry waits a few tenths of a second:
# Adyen 9 s, 9 s; Checkout.com 5 m, 10 m; Stripe 1 m, 2 m.
FACTORS = {"stripe": 0.0025, "adyen": 0.02, "checkout": 0.0005}
WAIT_S = 10.0  # the longest any test waits for one notification


# -- each provider's scheme, verified the provider's way ----------------------------------------


def verified(kind: str, headers: dict[str, str], body: bytes, secret: str | None = None) -> bool:
    secret = secret or SECRETS[kind]
    if kind == "stripe":
        try:
            stripe.Webhook.construct_event(body, headers.get("Stripe-Signature"), secret)
        except stripe.SignatureVerificationError:
            return False
        return True
    if kind == "adyen":
        return bool(Adyen.util.is_valid_hmac_notification(orjson.loads(body), secret))
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("Cko-Signature", ""), expected)


def _doc(kind: str, body: bytes) -> dict[str, Any]:
    doc = orjson.loads(body)
    return doc["notificationItems"][0]["NotificationRequestItem"] if kind == "adyen" else doc


def label(kind: str, body: bytes) -> str:
    """The event type; Adyen's eventCode with its success flag."""
    doc = _doc(kind, body)
    return f"{doc['eventCode']}:{doc['success']}" if kind == "adyen" else doc["type"]


def event_key(kind: str, body: bytes) -> str:
    """What a receiver deduplicates on (Adyen has no event id: pspReference and eventCode)."""
    doc = _doc(kind, body)
    return f"{doc['pspReference']}:{doc['eventCode']}" if kind == "adyen" else doc["id"]


def payment_of(kind: str, body: bytes) -> str:
    """The provider's id of the payment the notification is about."""
    doc = _doc(kind, body)
    if kind == "adyen":
        return doc.get("originalReference") or doc["pspReference"]
    if kind == "stripe":
        obj = doc["data"]["object"]
        return obj["payment_intent"] if obj["object"] == "refund" else obj["id"]
    return doc["data"]["id"]


AUTHORISED = {"stripe": "payment_intent.amount_capturable_updated", "adyen": "AUTHORISATION:true",
              "checkout": "payment_approved"}


# -- the receiver and the rig ----------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    status: int


@dataclass
class Receiver:
    """Answers each POST with the next of `answers` (then 200); with `check`, 401 to a
    notification whose signature does not verify; `hold` keeps the first answer back."""

    kind: str
    answers: list[int] = field(default_factory=list)
    check: bool = False
    hold: asyncio.Event | None = None
    queue: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        status = self.answers.pop(0) if self.answers else 200
        if self.check and not verified(self.kind, headers, body):
            status = 401
        await self.queue.put(Received(headers, body, time.monotonic(), status))
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
        return web.Response(status=status, text="[accepted]" if status == 200 else "refused")

    async def next(self) -> Received:
        return await asyncio.wait_for(self.queue.get(), WAIT_S)

    async def take(self, n: int) -> list[Received]:
        return [await self.next() for _ in range(n)]


@dataclass
class Rig(GatewayCalls):
    kind: str
    server: EmulatorServer
    receiver: Receiver
    url: str

    @property
    def webhooks(self) -> WebhookSender:
        return self.server.emulator.webhooks

    def faults(self, *rules: FaultRule) -> None:
        self.server.emulator.faults.set(FaultPlan(rules=rules))

    async def pay(self, *, scenario: str = "approve", amount: int = 1000, capture: bool = False,
                  timeout_s: float = 2.0) -> tuple[PaymentOrder, ProviderResult]:
        o = order(EMULATORS[self.kind].scenario_cards()[scenario], amount=amount, capture=capture)
        return o, await self.call(Operation.AUTHORIZE, o, f"{o.payment_id}-auth", timeout_s=timeout_s)

    async def follow_up(self, op: Operation, o: PaymentOrder, reference: str | None,
                        amount: int | None = None) -> ProviderResult:
        key = f"{o.payment_id}-{op.value}"
        subject = FollowUp(payment_id=o.payment_id, provider_reference=reference, amount=amount, currency="EUR",
                           follow_up_id=key)
        return await self.call(op, subject, key)


_seq = iter(range(1, 1_000_000))


def order(card: str, *, amount: int, capture: bool) -> PaymentOrder:
    pid = f"pay_hooks_{next(_seq)}"
    return PaymentOrder(payment_id=pid, amount=amount, currency="EUR", capture=capture, merchant_reference=f"ref-{pid}",
                        card=Card(number=Secret(card), exp_month=3, exp_year=2030, cvc=Secret("737"),
                                  holder_name="J Smith"))


async def _receiver_url(aiohttp_server: Callable[..., Any], receiver: Receiver, **kwargs: Any) -> str:
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    server = await aiohttp_server(app, **kwargs)
    return str(server.make_url("/hooks"))


@pytest.fixture(params=sorted(KINDS))
async def rig(request: pytest.FixtureRequest, aiohttp_server: Callable[..., Any]) -> AsyncIterator[Rig]:
    async with _rig(request.param, aiohttp_server) as r:
        yield r


@pytest.fixture
async def adyen(aiohttp_server: Callable[..., Any]) -> AsyncIterator[Rig]:
    async with _rig("adyen", aiohttp_server) as r:
        yield r


@asynccontextmanager
async def _rig(kind: str, aiohttp_server: Callable[..., Any]) -> AsyncIterator[Rig]:
    """A plain-HTTP emulator of `kind` posting to a fresh receiver, compressed by FACTORS."""
    receiver = Receiver(kind)
    url = await _receiver_url(aiohttp_server, receiver)
    server = EmulatorServer(EMULATORS[kind].emulator())
    server.emulator.webhooks.set_target(WebhookTarget(url=url, secret=SECRETS[kind], time_factor=FACTORS[kind]))
    await server.start()
    try:
        client = await start_client(kind, server.url, merchant_account="GatewayTestECOM")
        r = Rig(client, kind, server, receiver, url)
        try:
            yield r
        finally:
            await r.close()
    finally:
        await server.stop()


def scheduled_waits(rig: Rig) -> tuple[float, ...]:
    return tuple(w * FACTORS[rig.kind] for w in rig.webhooks.schedule.waits_s)


# -- signatures and shapes -----------------------------------------------------------------------


async def test_the_official_sdks_accept_a_notification_and_reject_it_once_a_byte_changes(rig: Rig) -> None:
    _, auth = await rig.pay(amount=1234)
    got = await rig.receiver.next()
    assert label(rig.kind, got.body) == AUTHORISED[rig.kind]
    assert payment_of(rig.kind, got.body) == auth.reference
    assert verified(rig.kind, got.headers, got.body)
    assert b"1234" in got.body
    assert not verified(rig.kind, got.headers, got.body.replace(b"1234", b"1235", 1))
    assert not verified(rig.kind, got.headers, got.body, secret={"adyen": "00" * 32}.get(rig.kind, "whsec_other"))


async def test_each_operation_notifies_with_the_providers_event(rig: Rig) -> None:
    o, auth = await rig.pay()
    seen = [await rig.receiver.next()]
    for op, amount in ((Operation.CAPTURE, 1000), (Operation.REFUND, 400)):
        assert (await rig.follow_up(op, o, auth.reference, amount)).outcome is Outcome.APPROVED
        seen.append(await rig.receiver.next())
    o2, auth2 = await rig.pay()
    seen.append(await rig.receiver.next())
    assert (await rig.follow_up(Operation.VOID, o2, auth2.reference)).outcome is Outcome.APPROVED
    seen.append(await rig.receiver.next())
    await rig.pay(scenario="stolen_card")
    seen.append(await rig.receiver.next())
    expected = {
        "stripe": ["payment_intent.amount_capturable_updated", "payment_intent.succeeded", "refund.created",
                   "payment_intent.amount_capturable_updated", "payment_intent.canceled",
                   "payment_intent.payment_failed"],
        "adyen": ["AUTHORISATION:true", "CAPTURE:true", "REFUND:true", "AUTHORISATION:true", "CANCELLATION:true",
                  "AUTHORISATION:false"],
        "checkout": ["payment_approved", "payment_captured", "payment_refunded", "payment_approved",
                     "payment_voided", "payment_declined"],
    }[rig.kind]
    assert [label(rig.kind, r.body) for r in seen] == expected
    assert all(verified(rig.kind, r.headers, r.body) for r in seen)
    assert [payment_of(rig.kind, r.body) for r in seen[:5]] == [auth.reference] * 3 + [auth2.reference] * 2
    assert len({event_key(rig.kind, r.body) for r in seen}) == len(seen)


async def test_an_authorisation_whose_answer_timed_out_is_still_notified(rig: Rig) -> None:
    rig.faults(FaultRule(kind="timeout_after", operations=("authorize",), hang_s=5))
    _, auth = await rig.pay(timeout_s=0.3)
    assert auth.outcome is Outcome.UNKNOWN
    got = await rig.receiver.next()
    assert label(rig.kind, got.body) == AUTHORISED[rig.kind] and verified(rig.kind, got.headers, got.body)


# -- the retry schedule ----------------------------------------------------------------------------


async def test_a_500_is_retried_on_the_providers_compressed_schedule_until_a_200(rig: Rig) -> None:
    rig.receiver.answers = [500, 500]
    await rig.pay()
    first, second, third = await rig.receiver.take(3)
    assert [r.status for r in (first, second, third)] == [500, 500, 200]
    assert len({event_key(rig.kind, r.body) for r in (first, second, third)}) == 1
    waits = scheduled_waits(rig)
    for (before, after), wait in zip(((first, second), (second, third)), waits):
        assert wait * 0.9 <= after.at - before.at < wait + 3.0
    await rig.webhooks.idle()
    attempts = [(d.attempt, d.status) for d in rig.webhooks.deliveries()]
    assert attempts == [(1, 500), (2, 500), (3, 200)]
    assert [e.state for e in rig.webhooks.emitted()] == ["delivered"]


async def test_a_receiver_that_does_not_answer_in_time_gets_the_notification_again(rig: Rig) -> None:
    rig.webhooks.set_target(WebhookTarget(url=rig.url, secret=SECRETS[rig.kind], time_factor=FACTORS[rig.kind],
                                          timeout_s=0.2))
    rig.receiver.hold = asyncio.Event()
    held = rig.receiver.hold
    await rig.pay()
    first, retry = await rig.receiver.take(2)
    held.set()
    assert event_key(rig.kind, first.body) == event_key(rig.kind, retry.body)
    await rig.webhooks.idle()
    assert [(d.attempt, d.error, d.status) for d in rig.webhooks.deliveries()] == [
        (1, "TimeoutError", None), (2, None, 200)]


async def test_the_schedules_are_the_documented_ones() -> None:
    stripe_waits = EMULATORS["stripe"].emulator().webhooks.schedule.waits_s
    adyen_waits = EMULATORS["adyen"].emulator().webhooks.schedule.waits_s
    checkout_waits = EMULATORS["checkout"].emulator().webhooks.schedule.waits_s
    assert adyen_waits[:12] == (9, 9, 9, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800)
    assert set(adyen_waits[12:]) == {28800} and sum(adyen_waits) <= 30 * 86400 < sum(adyen_waits) + 28800
    assert checkout_waits == (300, 600, 900, 1800, 3600, 14400, 43200, 43200)
    assert stripe_waits[:3] == (60, 120, 240) and sum(stripe_waits) <= 3 * 86400
    assert all(b >= a for a, b in zip(stripe_waits, stripe_waits[1:]))


# -- webhook faults ----------------------------------------------------------------------------------


async def test_webhook_delay_holds_the_notification_back(rig: Rig) -> None:
    rig.faults(FaultRule(kind="webhook_delay", latency_ms=400))
    await rig.pay()
    answered = time.monotonic()
    got = await rig.receiver.next()
    assert got.at - answered >= 0.35


async def test_webhook_duplicate_delivers_the_same_event_twice(rig: Rig) -> None:
    rig.faults(FaultRule(kind="webhook_duplicate", copies=1))
    await rig.pay()
    one, two = await rig.receiver.take(2)
    assert one.body == two.body or rig.kind == "stripe"  # Stripe re-signs each delivery
    assert event_key(rig.kind, one.body) == event_key(rig.kind, two.body)
    assert verified(rig.kind, one.headers, one.body) and verified(rig.kind, two.headers, two.body)
    await rig.webhooks.idle()
    assert sorted(d.copy for d in rig.webhooks.deliveries()) == ["duplicate", "original"]


async def test_webhook_reorder_delivers_a_capture_before_its_authorisation(rig: Rig) -> None:
    rig.faults(FaultRule(kind="webhook_reorder", operations=("authorize",), hang_s=WAIT_S))
    o, auth = await rig.pay()
    assert (await rig.follow_up(Operation.CAPTURE, o, auth.reference, 1000)).outcome is Outcome.APPROVED
    first, second = await rig.receiver.take(2)
    captured = {"stripe": "payment_intent.succeeded", "adyen": "CAPTURE:true", "checkout": "payment_captured"}
    assert [label(rig.kind, first.body), label(rig.kind, second.body)] == [captured[rig.kind], AUTHORISED[rig.kind]]


async def test_webhook_drop_loses_deliveries_that_the_schedule_then_retries(rig: Rig) -> None:
    rig.faults(FaultRule(kind="webhook_drop", drops=2))
    await rig.pay()
    emitted_at = time.monotonic()
    got = await rig.receiver.next()
    waits = scheduled_waits(rig)
    assert got.at - emitted_at >= (waits[0] + waits[1]) * 0.9
    await rig.webhooks.idle()
    assert [(d.attempt, d.error, d.status) for d in rig.webhooks.deliveries()] == [
        (1, "dropped", None), (2, "dropped", None), (3, None, 200)]


async def test_webhook_forge_adds_a_tampered_copy_that_does_not_verify(rig: Rig) -> None:
    rig.receiver.check = True
    rig.faults(FaultRule(kind="webhook_forge"))
    await rig.pay()
    deliveries = await rig.receiver.take(2)
    genuine = [r for r in deliveries if r.status == 200]
    forged = [r for r in deliveries if r.status == 401]
    assert len(genuine) == len(forged) == 1
    assert label(rig.kind, genuine[0].body) == AUTHORISED[rig.kind]
    assert label(rig.kind, forged[0].body) != AUTHORISED[rig.kind]  # the outcome turned around
    await rig.webhooks.idle()
    assert sorted((d.copy, d.status) for d in rig.webhooks.deliveries()) == [("forged", 401), ("original", 200)]


# -- modifications that fail by notification ---------------------------------------------------------


async def test_a_modification_declined_by_notification_is_never_in_the_ledger(rig: Rig) -> None:
    # Stripe captures synchronously; its refunds are what can fail after being accepted.
    op = Operation.REFUND if rig.kind == "stripe" else Operation.CAPTURE
    o, auth = await rig.pay(capture=rig.kind == "stripe")
    await rig.receiver.take(1)
    rig.faults(FaultRule(kind="fail_by_notification", operations=(op.value,)))
    accepted = await rig.follow_up(op, o, auth.reference, 1000)
    assert accepted.outcome is Outcome.APPROVED  # accepted (received / 202 / pending), not yet done
    expected = {"stripe": ["refund.created", "refund.failed"], "adyen": ["CAPTURE:false"],
                "checkout": ["payment_capture_declined"]}[rig.kind]
    got = await rig.receiver.take(len(expected))
    assert [label(rig.kind, r.body) for r in got] == expected
    assert all(verified(rig.kind, r.headers, r.body) for r in got)
    entry = rig.server.emulator.ledger.get(auth.reference or "")
    assert entry is not None and entry.refunded == 0
    assert entry.captured == (1000 if rig.kind == "stripe" else 0)
    if rig.mapping.has_status_lookup:  # Adyen has none: its notification above is the only report
        status = await rig.status(FollowUp(payment_id=o.payment_id, provider_reference=auth.reference,
                                           follow_up_id=f"{o.payment_id}-{op.value}"))
        assert [(f.operation, f.outcome) for f in status.follow_ups if f.operation is op] == [
            (op, Outcome.HARD_DECLINE)]


async def test_an_adyen_refund_can_succeed_then_fail_later(adyen: Rig) -> None:
    rig = adyen
    o, auth = await rig.pay(capture=True)
    await rig.receiver.take(1)
    rig.faults(FaultRule(kind="fail_by_notification", operations=("refund",), reported_as="failed_later",
                         decline_code="Refused by the scheme"))
    assert (await rig.follow_up(Operation.REFUND, o, auth.reference, 1000)).outcome is Outcome.APPROVED
    got = await rig.receiver.take(2)
    assert [label("adyen", r.body) for r in got] == ["REFUND:true", "REFUND_FAILED:true"]
    assert _doc("adyen", got[1].body)["reason"] == "Refused by the scheme"
    assert rig.server.emulator.ledger.get(auth.reference or "").refunded == 0  # type: ignore[union-attr]


# -- configuration and lifetime ------------------------------------------------------------------


async def test_the_target_is_set_over_the_control_api(rig: Rig) -> None:
    rig.webhooks.set_target(None)
    await rig.pay()
    assert [e.state for e in rig.webhooks.emitted()] == ["no_target"]
    admin = f"{rig.server.admin_url}/_emulator/webhooks"
    async with ClientSession() as http:
        bad = await http.put(f"{admin}/target", json={"url": rig.url, "secret": "not hex!"})
        assert bad.status == (422 if rig.kind == "adyen" else 200)
        ok = await http.put(f"{admin}/target", json={"url": rig.url, "secret": SECRETS[rig.kind]})
        assert ok.status == 200
        await rig.pay()
        got = await rig.receiver.next()
        assert verified(rig.kind, got.headers, got.body)
        await rig.webhooks.idle()
        snapshot = await (await http.get(admin)).read()
        requests = orjson.loads(await (await http.get(f"{rig.server.admin_url}/_emulator/requests")).read())
    assert requests == {"by_operation": {"authorize": 2}}  # what a drill reads to count status queries
    assert SECRETS[rig.kind].encode() not in snapshot
    doc = orjson.loads(snapshot)
    assert doc["target"]["url"] == rig.url
    assert [e["state"] for e in doc["events"]] == ["no_target", "delivered"]
    assert [d["accepted"] for d in doc["deliveries"]] == [True]


async def test_stopping_the_emulator_stops_its_retries(rig: Rig) -> None:
    rig.receiver.answers = [500] * 1000
    await rig.pay()
    await rig.receiver.next()
    await rig.server.stop()
    assert rig.webhooks.in_flight == 0
    assert [e.state for e in rig.webhooks.emitted()] == ["cancelled"]


async def test_a_launched_emulator_posts_to_an_https_gateway_signed_by_the_dev_ca(
        dev_certs: DevCertLayout, aiohttp_server: Callable[..., Any]) -> None:
    receiver = Receiver("stripe", check=True)
    url = await _receiver_url(aiohttp_server, receiver,
                              ssl=server_context(dev_certs.server_cert(), dev_certs.server_key()))
    assert url.startswith("https://")
    server = await start_emulator("stripe", certs=dev_certs,
                                  webhook=WebhookTarget(url=url, secret=SECRETS["stripe"]))
    try:
        tls = client_context(dev_certs.provider_ca("stripe"), dev_certs.client_cert("stripe"),
                             dev_certs.client_key("stripe"))
        async with ClientSession() as http:
            answer = await http.post(f"{server.url}/v1/payment_intents", ssl=tls,
                                     headers={"Authorization": "Bearer sk_test_launch"},
                                     data={"amount": "700", "currency": "eur", "payment_method": "pm_card_visa"})
            assert answer.status == 200
        got = await receiver.next()
        assert got.status == 200 and label("stripe", got.body) == "payment_intent.succeeded"
    finally:
        await server.stop()
