"""3-D Secure through the gateway's API, at each provider's emulator over real HTTP.

The checkout posts a payment with a `return_url`; a challenge card answers `action_required`
with the normalised action; the shopper's browser (an HTTP client that follows the page's form
and redirects as a browser does, `tests/test_emulator_threeds.Browser`) completes or fails the
challenge and lands on the shop's return page (a server the test runs); the checkout passes what
the browser brought back to `/complete`. An abandoned challenge expires: the reconciler cancels
it at the emulator and the payment fails `expired`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient

from emulators.registry import EMULATORS
from emulators.server import EmulatorServer
from gateway.app_keys import RECONCILER
from gateway.certs.devca import DevCertLayout
from gateway.config import parse_config
from gateway.emulator_launch import start_emulator
from tests.conftest import AUTH, card_payment, gateway_config_data, journal, txlog
from tests.test_emulator_threeds import Browser, Shop, _shop
from tests.test_openapi import validator

KINDS = ("stripe", "adyen", "checkout")
PLAIN_HTTP = {"tls": {"ca": None, "client_cert": None, "client_key": None}}


def idem() -> dict[str, str]:
    return {**AUTH, "Idempotency-Key": str(uuid.uuid4())}


@dataclass
class Checkout:
    """The merchant's checkout: the gateway, the shop's return page, the shopper's browser."""

    kind: str
    client: TestClient
    servers: dict[str, EmulatorServer]
    shop: Shop
    browser: Browser

    @property
    def emulator(self) -> EmulatorServer:
        return self.servers[self.kind]

    def card(self, behaviour: str) -> str:
        return EMULATORS[self.kind].threeds_cards()[behaviour]

    async def pay(self, number: str, **extra: Any) -> tuple[int, dict[str, Any]]:
        body = card_payment(number, return_url=f"{self.shop.url}/return?order=o-{uuid.uuid4().hex[:8]}", **extra)
        resp = await self.client.post("/v1/payments", json=body, headers=idem())
        return resp.status, await resp.json()

    async def shopper(self, action: dict[str, Any], button: str) -> dict[str, str]:
        """The shopper follows the action, presses the button, and comes back: what they brought."""
        assert await self.browser.press(action["method"], action["url"], button, action["data"] or None) == 200
        path, params = await self.shop.returned()
        assert path == "/return"
        return params

    async def complete(self, payment_id: str, params: dict[str, str],
                       headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(f"/v1/payments/{payment_id}/complete", json={"return_params": params},
                                      headers=headers or idem())
        return resp.status, await resp.json()


async def start_checkout(kind: str, tmp_path: Path, certs: DevCertLayout, aiohttp_server: Callable[..., Any],
                         start_gateway: Callable[..., Any], order: tuple[str, ...] | None = None,
                         app_kwargs: dict[str, Any] | None = None,
                         **sections: Any) -> tuple[Checkout, list[EmulatorServer]]:
    order = order or (kind,)
    servers = {name: await start_emulator(name) for name in order}
    data = gateway_config_data(tmp_path, certs, servers, order, every_provider=PLAIN_HTTP,
                               route={"return_url": "required"},
                               three_ds={"allow_http_loopback_return_url": True, **sections.pop("three_ds", {})},
                               **sections)
    client = await start_gateway(parse_config(data), **(app_kwargs or {}))
    shop = await _shop(aiohttp_server)
    http = ClientSession()
    return Checkout(kind, client, servers, shop, Browser(http)), list(servers.values())


@pytest.fixture(params=KINDS)
async def checkout(request: pytest.FixtureRequest, tmp_path: Path, dev_certs: DevCertLayout,
                   aiohttp_server: Callable[..., Any], start_gateway: Callable[..., Any]) -> AsyncIterator[Checkout]:
    rig, servers = await start_checkout(request.param, tmp_path, dev_certs, aiohttp_server, start_gateway)
    try:
        yield rig
    finally:
        await rig.browser.http.close()
        for server in servers:
            await server.stop()


def assert_redirect(doc: dict[str, Any], emulator: EmulatorServer) -> dict[str, Any]:
    assert doc["status"] == "action_required", doc
    action = doc["action"]
    assert action["type"] == "redirect" and action["method"] in ("GET", "POST")
    assert action["url"].startswith(emulator.url) and action["provider_action"]
    assert doc["action_expires_at"] > time.time()
    assert doc["error_code"] is None and doc["decline_code"] is None
    return action


async def test_a_completed_challenge_is_approved_once(checkout: Checkout) -> None:
    status, doc = await checkout.pay(checkout.card("challenge"))
    assert status == 201
    action = assert_redirect(doc, checkout.emulator)
    assert checkout.emulator.emulator.ledger.charges() == []  # nothing charged while the shopper is away
    params = await checkout.shopper(action, "Complete")

    headers = idem()
    status, done = await checkout.complete(doc["id"], params, headers)
    assert (status, done["status"], done["provider"]) == (200, "approved", checkout.kind)
    payment_schema = validator({"$ref": "#/components/schemas/Payment"})
    assert list(payment_schema.iter_errors(doc)) == list(payment_schema.iter_errors(done)) == []  # as published
    assert done["action"] is None and done["provider_reference"] == doc["provider_reference"]
    again = await checkout.client.post(f"/v1/payments/{doc['id']}/complete", json={"return_params": params},
                                       headers=headers)
    assert again.headers["Idempotent-Replayed"] == "true" and (await again.json())["status"] == "approved"
    status, second = await checkout.complete(doc["id"], params)  # a second completion changes nothing
    assert (status, second["status"], second["updated_at"]) == (200, "approved", done["updated_at"])
    assert len([e for e in checkout.emulator.emulator.ledger.charges()]) == 1
    assert checkout.emulator.emulator.ledger.duplicates() == {}
    lines = await txlog(checkout.client, doc["id"])
    assert [(line["event"], line["status"]) for line in lines] == [("payment", "action_required"),
                                                                   ("complete", "approved")]
    assert lines[1]["completion"]["settled"] is True
    record = await journal(checkout.client, doc["id"])
    assert record.follow_up is None and record.action is None


async def test_a_failed_challenge_is_declined(checkout: Checkout) -> None:
    _, doc = await checkout.pay(checkout.card("challenge"))
    action = assert_redirect(doc, checkout.emulator)
    params = await checkout.shopper(action, "Fail")
    status, done = await checkout.complete(doc["id"], params)
    assert (status, done["status"]) == (200, "declined"), done
    assert done["decline_code"]
    assert checkout.emulator.emulator.ledger.charges() == []


async def test_completing_before_the_shopper_is_back_keeps_the_payment_waiting(checkout: Checkout) -> None:
    _, doc = await checkout.pay(checkout.card("challenge"))
    assert_redirect(doc, checkout.emulator)
    status, body = await checkout.complete(doc["id"], {})
    if checkout.kind == "adyen":  # /payments/details needs what the browser brings back
        assert (status, body["code"], body["field"]) == (422, "completion_refused", "return_params")
    else:
        assert (status, body["status"]) == (200, "action_required")
    assert (await journal(checkout.client, doc["id"])).status.value == "action_required"


async def test_a_card_number_in_the_return_params_is_refused_and_never_sent(checkout: Checkout) -> None:
    """The browser's parameters go to the provider (a Stripe id into a URL path its logs keep):
    a card number typed into one is refused before anything is sent. What merely looks like a
    secret (Stripe's `payment_intent_client_secret`) is the provider's own value and passes."""
    _, doc = await checkout.pay(checkout.card("challenge"))
    params = await checkout.shopper(doc["action"], "Complete")
    emulator = checkout.emulator.emulator
    sent = sum(emulator.requests.values())
    name = next(iter(params))
    # A number alone, one behind what looks like a secret (the first finding used to hide it),
    # and a security code: card data all three.
    for typed in ("4242424242424242", "sk_live_abcdefghijklmnopqrstuvwx 4242 4242 4242 4242", "cvc 917"):
        status, body = await checkout.complete(doc["id"], {**params, name: typed})
        assert (status, body["code"], body["field"]) == (422, "card_data_in_free_text", f"return_params.{name}"), body
        assert "4242" not in orjson.dumps(body).decode()
    assert sum(emulator.requests.values()) == sent, "nothing reached the provider"
    assert (await journal(checkout.client, doc["id"])).status.value == "action_required"
    status, done = await checkout.complete(doc["id"], params)
    assert (status, done["status"]) == (200, "approved"), done


async def test_a_return_of_another_payment_does_not_settle_this_one(checkout: Checkout) -> None:
    _, first = await checkout.pay(checkout.card("challenge"))
    _, second = await checkout.pay(checkout.card("challenge"))
    params = await checkout.shopper(first["action"], "Complete")
    status, body = await checkout.complete(second["id"], params)
    assert status == 422, body
    assert (await journal(checkout.client, second["id"])).status.value == "action_required"


async def test_an_abandoned_challenge_expires_and_is_cancelled_at_the_provider(
        tmp_path: Path, dev_certs: DevCertLayout, aiohttp_server: Callable[..., Any],
        start_gateway: Callable[..., Any], kind: str) -> None:
    rig, servers = await start_checkout(kind, tmp_path, dev_certs, aiohttp_server, start_gateway,
                                        three_ds={"action_expiry_s": 0.3})
    try:
        _, doc = await rig.pay(rig.card("challenge"))
        action = assert_redirect(doc, rig.emulator)
        await rig.browser.open(action["method"], action["url"], action["data"] or None)  # looks, then leaves
        reconciler = rig.client.app[RECONCILER]
        assert await reconciler.run_once(ignore_backoff=True) == 0  # not expired yet: left alone
        # ... and set aside until it expires: the reconciler's next batches do not list it
        assert await reconciler.service.store.lease_unresolved(reconciler.owner, 60) == []
        await asyncio.sleep(max(0.0, doc["action_expires_at"] - time.time()))  # the shopper's time runs out
        settled = await reconciler.run_once(ignore_backoff=True)
        if kind != "stripe":  # Adyen `received`, Checkout.com 202: accepted, not yet done
            assert settled == 0
            waiting = await journal(rig.client, doc["id"])
            assert waiting.status.value == "action_required" and waiting.action_cancelling
            assert waiting.follow_up is not None and waiting.follow_up.operation == "void"
            assert waiting.follow_up.answered
            if kind == "adyen":  # no lookup: its CANCELLATION notification decides (test_threeds_races)
                assert [c["state"] for c in rig.emulator.emulator.challenges.snapshot()] == ["cancelled"]
                return
            settled = await reconciler.run_once(min_age_s=0, ignore_backoff=True)  # its actions list says done
        assert settled == 1
        got = await (await rig.client.get(f"/v1/payments/{doc['id']}", headers=AUTH)).json()
        assert (got["status"], got["error_code"], got["action"]) == ("failed", "expired", None)
        assert [c["state"] for c in rig.emulator.emulator.challenges.snapshot()] == ["cancelled"]
        async with rig.browser.http.get(action["url"]) as late:
            assert late.status == 410
        assert rig.emulator.emulator.ledger.charges() == []
        assert "void" in [a["operation"] for a in got["attempts"]]
    finally:
        await rig.browser.http.close()
        for server in servers:
            await server.stop()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_an_action_at_the_primary_never_reaches_the_backup(
        tmp_path: Path, dev_certs: DevCertLayout, aiohttp_server: Callable[..., Any],
        start_gateway: Callable[..., Any], kind: str) -> None:
    """Whatever the route's cascade list says (every code listed), the challenged payment stays."""
    backup = next(k for k in KINDS if k != kind)
    rig, servers = await start_checkout(kind, tmp_path, dev_certs, aiohttp_server, start_gateway,
                                        order=(kind, backup))
    try:
        _, doc = await rig.pay(rig.card("challenge"))
        assert_redirect(doc, rig.emulator)
        assert [a["provider"] for a in doc["attempts"]] == [kind]
        assert rig.servers[backup].emulator.ledger.entries() == []
        params = await rig.shopper(doc["action"], "Fail")
        _, done = await rig.complete(doc["id"], params)
        assert done["status"] == "declined"
        assert {a["provider"] for a in done["attempts"]} == {kind}
        assert rig.servers[backup].emulator.ledger.entries() == []
    finally:
        await rig.browser.http.close()
        for server in servers:
            await server.stop()


async def test_return_url_rules(tmp_path: Path, dev_certs: DevCertLayout, aiohttp_server: Callable[..., Any],
                                start_gateway: Callable[..., Any]) -> None:
    rig, servers = await start_checkout("stripe", tmp_path, dev_certs, aiohttp_server, start_gateway)
    try:
        async def refused(body: dict[str, Any]) -> tuple[str, str]:
            resp = await rig.client.post("/v1/payments", json=body, headers=idem())
            assert resp.status == 422
            doc = await resp.json()
            return doc["code"], doc["field"]

        assert await refused(card_payment()) == ("return_url_required", "return_url")  # the route requires one
        for bad in ("http://shop.example/return", "ftp://127.0.0.1/x", "https://user:pw@shop.example/r",
                    "https:///nohost", "https://shop.example/a b", "/relative/only", "https://shop.example/\x00",
                    "https://shop.example/\x7f",
                    # hosts no browser reaches (an outside attack had these accepted)
                    "https://%zz/", "https://exa%00mple.com/", "https://shop.example:0/", "https://1.2.3.4.5/",
                    "https://.../", "https://xn--/", "https://-shop.example/"):
            assert await refused(card_payment(return_url=bad)) == ("invalid_return_url", "return_url"), bad
        # The provider echoes the return URL into its redirect, and the journal keeps it: card data
        # and secrets in it are refused like any free text, before anything is sent or written.
        card_url = f"{rig.shop.url}/return?card=4111111111111111"
        assert await refused(card_payment(return_url=card_url)) == ("card_data_in_free_text", "return_url")
        assert await refused(card_payment(return_url=f"{rig.shop.url}/r?cvc=123")) == ("card_data_in_free_text",
                                                                                       "return_url")
        assert await refused(card_payment(return_url=f"{rig.shop.url}/r?k=sk_live_{'a1' * 12}")) == (
            "secret_in_free_text", "return_url")
        assert await refused(card_payment(return_url=None, three_ds="challenge")) == ("return_url_required",
                                                                                      "return_url")
        assert rig.emulator.emulator.ledger.entries() == []
        status, doc = await rig.pay(rig.card("frictionless"))
        assert (status, doc["status"], doc["action"]) == (201, "approved", None)
        status, doc = await rig.pay(rig.card("frictionless"), three_ds="any")  # asked for: challenged
        assert (status, doc["status"]) == (201, "action_required")
    finally:
        await rig.browser.http.close()
        for server in servers:
            await server.stop()
