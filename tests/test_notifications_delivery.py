"""Merchant notifications through the real gateway: a payment the reconciler settles after its
answer is notified once, signed; a receiver failing then answering is retried until delivered
once, every attempt logged; a receiver that hangs never slows payments."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from emulators.faults import FaultRule
from gateway.app_keys import NOTIFICATION_SENDER, POOL, RECONCILER, STORE
from gateway.notifications.records import DeliveryState
from domain.outcome import PaymentStatus
from tests.conftest import AUTH, card_payment, idem, metrics_text, pay, set_faults, txlog
from tests.notification_receiver import (
    OLD_SECRET,
    OLD_SECRET_ENV,
    SECRET,
    SECRET_ENV,
    Receiver,
    eventually,
    notifications_config,
    settle_later,
    signature_ok,
)


@pytest.fixture(autouse=True)
def _signing_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(OLD_SECRET_ENV, OLD_SECRET)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


async def test_a_pending_payment_settled_by_the_reconciler_is_notified_once(engine_config, start_gateway, stripes,
                                                                            receiver: Receiver) -> None:
    client = await start_gateway(engine_config(
        providers={"primary": {"timeout_ms": 300, "retry": {"max_attempts": 1}}},
        notifications=notifications_config(receiver.url, (SECRET_ENV, OLD_SECRET_ENV))))
    status, direct = await pay(client)  # answered approved at once: the caller knows, nobody is notified
    assert status == 201 and direct["status"] == "approved"
    set_faults(stripes["primary"],  # processed, then no answer; the status query too slow: pending
               FaultRule(kind="timeout_after", hang_s=5, operations=("authorize",)),
               FaultRule(kind="latency", latency_ms=1500, operations=("status",)))
    status, doc = await pay(client)
    assert status == 201 and doc["status"] == "pending"
    stripes["primary"].emulator.faults.clear()

    reconciler = client.app[RECONCILER]
    assert await reconciler.run_once(min_age_s=0, ignore_backoff=True) == 1
    assert await reconciler.run_once(min_age_s=0, ignore_backoff=True) == 0  # nothing left to settle
    [delivery] = await receiver.wait_for(1)
    event = delivery.event
    assert event["type"] == "payment.approved" and event["payment_id"] == doc["id"]
    assert delivery.headers["Gateway-Event-Id"] == event["id"]
    read = await (await client.get(f"/v1/payments/{doc['id']}", headers=AUTH)).json()
    assert event["payment"] == read  # the payment exactly as GET returns it
    assert signature_ok(delivery, SECRET) and signature_ok(delivery, OLD_SECRET)  # one v1 per active secret
    assert delivery.headers["Gateway-Signature"].count("v1=") == 2

    async def delivered() -> bool:
        rows = await client.app[STORE].list_notifications()
        return [(r.payment_id, r.state) for r in rows] == [(doc["id"], DeliveryState.DELIVERED)]

    await eventually(delivered)
    await client.app[NOTIFICATION_SENDER].run_once()
    assert len(receiver.deliveries) == 1  # exactly one event, delivered once


async def test_a_refund_answered_202_and_settled_later_is_notified_once(make_config, start_gateway, emulators,
                                                                        receiver: Receiver) -> None:
    """Checkout.com's refund answer is lost and its status query fails: 202 `refund_pending`; the
    reconciler later finds the refund made. The checkout hears `refund.succeeded`, once; the
    synchronous payment before it is never notified. (Every Checkout.com refund answers 202 and
    stays `refund_pending` until its webhook or a lookup: none is synchronous.)"""
    from emulators.faults import FaultPlan

    client = await start_gateway(make_config(order=("checkout", "stripe"),
                                             notifications=notifications_config(receiver.url)))
    status, doc = await pay(client, card_payment(amount=1500))
    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "checkout"
    emulator = emulators["checkout"].emulator
    emulator.faults.set(FaultPlan(rules=(FaultRule(kind="timeout_after", hang_s=5, operations=("refund",)),
                                         FaultRule(kind="error", status=503, operations=("status",)))))
    first = await client.post(f"/v1/payments/{doc['id']}/refunds", json={"amount": 500}, headers=idem())
    assert first.status == 202 and (await first.json())["status"] == "refund_pending"
    emulator.faults.clear()
    client.app[POOL]["checkout"].breaker.force_close()  # as its reset timeout would

    reconciler = client.app[RECONCILER]
    assert await reconciler.run_once(min_age_s=0, ignore_backoff=True) == 1
    assert await reconciler.run_once(min_age_s=0, ignore_backoff=True) == 0
    [delivery] = await receiver.wait_for(1)
    event = delivery.event
    assert event["type"] == "refund.succeeded" and event["payment_id"] == doc["id"]
    assert event["payment"]["status"] == "refunded" and event["payment"]["refunded_amount"] == 500
    assert event["payment"]["pending_follow_up"] is None

    async def delivered() -> bool:
        rows = await client.app[STORE].list_notifications()
        return [(r.event_type, r.state) for r in rows] == [("refund.succeeded", DeliveryState.DELIVERED)]

    await eventually(delivered)
    await client.app[NOTIFICATION_SENDER].run_once()
    assert len(receiver.deliveries) == 1


async def test_a_failing_receiver_is_retried_until_delivered_once_and_every_attempt_is_logged(
        engine_config, start_gateway, receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    client = await start_gateway(engine_config(notifications=notifications_config(receiver.url)))
    payment_id = await settle_later(client)

    deliveries = await receiver.wait_for(3)
    assert len({d.event["id"] for d in deliveries}) == 1
    assert all(signature_ok(d, SECRET) for d in deliveries)

    async def delivered() -> bool:
        [row] = await client.app[STORE].list_notifications()
        return row.state is DeliveryState.DELIVERED

    await eventually(delivered)
    [row] = await client.app[STORE].list_notifications()
    assert row.attempts == 3 and row.last_status == 200 and row.payment_id == payment_id
    lines = [line for line in await txlog(client) if line["event"] == "notification_delivery"]
    assert [(line["notification"]["attempt"], line["notification"]["outcome"], line["notification"]["http_status"])
            for line in lines] == [(1, "failed", 500), (2, "failed", 503), (3, "delivered", 200)]
    assert {line["notification"]["event_id"] for line in lines} == {row.event_id}
    text = await metrics_text(client)
    assert 'gateway_notification_deliveries_total{outcome="delivered"} 1.0' in text
    assert 'gateway_notification_deliveries_total{outcome="failed"} 2.0' in text

    async def nothing_pending() -> bool:
        return "gateway_notifications_pending 0.0" in await metrics_text(client)

    await eventually(nothing_pending)
    await client.app[NOTIFICATION_SENDER].run_once()
    assert len(receiver.deliveries) == 3


async def test_a_receiver_failing_past_the_retry_window_is_given_up(engine_config, start_gateway,
                                                                    receiver: Receiver) -> None:
    receiver.statuses = [500] * 100
    client = await start_gateway(engine_config(notifications=notifications_config(receiver.url,
                                                                                  give_up_after_s=0.3)))
    await settle_later(client, PaymentStatus.DECLINED)

    async def given_up() -> bool:
        [row] = await client.app[STORE].list_notifications()
        return row.state is DeliveryState.GIVEN_UP

    await eventually(given_up)
    attempts = len(receiver.deliveries)
    assert receiver.deliveries[0].event["type"] == "payment.declined"
    text = await metrics_text(client)
    assert 'gateway_notification_deliveries_total{outcome="given_up"} 1.0' in text
    await client.app[NOTIFICATION_SENDER].run_once()
    assert len(receiver.deliveries) == attempts  # given up: no more attempts until a replay


async def test_a_receiver_that_is_down_is_a_failed_attempt_that_says_why(engine_config, start_gateway) -> None:
    from gateway.drill.process import free_port

    url = f"http://127.0.0.1:{free_port('127.0.0.1')}/hooks"  # nothing listens there
    client = await start_gateway(engine_config(notifications=notifications_config(url, give_up_after_s=0.3)))
    await settle_later(client)

    async def given_up() -> bool:
        [row] = await client.app[STORE].list_notifications()
        return row.state is DeliveryState.GIVEN_UP

    await eventually(given_up)
    [row] = await client.app[STORE].list_notifications()
    assert row.last_error == "connect_failed" and row.last_status is None and row.attempts >= 1
    lines = [line["notification"] for line in await txlog(client) if line["event"] == "notification_delivery"]
    assert len(lines) == row.attempts and {line["error"] for line in lines} == {"connect_failed"}
    assert lines[-1]["outcome"] == "given_up"


async def test_a_hanging_receiver_never_slows_payments(engine_config, start_gateway, receiver: Receiver) -> None:
    receiver.hang = True
    client = await start_gateway(engine_config(notifications=notifications_config(
        receiver.url, max_concurrency=2, timeout_s=30)))

    async def sequential(n: int) -> list[float]:
        took = []
        for _ in range(n):
            started = time.monotonic()
            status, doc = await pay(client, card_payment(), idem())
            took.append(time.monotonic() - started)
            assert status == 201 and doc["status"] == "approved"
        return took

    baseline = sorted(await sequential(20))
    for _ in range(4):
        await settle_later(client)
    await receiver.wait_for(2)  # the sender's every slot is held by the receiver now

    async def all_four_pending() -> bool:
        return "gateway_notifications_pending 4.0" in await metrics_text(client)

    await eventually(all_four_pending)
    during = sorted(await sequential(20))
    assert len(receiver.deliveries) == 2, "bounded: no more deliveries in flight than max_concurrency"
    # Payments while every delivery hangs cost what they cost before (the medians), and none
    # waits anywhere near a delivery's timeout.
    assert during[10] < max(3 * baseline[10], baseline[10] + 0.25), (baseline, during)
    assert during[-1] < 2.0, during
    receiver.release()
    await receiver.wait_for(4)
