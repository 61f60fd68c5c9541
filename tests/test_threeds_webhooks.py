"""A provider's 3-D Secure outcome webhook settles a payment waiting for its shopper just as
`/complete` does, whichever comes first; the second changes nothing. And the merchant hears
of what a background settler decided (the webhook, the expiry), never of what `/complete`
already answered.

Real emulators on loopback send their signed notifications to the real gateway's
`/v1/webhooks/{provider}`; the test runs the webhook processor's pass when it wants the event
applied (the gateway's own background pass is parked), and a notification receiver stands in
for the merchant's endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from emulators.webhooks import WebhookTarget
from gateway.app_keys import NOTIFICATION_SENDER, RECONCILER, WEBHOOKS
from gateway.certs.devca import DevCertLayout
from gateway.journal.webhook_events import WebhookState
from tests.conftest import AUTH, journal, pg_schema
from tests.notification_receiver import SECRET, SECRET_ENV, Receiver, notifications_config
from tests.test_threeds_api import KINDS, Checkout, assert_redirect, start_checkout
from tests.webhook_shapes import ADYEN_HMAC, CHECKOUT_SECRET, STRIPE_SECRET, WEBHOOK_ENV, WEBHOOK_PROVIDERS

SECRETS = {"stripe": STRIPE_SECRET, "adyen": ADYEN_HMAC, "checkout": CHECKOUT_SECRET}


@pytest.fixture
async def wired(request: pytest.FixtureRequest, tmp_path: Path, dev_certs: DevCertLayout,
                aiohttp_server: Callable[..., Any], start_gateway: Callable[..., Any],
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Checkout, Receiver]]:
    """The checkout at one provider (the param: its kind, or `(kind, "postgres")` for the
    journal on PostgreSQL instead of SQLite), its emulator's webhooks wired to the gateway."""
    kind, backend = (request.param, "sqlite") if isinstance(request.param, str) else request.param
    for name, value in {**WEBHOOK_ENV, SECRET_ENV: SECRET}.items():
        monkeypatch.setenv(name, value)
    async with AsyncExitStack() as stack:
        storage: dict[str, Any] = {}
        if backend == "postgres":
            monkeypatch.setenv("GATEWAY_PG_DSN", await stack.enter_async_context(pg_schema()))
            storage = {"storage": {"backend": "postgres"}}
        receiver = await Receiver().start()
        rig, servers = await start_checkout(kind, tmp_path, dev_certs, aiohttp_server, start_gateway,
                                            app_kwargs={"webhook_interval_s": 3600},
                                            providers={kind: WEBHOOK_PROVIDERS[kind]},
                                            notifications=notifications_config(receiver.url),
                                            three_ds={"action_expiry_s": 0.3}, **storage)
        rig.emulator.emulator.webhooks.set_target(WebhookTarget(
            url=str(rig.client.make_url(f"/v1/webhooks/{kind}")), secret=SECRETS[kind], time_factor=0.001))
        try:
            yield rig, receiver
        finally:
            await rig.browser.http.close()
            await receiver.stop()
            for server in servers:
                await server.stop()
            await rig.client.close()  # before the schema is dropped under its pool


async def delivered(rig: Checkout) -> int:
    """Every notification of the emulator delivered and journalled; then the processor's pass."""
    await rig.emulator.emulator.webhooks.idle()
    return await rig.client.app[WEBHOOKS].processor.run_once()


async def webhook_states(rig: Checkout, payment_id: str) -> list[str]:
    events = await rig.client.app[WEBHOOKS].processor.service.store.webhook_events(limit=100)
    return [e.state.value for e in events if e.payment_id == payment_id]


async def told(receiver: Receiver, rig: Checkout, count: int) -> list[tuple[str, str, str | None]]:
    """The merchant notifications so far (after the sender's pass): (type, status, error_code)."""
    await rig.client.app[NOTIFICATION_SENDER].run_once()
    if count:
        await receiver.wait_for(count)
    return [(d.event["type"], d.event["payment"]["status"], d.event["payment"]["error_code"])
            for d in receiver.deliveries]


@pytest.mark.parametrize("wired", KINDS, indirect=True)
@pytest.mark.parametrize(("button", "expected"), [("Complete", "approved"), ("Fail", "declined")])
async def test_the_webhook_first_then_complete_changes_nothing(wired: tuple[Checkout, Receiver], button: str,
                                                                expected: str) -> None:
    rig, receiver = wired
    _, doc = await rig.pay(rig.card("challenge"))
    assert_redirect(doc, rig.emulator)
    params = await rig.shopper(doc["action"], button)
    await delivered(rig)
    settled = await journal(rig.client, doc["id"])
    assert settled.status.value == expected and settled.action is None
    assert (await told(receiver, rig, 1))[0][:2] == (f"payment.{expected}", expected)  # a webhook decided it

    status, done = await rig.complete(doc["id"], params)  # the shopper's return, second
    assert (status, done["status"]) == (200, expected)
    after = await journal(rig.client, doc["id"])
    assert (after.version, after.status) == (settled.version, settled.status)
    assert len(rig.emulator.emulator.ledger.charges()) == (1 if expected == "approved" else 0)
    assert len(await told(receiver, rig, 0)) == 1


@pytest.mark.parametrize("wired", KINDS, indirect=True)
async def test_complete_first_then_the_webhook_changes_nothing(wired: tuple[Checkout, Receiver]) -> None:
    rig, receiver = wired
    _, doc = await rig.pay(rig.card("challenge"))
    processor = rig.client.app[WEBHOOKS].processor
    async with processor._pass:  # the processor is mid-pass: the notification is journalled, not applied
        params = await rig.shopper(doc["action"], "Complete")
        await rig.emulator.emulator.webhooks.idle()
        store = processor.service.store
        assert [e.event.type for e in await store.webhook_events(WebhookState.PENDING)]  # journalled, waiting
        status, done = await rig.complete(doc["id"], params)
        assert (status, done["status"]) == (200, "approved")
        version = (await journal(rig.client, doc["id"])).version
    await processor.run_once()
    assert (await journal(rig.client, doc["id"])).version == version
    assert "applied" not in await webhook_states(rig, doc["id"])
    assert await told(receiver, rig, 0) == []  # the checkout heard it in /complete's answer
    assert len(rig.emulator.emulator.ledger.charges()) == 1


@pytest.mark.parametrize("wired", KINDS, indirect=True)
async def test_an_expired_challenge_is_told_to_the_merchant_as_failed_expired(
        wired: tuple[Checkout, Receiver]) -> None:
    rig, receiver = wired
    _, doc = await rig.pay(rig.card("challenge"))
    assert_redirect(doc, rig.emulator)
    await asyncio.sleep(max(0.0, doc["action_expires_at"] - time.time()))  # the shopper never comes back
    async with rig.client.app[WEBHOOKS].processor._pass:  # the cancel's notification is held back
        settled = await rig.client.app[RECONCILER].run_once(ignore_backoff=True)
        if rig.kind == "stripe":  # a synchronous cancel: done when answered
            assert settled == 1
        else:  # Adyen `received`, Checkout.com 202: nothing is told until the provider says it is done
            assert settled == 0 and await told(receiver, rig, 0) == []
    await delivered(rig)  # the cancel's notification: done (Adyen, Checkout.com), or nothing more (Stripe)
    assert await told(receiver, rig, 1) == [("payment.failed", "failed", "expired")]
    got = await (await rig.client.get(f"/v1/payments/{doc['id']}", headers=AUTH)).json()
    assert (got["status"], got["error_code"]) == ("failed", "expired")
    assert len(await told(receiver, rig, 0)) == 1
    assert rig.emulator.emulator.ledger.charges() == []

