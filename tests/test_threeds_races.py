"""3-D Secure races around the expiry's cancel and a dying completion (issue 16's black-box
findings), through the real parts: emulators over loopback sending their signed webhooks to the
real gateway, real SQLite, and for the crash a real gateway process SIGKILLed mid-completion.

- The shopper finishing while the expiry's cancel is at the provider: the cancel's outcome
  decides (a manual-capture authorisation it voided ends `failed` / `expired`; a cancel refused
  because the shopper had been charged ends `approved`), and meanwhile `/complete` answers 409
  with `Retry-After` and the shopper's webhook waits.
- An asynchronous cancel (Adyen `received`, Checkout.com 202) the provider then reports FAILED:
  the payment was never failed; it follows its shopper.
- A completion killed mid-call, whose payment the provider cannot be asked about (Adyen): the
  same Idempotency-Key runs the completion again after the restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from emulators.faults import FaultRule
from emulators.registry import EMULATORS
from emulators.server import EmulatorServer
from gateway.action_expiry import MAX_CANCEL_ROUNDS
from gateway.app_keys import RECONCILER, SERVICE, WEBHOOKS
from gateway.certs.devca import DevCertLayout
from gateway.drill.process import GatewayProcess, free_port
from gateway.emulator_launch import start_emulator
from gateway.journal.webhook_events import WebhookState
from tests.conftest import AUTH, card_payment, gateway_config_data, journal, set_faults
from tests.notification_receiver import Receiver
from tests.test_emulator_threeds import Browser, _shop
from tests.test_threeds_api import KINDS, PLAIN_HTTP, Checkout, assert_redirect
from tests.test_threeds_webhooks import delivered, told, wired  # noqa: F401  (the fixture)

# The provider works this long on the cancel (within the providers' 1 s timeout): the shopper
# finishes meanwhile.
CANCEL_HELD_MS = 700
WAIT_S = 10.0


async def until(done: Callable[[], bool], what: str) -> None:
    """Poll something an emulator counts (it offers no event), bounded."""
    give_up = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < give_up, f"never happened: {what}"
        await asyncio.sleep(0.01)


async def events_in(rig: Checkout, payment_id: str, state: WebhookState) -> list[str]:
    store = rig.client.app[WEBHOOKS].processor.service.store
    return [e.event.type for e in await store.webhook_events(state, limit=100) if e.event.payment_reference
            and e.event.payment_reference.startswith(payment_id)]


async def settle_webhooks(rig: Checkout) -> None:
    """Deliver and apply until nothing is left waiting (an event held back by the cancel is
    applied at the pass after the cancel's own), bounded."""
    for _ in range(4):
        await delivered(rig)
    await delivered(rig)


@pytest.mark.parametrize("wired", [*KINDS, *((kind, "postgres") for kind in KINDS)], indirect=True, ids=str)
@pytest.mark.parametrize("capture", [False, True], ids=["manual_capture", "auto_capture"])
async def test_a_shopper_finishing_while_the_expiry_cancels_follows_the_cancels_answer(
        wired: tuple[Checkout, Receiver], capture: bool) -> None:
    rig, receiver = wired
    emulator = rig.emulator.emulator
    _, doc = await rig.pay(rig.card("challenge"), capture=capture)
    assert_redirect(doc, rig.emulator)
    set_faults(rig.emulator, FaultRule(kind="latency", latency_ms=CANCEL_HELD_MS, operations=("void",)))
    await asyncio.sleep(max(0.0, doc["action_expires_at"] - time.time()))  # the shopper's time runs out
    expiring = asyncio.create_task(rig.client.app[RECONCILER].run_once(ignore_backoff=True))
    await until(lambda: emulator.requests["void"] >= 1, "the expiry's cancel reached the provider")
    params = await rig.shopper(doc["action"], "Complete")  # ... and the shopper finishes in that instant
    await emulator.webhooks.idle()
    await rig.client.app[WEBHOOKS].processor.run_once()
    assert await events_in(rig, doc["id"], WebhookState.PENDING)  # the shopper's outcome waits for the cancel
    resp = await rig.client.post(f"/v1/payments/{doc['id']}/complete", json={"return_params": params},
                                 headers={**AUTH, "Idempotency-Key": (key := str(uuid.uuid4()))})
    assert resp.status == 409 and resp.headers["Retry-After"], await resp.text()
    assert (await journal(rig.client, doc["id"])).status.value == "action_required"
    await expiring
    set_faults(rig.emulator)
    await settle_webhooks(rig)

    got = await journal(rig.client, doc["id"])
    [entry] = emulator.ledger.find_by_ref(doc["id"])
    if capture:  # the shopper was charged first: the cancel was refused, the charge stands
        assert (got.status.value, got.captured_amount, got.error_code) == ("approved", got.amount, None)
        assert entry.approved and not entry.voided
        expected = [("payment.approved", "approved", None)]
    else:  # authorised, then voided by the cancel: nothing charged, the journal says expired
        assert (got.status.value, got.error_code, got.captured_amount) == ("failed", "expired", 0)
        assert entry.voided
        expected = [("payment.failed", "failed", "expired")]
    assert got.follow_up is None and not got.duplicate_charge_suspected
    assert await told(receiver, rig, 1) == expected
    assert await events_in(rig, doc["id"], WebhookState.PENDING) == []
    status, again = await rig.complete(doc["id"], params, {**AUTH, "Idempotency-Key": key})  # the retry
    assert (status, again["status"]) == (200, got.status.value)
    assert len(await told(receiver, rig, 0)) == 1  # nothing more, not even a false alarm


@pytest.mark.parametrize("wired", ["adyen", "checkout", ("adyen", "postgres"), ("checkout", "postgres")],
                         indirect=True, ids=str)
async def test_an_asynchronous_cancel_reported_failed_leaves_the_payment_to_its_shopper(
        wired: tuple[Checkout, Receiver]) -> None:
    rig, receiver = wired
    set_faults(rig.emulator, FaultRule(kind="fail_by_notification", operations=("void",)))
    _, doc = await rig.pay(rig.card("challenge"), capture=True)
    await asyncio.sleep(max(0.0, doc["action_expires_at"] - time.time()))
    async with rig.client.app[WEBHOOKS].processor._pass:  # the cancel's outcome not applied yet
        assert await rig.client.app[RECONCILER].run_once(ignore_backoff=True) == 0
        accepted = await journal(rig.client, doc["id"])
        assert accepted.status.value == "action_required"  # received is not cancelled
        assert accepted.follow_up is not None and accepted.follow_up.answered
        assert await told(receiver, rig, 0) == []
    await settle_webhooks(rig)  # CANCELLATION success=false / payment_void_declined
    refused = await journal(rig.client, doc["id"])
    assert (refused.status.value, refused.follow_up, refused.error_code) == ("action_required", None, None)
    assert await told(receiver, rig, 0) == []

    params = await rig.shopper(doc["action"], "Complete")  # the page is still live: the shopper pays
    await settle_webhooks(rig)
    status, done = await rig.complete(doc["id"], params)
    assert (status, done["status"], done["captured_amount"]) == (200, "approved", doc["amount"])
    [entry] = rig.emulator.emulator.ledger.find_by_ref(doc["id"])
    assert entry.approved and entry.captured == doc["amount"]
    assert await told(receiver, rig, 1) == [("payment.approved", "approved", None)]


async def test_a_completion_killed_mid_call_runs_again_under_its_key_after_the_restart(
        tmp_path: Path, dev_certs: DevCertLayout, aiohttp_server: Callable[..., Any]) -> None:
    """Adyen has no lookup, so the restarted reconciler cannot settle the completion: it must
    release the key (a stored `action_required` replayed forever after the payment settled)."""
    adyen: EmulatorServer = await start_emulator("adyen")
    port = free_port("127.0.0.1")
    # The breaker must not open on the in-progress duplicates the retries meet (not this test's subject).
    data = gateway_config_data(tmp_path, dev_certs, {"adyen": adyen}, ("adyen",),
                               every_provider={**PLAIN_HTTP, "breaker": {"fail_max": 100}},
                               route={"return_url": "required"}, three_ds={"allow_http_loopback_return_url": True},
                               server={"host": "127.0.0.1", "port": port})
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    url = f"http://127.0.0.1:{port}"
    doomed = GatewayProcess(config, url, {}, tmp_path / "first.log")
    restarted = GatewayProcess(config, url, {}, tmp_path / "second.log")
    shop = await _shop(aiohttp_server)
    await doomed.start()
    try:
        async with aiohttp.ClientSession(base_url=url) as session, aiohttp.ClientSession() as browsing:
            body = card_payment(EMULATORS["adyen"].threeds_cards()["challenge"], return_url=f"{shop.url}/return")
            async with session.post("/v1/payments", json=body,
                                    headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())}) as resp:
                doc = await resp.json()
            action = assert_redirect(doc, adyen)
            assert await Browser(browsing).press(action["method"], action["url"], "Complete",
                                                 action["data"] or None) == 200
            _, params = await shop.returned()
            set_faults(adyen, FaultRule(kind="latency", latency_ms=1500, operations=("complete",)))
            completing = {**AUTH, "Idempotency-Key": "complete-crash-1"}

            async def complete() -> tuple[int, dict[str, Any]]:
                async with session.post(f"/v1/payments/{doc['id']}/complete", json={"return_params": params},
                                        headers=completing) as resp:
                    return resp.status, await resp.json()

            dying = asyncio.create_task(complete())
            await until(lambda: adyen.emulator.requests["complete"] >= 1, "the completion reached Adyen")
            await doomed.kill()  # mid-call: the claim is journalled, the answer never written
            with pytest.raises(aiohttp.ClientError):
                await dying
            set_faults(adyen)

            await restarted.start()  # its reconciler takes over what the dead process left
            for _ in range(20):  # the checkout's retry, with the same key; 202 or 503 while Adyen still
                status, done = await complete()  # works on the dead process's call (an in-progress duplicate)
                if status not in (202, 503):
                    break
                await asyncio.sleep(0.25)
            assert (status, done.get("status")) == (200, "approved"), done
            status, replayed = await complete()
            assert (status, replayed["status"]) == (200, "approved")
    finally:
        await restarted.stop()
        await doomed.kill()
        await adyen.stop()
    assert len([e for e in adyen.emulator.ledger.find_by_ref(doc["id"]) if e.approved]) == 1


@pytest.mark.parametrize("wired", ["adyen"], indirect=True)
async def test_an_adyen_challenge_behind_an_unknown_answer_is_cancelled_by_our_reference(
        wired: tuple[Checkout, Receiver]) -> None:
    """Adyen answered 503 after opening the challenge: the payment is pending with no action
    and no pspReference, Adyen has no lookup and notifies nothing while the challenge is open.
    Past `three_ds.action_expiry_s` the reconciler cancels it by our reference (the technical
    cancel) and it ends as an abandoned challenge does."""
    rig, receiver = wired
    set_faults(rig.emulator, FaultRule(kind="error", status=503, after_processing=True, operations=("authorize",)))
    _, doc = await rig.pay(rig.card("challenge"))
    assert (doc["status"], doc["action"], doc["provider_reference"]) == ("pending", None, None)
    assert [c["state"] for c in rig.emulator.emulator.challenges.snapshot()] == ["pending"]  # open at Adyen
    set_faults(rig.emulator)
    reconciler = rig.client.app[RECONCILER]
    record = await journal(rig.client, doc["id"])
    await asyncio.sleep(max(0.0, record.created_at + 0.3 - time.time()))  # the shopper's time is over
    assert await reconciler.run_once(min_age_s=0, ignore_backoff=True) == 0  # received: not yet a cancel
    cancelling = await journal(rig.client, doc["id"])
    assert cancelling.status.value == "pending" and cancelling.follow_up is not None
    assert [c["state"] for c in rig.emulator.emulator.challenges.snapshot()] == ["cancelled"]
    await settle_webhooks(rig)  # TECHNICAL_CANCEL, success
    got = await journal(rig.client, doc["id"])
    assert (got.status.value, got.error_code, got.follow_up) == ("failed", "expired", None)
    assert await told(receiver, rig, 1) == [("payment.failed", "failed", "expired")]
    assert rig.emulator.emulator.ledger.charges() == []


@pytest.mark.parametrize("wired", ["adyen"], indirect=True)
async def test_cancels_refused_every_time_slow_down_and_the_shopper_still_decides(
        wired: tuple[Checkout, Receiver]) -> None:
    rig, receiver = wired
    set_faults(rig.emulator, FaultRule(kind="fail_by_notification", operations=("void",)))
    _, doc = await rig.pay(rig.card("challenge"))
    await asyncio.sleep(max(0.0, doc["action_expires_at"] - time.time()))
    reconciler = rig.client.app[RECONCILER]
    for _ in range(MAX_CANCEL_ROUNDS + 2):  # each pass sends a round; its CANCELLATION success=false ends it
        assert await reconciler.run_once(min_age_s=0, ignore_backoff=True) == 0
        await settle_webhooks(rig)
    assert rig.emulator.emulator.requests["void"] == MAX_CANCEL_ROUNDS  # then one round per expiry period
    record = await journal(rig.client, doc["id"])
    assert (record.status.value, record.follow_up, record.action_cancelling) == ("action_required", None, False)
    keys = {a.idempotency_key for a in record.attempts if a.operation == "void"}
    assert len(keys) == MAX_CANCEL_ROUNDS  # a key per round: Adyen would replay a refused round's answer
    store = reconciler.service.store
    assert await store.lease_unresolved(reconciler.owner, 60) == [], "set aside until its next round"
    last = max(a.started_at for a in record.attempts if a.operation == "void")
    await asyncio.sleep(max(0.0, last + rig.client.app[SERVICE].action_expiry_s - time.time()))
    assert await reconciler.run_once(min_age_s=0, ignore_backoff=True) == 0
    await settle_webhooks(rig)
    assert rig.emulator.emulator.requests["void"] == MAX_CANCEL_ROUNDS + 1, "never given up for good"
    params = await rig.shopper(doc["action"], "Complete")
    status, done = await rig.complete(doc["id"], params)
    assert (status, done["status"]) == (200, "approved")
    # /complete answered it, or the webhook came first: nothing failed was ever told
    assert {t[0] for t in await told(receiver, rig, 0)} <= {"payment.approved"}
