"""Follow-ups under concurrency and with defaults: serialised per payment, checked against the
row as it is, explicit amounts for every provider."""

from __future__ import annotations

import asyncio
import uuid

from gateway.app_keys import POOL, RECONCILER
from tests.conftest import AUTH, card_payment, journal, pay


def key() -> dict[str, str]:
    return {**AUTH, "Idempotency-Key": str(uuid.uuid4())}


async def test_concurrent_refunds_cannot_refund_more_than_was_captured(engine_config, start_gateway,
                                                                       stripes) -> None:
    client = await start_gateway(engine_config())
    status, doc = await pay(client, card_payment(amount=1500))
    assert doc["status"] == "approved"
    pid = doc["id"]

    answers = await asyncio.gather(*(
        client.post(f"/v1/payments/{pid}/refunds", json={"amount": 1000}, headers=key()) for _ in range(4)))
    statuses = sorted(r.status for r in answers)
    assert statuses.count(200) == 1, statuses
    assert all(s in (409, 422) for s in statuses if s != 200)

    record = await journal(client, pid)
    assert record.refunded_amount == 1000
    [entry] = stripes["primary"].emulator.ledger.charges()
    assert entry.refunded == 1000


async def test_a_refund_without_amount_refunds_what_is_left(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    _, doc = await pay(client, card_payment(amount=1500))
    pid = doc["id"]
    first = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 500}, headers=key())
    assert first.status == 200
    rest = await client.post(f"/v1/payments/{pid}/refunds", json={}, headers=key())
    assert rest.status == 200
    assert (await rest.json())["refunded_amount"] == 1500
    again = await client.post(f"/v1/payments/{pid}/refunds", json={}, headers=key())
    assert again.status == 409


async def test_adyen_capture_without_amount_captures_the_authorisation(make_config, start_gateway,
                                                                       emulators) -> None:
    """Adyen needs an explicit amount on every modification; the gateway supplies it. Adyen
    answers `received` and reports the capture by webhook, so it is `capture_pending` (202)
    until then (tests/test_webhooks_gateway.py settles one)."""
    client = await start_gateway(make_config(order=("adyen", "stripe")))
    resp = await client.post("/v1/payments", json=card_payment(capture=False), headers=key())
    doc = await resp.json()
    assert doc["status"] == "approved" and doc["provider"] == "adyen"
    captured = await client.post(f"/v1/payments/{doc['id']}/capture", json={}, headers=key())
    assert captured.status == 202, await captured.text()
    body = await captured.json()
    assert body["status"] == "capture_pending" and body["pending_follow_up"] == {"operation": "capture",
                                                                                "amount": 1299}
    [charge] = emulators["adyen"].emulator.ledger.charges()
    assert charge.captured == 1299


async def test_an_unknown_refund_at_a_provider_that_does_not_replay_is_never_sent_twice(
        make_config, start_gateway, emulators) -> None:
    """Checkout.com treats a re-send after a lost answer as a new action. A refund whose answer
    is lost and whose status query fails too is accepted as `refund_pending` (202): the key
    keeps that answer, a second refund is refused meanwhile, and the reconciler settles it from
    Checkout.com's list of the payment's actions; the caller's retry then replays the final
    answer. The provider refunded once."""
    from emulators.faults import FaultPlan, FaultRule

    config = make_config(order=("checkout", "stripe"))
    client = await start_gateway(config)
    doc = await (await client.post("/v1/payments", json=card_payment(amount=1500), headers=key())).json()
    assert doc["status"] == "approved" and doc["provider"] == "checkout"
    emulator = emulators["checkout"].emulator
    emulator.faults.set(FaultPlan(rules=(FaultRule(kind="timeout_after", hang_s=5, operations=("refund",)),
                                         FaultRule(kind="error", status=503, operations=("status",)))))
    headers = key()
    first = await client.post(f"/v1/payments/{doc['id']}/refunds", json={"amount": 500}, headers=headers)
    assert first.status == 202 and (await first.json())["status"] == "refund_pending"
    emulator.faults.clear()
    again = await client.post(f"/v1/payments/{doc['id']}/refunds", json={"amount": 500}, headers=headers)
    assert again.status == 202 and again.headers.get("Idempotent-Replayed") == "true"
    other = await client.post(f"/v1/payments/{doc['id']}/refunds", json={"amount": 500}, headers=key())
    assert other.status == 409 and (await other.json())["code"] == "invalid_payment_state"
    # Accepted, waiting for the provider's confirmation (a webhook, the reconciler): not 2 s away.
    assert other.headers["Retry-After"] == "30", "the refusal lasts until the refund settles: ask again then"

    client.app[POOL]["checkout"].breaker.force_close()  # as its reset timeout would
    assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 1
    settled = await client.post(f"/v1/payments/{doc['id']}/refunds", json={"amount": 500}, headers=headers)
    body = await settled.json()
    assert settled.status == 200 and body["status"] == "refunded" and body["refunded_amount"] == 500
    [charge] = emulator.ledger.charges()
    assert charge.refunded == 500  # the first refund went through once; the retry sent nothing
