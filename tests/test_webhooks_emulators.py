"""The emulators' own signed notifications, delivered to the real gateway over HTTP, with their
faults (duplicates, forgeries, drops, reordering, modifications refused by notification): every
payment and follow-up ends where the provider's ledger says, and no forged delivery is taken."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from emulators.webhooks import WebhookTarget
from gateway.app_keys import NOTIFICATION_SENDER, WEBHOOKS
from tests.conftest import card_payment, charges, idem, journal, pay
from tests.notification_receiver import SECRET, SECRET_ENV, Receiver, notifications_config
from tests.webhook_shapes import ADYEN_HMAC, CHECKOUT_SECRET, STRIPE_SECRET, WEBHOOK_ENV, WEBHOOK_PROVIDERS

SECRETS = {"stripe": STRIPE_SECRET, "adyen": ADYEN_HMAC, "checkout": CHECKOUT_SECRET}
CHAOS = (FaultRule(kind="webhook_duplicate", copies=2), FaultRule(kind="webhook_forge"),
         FaultRule(kind="webhook_drop", drops=1, share=0.5))


@pytest.fixture(autouse=True)
def _webhook_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in WEBHOOK_ENV.items():
        monkeypatch.setenv(name, value)


async def wired(make_config, start_gateway, emulators: dict[str, EmulatorServer],  # type: ignore[no-untyped-def]
                order: tuple[str, ...]) -> TestClient:
    client = await start_gateway(make_config(order=order, providers=WEBHOOK_PROVIDERS), webhook_interval_s=3600)
    for kind, server in emulators.items():
        server.emulator.webhooks.set_target(WebhookTarget(url=str(client.make_url(f"/v1/webhooks/{kind}")),
                                                          secret=SECRETS[kind], time_factor=0.001))
    return client


def faults(server: EmulatorServer, *rules: FaultRule) -> None:
    server.emulator.faults.set(FaultPlan(rules=CHAOS + rules, seed=7))


async def delivered(client: TestClient, server: EmulatorServer) -> None:
    """Every notification delivered (or given up on), and everything journalled applied."""
    await server.emulator.webhooks.idle()
    await client.app[WEBHOOKS].processor.run_once()


async def follow_up(client: TestClient, pid: str, op: str, body: dict[str, Any] | None = None) -> int:
    return (await client.post(f"/v1/payments/{pid}/{op}", json=body or {}, headers=idem())).status


def forged_accepted(server: EmulatorServer) -> int:
    return sum(1 for d in server.emulator.webhooks.deliveries() if d.copy == "forged" and d.accepted)


async def test_adyen_settles_by_its_own_notifications_under_webhook_chaos(make_config, start_gateway,
                                                                       emulators) -> None:
    client = await wired(make_config, start_gateway, emulators, ("adyen", "stripe"))
    adyen = emulators["adyen"]
    faults(adyen, FaultRule(kind="error", status=500, after_processing=True, operations=("authorize",)),
           FaultRule(kind="fail_by_notification", operations=("refund",), reported_as="failed_later"))
    status, doc = await pay(client, card_payment(capture=False))
    assert doc["status"] == "pending"
    await delivered(client, adyen)
    assert (await journal(client, doc["id"])).status.value == "approved"

    assert await follow_up(client, doc["id"], "capture") == 202
    await delivered(client, adyen)
    record = await journal(client, doc["id"])
    assert (record.status.value, record.captured_amount) == ("captured", 1299)

    assert await follow_up(client, doc["id"], "refunds", {"amount": 400}) == 202
    await delivered(client, adyen)  # REFUND success, then REFUND_FAILED: the scheme rejected it
    record = await journal(client, doc["id"])
    [charge] = charges(adyen, doc["id"])
    assert (record.status.value, record.refunded_amount) == ("captured", charge.refunded) == ("captured", 0)
    assert record.captured_amount == charge.captured
    assert forged_accepted(adyen) == 0
    assert any(d.copy == "forged" and d.status == 401 for d in adyen.emulator.webhooks.deliveries())


async def test_a_checkout_capture_refused_by_notification_is_not_captured(make_config, start_gateway,
                                                                         emulators) -> None:
    client = await wired(make_config, start_gateway, emulators, ("checkout", "stripe"))
    checkout = emulators["checkout"]
    faults(checkout, FaultRule(kind="fail_by_notification", operations=("capture",)))
    _, doc = await pay(client, card_payment(capture=False))
    assert await follow_up(client, doc["id"], "capture") == 202
    await delivered(client, checkout)
    record = await journal(client, doc["id"])
    [charge] = charges(checkout, doc["id"])
    assert (record.status.value, record.captured_amount, charge.captured) == ("approved", 0, 0)
    assert forged_accepted(checkout) == 0


async def test_a_stripe_refund_refused_by_notification_is_not_refunded(make_config, start_gateway,
                                                                      emulators) -> None:
    client = await wired(make_config, start_gateway, emulators, ("stripe",))
    stripe = emulators["stripe"]
    faults(stripe, FaultRule(kind="fail_by_notification", operations=("refund",)))
    _, doc = await pay(client, card_payment())
    assert await follow_up(client, doc["id"], "refunds", {"amount": 300}) == 202  # Stripe: refund pending
    await delivered(client, stripe)
    record = await journal(client, doc["id"])
    [charge] = charges(stripe, doc["id"])
    assert (record.status.value, record.refunded_amount, charge.refunded) == ("approved", 0, 0)  # as before it
    assert forged_accepted(stripe) == 0


async def test_outcomes_settled_by_notification_are_told_to_the_checkout_once(make_config, start_gateway, emulators,
                                                                             monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The Adyen payment left pending and its capture answered `received`, each settled by the
    emulator's (duplicated) notifications: the merchant hears payment.approved and
    capture.succeeded, each once."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    receiver = await Receiver().start()
    try:
        client = await start_gateway(make_config(order=("adyen", "stripe"), providers=WEBHOOK_PROVIDERS,
                                                 notifications=notifications_config(receiver.url)),
                                     webhook_interval_s=3600)
        adyen = emulators["adyen"]
        adyen.emulator.webhooks.set_target(WebhookTarget(url=str(client.make_url("/v1/webhooks/adyen")),
                                                         secret=ADYEN_HMAC, time_factor=0.001))
        faults(adyen, FaultRule(kind="error", status=500, after_processing=True, operations=("authorize",)))
        _, doc = await pay(client, card_payment(capture=False))
        assert doc["status"] == "pending"
        await delivered(client, adyen)
        assert await follow_up(client, doc["id"], "capture") == 202
        await delivered(client, adyen)
        events = await receiver.wait_for(2)
        assert sorted(d.event["type"] for d in events) == ["capture.succeeded", "payment.approved"]
        assert {d.event["payment_id"] for d in events} == {doc["id"]}
        assert (await journal(client, doc["id"])).status.value == "captured"
        await client.app[WEBHOOKS].processor.run_once()
        await client.app[NOTIFICATION_SENDER].run_once()
        assert len(receiver.deliveries) == 2  # the duplicated notifications told nobody twice
    finally:
        await receiver.stop()


async def test_a_late_refund_failed_after_a_lookup_settled_the_refund_changes_nothing(make_config, start_gateway,
                                                                                     emulators) -> None:
    """Outside attack: the reconciler's lookup settled a pending Stripe refund as failed (never
    counted); the delayed `refund.failed` was then applied as "failed after it succeeded" and
    took its amount off the first refund's, so the journal said 100 refunded where Stripe held 300."""
    from gateway.app_keys import RECONCILER

    client = await wired(make_config, start_gateway, emulators, ("stripe",))
    stripe = emulators["stripe"]
    _, doc = await pay(client, card_payment(amount=1000))
    assert await follow_up(client, doc["id"], "refunds", {"amount": 300}) == 200
    faults(stripe, FaultRule(kind="fail_by_notification", operations=("refund",)),
           FaultRule(kind="webhook_delay", latency_ms=1500, operations=("refund",)))
    assert await follow_up(client, doc["id"], "refunds", {"amount": 200}) == 202  # Stripe: refund pending
    assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 1  # the lookup: failed
    record = await journal(client, doc["id"])
    assert (record.status.value, record.refunded_amount, record.follow_up) == ("refunded", 300, None)
    await stripe.emulator.webhooks.idle()  # the delayed refund.failed arrives
    await client.app[WEBHOOKS].processor.run_once()  # ... and now the notification
    record = await journal(client, doc["id"])
    [charge] = charges(stripe, doc["id"])
    assert (record.status.value, record.refunded_amount) == ("refunded", charge.refunded) == ("refunded", 300)


async def _adyen_resending(make_config, start_gateway,  # type: ignore[no-untyped-def]
                           emulators: dict[str, EmulatorServer], **adyen: Any) -> tuple[TestClient, EmulatorServer]:
    """A gateway with Adyen first, its notifications wired, and a call past 0.2 s no longer in
    flight (`engine.provider_in_flight_s`), so a pass can send a lost follow-up again."""
    providers = {**WEBHOOK_PROVIDERS, "adyen": {**WEBHOOK_PROVIDERS["adyen"], **adyen}}
    client = await start_gateway(make_config(order=("adyen", "stripe"), providers=providers,
                                             engine={"provider_in_flight_s": 0.2}), webhook_interval_s=3600)
    server = emulators["adyen"]
    server.emulator.webhooks.set_target(WebhookTarget(url=str(client.make_url("/v1/webhooks/adyen")),
                                                      secret=ADYEN_HMAC, time_factor=0.001))
    return client, server


@pytest.mark.parametrize(("op", "body", "capture"), [("capture", {"amount": 300}, False),
                                                     ("refunds", {"amount": 300}, True),
                                                     ("void", {}, False)])
async def test_an_adyen_follow_up_that_may_never_have_arrived_is_sent_again_under_its_key(
        make_config, start_gateway, emulators, op: str, body: dict[str, Any], capture: bool) -> None:
    """Outside attack: two connection resets on an Adyen capture (refund, void) left it
    `<op>_pending` for ever: Adyen has no lookup and notifies nothing it never received. The
    reconciler sends it again under the same key (Adyen replays a key's answer: made once either
    way), and its notification settles it."""
    from gateway.app_keys import RECONCILER

    client, adyen = await _adyen_resending(make_config, start_gateway, emulators)
    _, doc = await pay(client, card_payment(capture=capture, amount=1000))
    assert doc["status"] == "approved"
    await delivered(client, adyen)
    adyen.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="reset_before", operations=(op.rstrip("s"),)),)))
    resp = await client.post(f"/v1/payments/{doc['id']}/{op}", json=body, headers=idem())
    assert resp.status == 202, await resp.text()
    adyen.emulator.faults.clear()
    [charge] = charges(adyen, doc["id"])
    assert (charge.captured, charge.refunded, charge.voided) == (1000 if capture else 0, 0, False), "never made"

    await asyncio.sleep(0.25)  # time itself: past provider_in_flight_s, the reset call cannot be in flight
    await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True)
    await delivered(client, adyen)
    record = await journal(client, doc["id"])
    [charge] = charges(adyen, doc["id"])
    assert (record.captured_amount, record.refunded_amount, record.status.value == "voided") == \
        (charge.captured, charge.refunded, charge.voided)
    assert record.follow_up is None and record.status.value in ("captured", "refunded", "voided"), record.status
    sent = [a for a in record.attempts if a.operation == op.rstrip("s") and a.outcome == "approved"]
    assert len(sent) == 1, "sent again once, and made once"


async def test_an_adyen_capture_made_before_its_answer_was_lost_is_made_once_when_sent_again(
        make_config, start_gateway, emulators) -> None:
    """The other side of sending again: Adyen did make the capture (the reset came after it; one
    try only, so the executor's own retry does not find that out first), and its notification
    is late. The second send under the same key is answered from Adyen's key store: one capture
    of 300 in the ledger, and the journal says the same."""
    from gateway.app_keys import RECONCILER

    client, adyen = await _adyen_resending(make_config, start_gateway, emulators, retry={"max_attempts": 1})
    _, doc = await pay(client, card_payment(capture=False, amount=1000))
    await delivered(client, adyen)
    adyen.emulator.faults.set(FaultPlan(rules=(
        FaultRule(kind="reset_after", operations=("capture",)),
        FaultRule(kind="webhook_delay", latency_ms=800, operations=("capture",)))))
    resp = await client.post(f"/v1/payments/{doc['id']}/capture", json={"amount": 300}, headers=idem())
    assert resp.status == 202, await resp.text()
    [charge] = charges(adyen, doc["id"])
    assert charge.captured == 300, "made, though its answer was lost"
    await asyncio.sleep(0.25)  # time itself: past provider_in_flight_s
    adyen.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="webhook_delay", latency_ms=800,
                                                         operations=("capture",)),)))
    await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True)  # sent again: "received", replayed
    await delivered(client, adyen)
    record = await journal(client, doc["id"])
    [charge] = charges(adyen, doc["id"])
    assert (record.status.value, record.captured_amount, charge.captured) == ("captured", 300, 300)
    tries = [(a.outcome, a.raw_code) for a in record.attempts if a.operation == "capture"]
    assert tries == [("unknown", "connection_reset"), ("approved", "received")], tries  # reset, then sent again


async def test_a_resend_the_breaker_refused_is_sent_again_at_the_next_pass(make_config, start_gateway,
                                                                           emulators) -> None:
    """A pass whose re-send found Adyen's breaker open (nothing sent) must not leave the capture
    for ever: a send refused here is a send still owed."""
    from gateway.app_keys import POOL, RECONCILER

    client, adyen = await _adyen_resending(make_config, start_gateway, emulators)
    _, doc = await pay(client, card_payment(capture=False, amount=1000))
    await delivered(client, adyen)
    adyen.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="reset_before", operations=("capture",)),)))
    resp = await client.post(f"/v1/payments/{doc['id']}/capture", json={"amount": 300}, headers=idem())
    assert resp.status == 202, await resp.text()
    adyen.emulator.faults.clear()
    await asyncio.sleep(0.25)  # time itself: past provider_in_flight_s
    breaker = client.app[POOL]["adyen"].breaker
    breaker.force_open()
    await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True)
    assert (await journal(client, doc["id"])).status.value == "capture_pending"
    breaker.force_close()
    await asyncio.sleep(0.25)  # time itself: the next pass, past provider_in_flight_s again
    await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True)
    await delivered(client, adyen)
    record = await journal(client, doc["id"])
    [charge] = charges(adyen, doc["id"])
    assert (record.status.value, record.captured_amount, charge.captured) == ("captured", 300, 300)
