"""3-D Secure at the emulators, driven as a shop and a shopper's browser would drive it.

Each test talks to a real emulator on loopback in its provider's own request shape, follows the
action to the emulator's challenge page, posts the page's form as a browser does (aiohttp follows
the 303 like a browser), lands on a return-URL server the test runs (the "shop"), and then makes
the provider's completion call with what the browser brought back. The signed notification goes
to a receiver the test runs, and is verified the provider's way (tests/test_emulator_webhooks.py).
Last, the official SDKs read the action shapes the emulators answer with.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import ssl
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import Adyen
import orjson
import pytest
import requests
import stripe
from aiohttp import ClientSession, web
from checkout_sdk.checkout_sdk import CheckoutSdk
from checkout_sdk.common.enums import Currency
from checkout_sdk.environment import Environment
from checkout_sdk.http_client_interface import HttpClientBuilderInterface
from checkout_sdk.payments.payments import PaymentRequest, PaymentRequestCardSource, ThreeDsRequest

from emulators.registry import EMULATORS
from emulators.server import EmulatorServer
from emulators.webhooks import WebhookTarget
from gateway.certs.devca import DevCertLayout
from gateway.certs.tls import client_context
from gateway.emulator_launch import start_emulator
from tests.test_emulator_webhooks import SECRETS, Receiver, label, payment_of, verified

MERCHANT = "GatewayTestECOM"
_seq = itertools.count(1)


# -- the shop's return URL and the shopper's browser -------------------------------------------------


@dataclass
class Shop:
    """The merchant's return pages: records what each browser brought back."""

    url: str
    returns: asyncio.Queue[tuple[str, dict[str, str]]] = field(default_factory=asyncio.Queue)

    async def handle(self, request: web.Request) -> web.Response:
        await self.returns.put((request.path, dict(request.query)))
        return web.Response(text="<p>Back at the shop.</p>", content_type="text/html")

    async def returned(self) -> tuple[str, dict[str, str]]:
        return await asyncio.wait_for(self.returns.get(), 10.0)


_FORM = re.compile(r'<form method="post" action="(?P<action>[^"]+)">')
_BUTTON = re.compile(r'<button type="submit" name="(?P<name>[^"]+)" value="(?P<value>[^"]+)" id="[^"]+">'
                     r'(?P<text>[^<]+)</button>')


@dataclass
class Browser:
    """The shopper: follows the provider's action to the challenge page and presses a button."""

    http: ClientSession
    ssl: ssl.SSLContext | bool = True

    async def open(self, method: str, url: str, data: dict[str, str] | None = None) -> str:
        async with self.http.request(method, url, data=data, ssl=self.ssl) as page:
            assert page.status == 200 and page.content_type == "text/html"
            return await page.text()

    async def press(self, method: str, url: str, button: str, data: dict[str, str] | None = None) -> int:
        """Open the page, then post its form with the named button, following redirects;
        the status of the page the browser ends on."""
        page = await self.open(method, url, data)
        form = _FORM.search(page)
        assert form is not None, page
        buttons = {m["text"]: (m["name"], m["value"]) for m in _BUTTON.finditer(page)}
        assert set(buttons) == {"Complete", "Fail"}
        name, value = buttons[button]
        async with self.http.post(urljoin(url, form["action"]), data={name: value}, ssl=self.ssl) as landed:
            await landed.read()
            return landed.status


# -- each provider's requests and answers -------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    method: str
    url: str
    data: dict[str, str] | None = None


class Driver:
    """One provider's side of the flow, in its own API shape."""

    kind: str
    frictionless: str  # a card authenticated without a challenge
    challenge: str  # a card the shopper is challenged for
    approved_event: str
    declined_event: str
    cancelled_event: str

    def __init__(self, server: EmulatorServer, http: ClientSession, shop: Shop, tls: ssl.SSLContext | bool = True):
        self.server, self.http, self.shop, self.tls = server, http, shop, tls

    async def _call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        async with self.http.request(method, self.server.url + path, ssl=self.tls, **kwargs) as answer:
            body = await answer.read()
            return answer.status, orjson.loads(body) if body else {}

    async def pay(self, card: str, reference: str) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def payment_id(self, answer: dict[str, Any]) -> str:
        raise NotImplementedError

    def action(self, answer: dict[str, Any]) -> Action | None:
        """The redirect the answer asks the shopper to follow; None when it asks for nothing."""
        raise NotImplementedError

    def expected_return(self, payment_id: str, params: dict[str, str], approved: bool) -> None:
        """The browser came back with the provider's parameters."""
        raise NotImplementedError

    async def complete(self, params: dict[str, str]) -> dict[str, Any]:
        """The completion call with what the browser brought back."""
        raise NotImplementedError

    def outcome(self, answer: dict[str, Any]) -> str:
        """approved, declined, pending or cancelled, from a (completion or status) answer."""
        raise NotImplementedError

    async def read(self, payment_id: str) -> dict[str, Any]:
        raise NotImplementedError

    async def cancel(self, payment_id: str) -> int:
        raise NotImplementedError


class StripeDriver(Driver):
    kind = "stripe"
    frictionless = "4000000000003055"  # 3DS supported, not required: no challenge unless requested
    challenge = "4000000000003220"  # 3DS2 authentication must be completed
    approved_event, declined_event = "payment_intent.succeeded", "payment_intent.payment_failed"
    cancelled_event = "payment_intent.canceled"
    headers = {"Authorization": "Bearer sk_test_threeds"}

    async def pay(self, card: str, reference: str) -> tuple[int, dict[str, Any]]:
        form = {"amount": "1500", "currency": "eur", "confirm": "true", "payment_method_types[]": "card",
                "payment_method_data[type]": "card", "payment_method_data[card][number]": card,
                "payment_method_data[card][exp_month]": "3", "payment_method_data[card][exp_year]": "2030",
                "metadata[gateway_payment_id]": reference, "return_url": f"{self.shop.url}/return?order={reference}"}
        return await self._call("POST", "/v1/payment_intents", data=form,
                                headers={**self.headers, "Idempotency-Key": f"{reference}-auth"})

    def payment_id(self, answer: dict[str, Any]) -> str:
        return str(answer.get("id") or answer["error"]["payment_intent"]["id"])

    def action(self, answer: dict[str, Any]) -> Action | None:
        if answer.get("status") != "requires_action":
            assert answer.get("next_action") is None
            return None
        assert answer["next_action"]["type"] == "redirect_to_url"
        redirect = answer["next_action"]["redirect_to_url"]
        assert redirect["return_url"].startswith(self.shop.url)
        return Action("GET", redirect["url"])

    def expected_return(self, payment_id: str, params: dict[str, str], approved: bool) -> None:
        assert params["payment_intent"] == payment_id
        assert params["payment_intent_client_secret"].startswith(f"{payment_id}_secret_")
        assert params["redirect_status"] == ("succeeded" if approved else "failed")
        assert params["order"]  # the merchant's own query survives

    async def complete(self, params: dict[str, str]) -> dict[str, Any]:
        return await self.read(params["payment_intent"])

    def outcome(self, answer: dict[str, Any]) -> str:
        return {"succeeded": "approved", "requires_capture": "approved", "requires_payment_method": "declined",
                "requires_action": "pending", "canceled": "cancelled"}[answer["status"]]

    async def read(self, payment_id: str) -> dict[str, Any]:
        status, doc = await self._call("GET", f"/v1/payment_intents/{payment_id}", headers=self.headers)
        assert status == 200
        return doc

    async def cancel(self, payment_id: str) -> int:
        status, doc = await self._call("POST", f"/v1/payment_intents/{payment_id}/cancel", headers=self.headers,
                                       data={"cancellation_reason": "abandoned"})
        return status


class AdyenDriver(Driver):
    kind = "adyen"
    frictionless = "5201281505129736"
    challenge = "4212345678910006"
    approved_event, declined_event, cancelled_event = "AUTHORISATION:true", "AUTHORISATION:false", "CANCELLATION:true"
    headers = {"X-API-Key": "AQE-threeds-test"}
    native = False

    async def pay(self, card: str, reference: str) -> tuple[int, dict[str, Any]]:
        doc: dict[str, Any] = {
            "amount": {"value": 1500, "currency": "EUR"}, "reference": reference, "merchantAccount": MERCHANT,
            "returnUrl": f"{self.shop.url}/return?order={reference}", "shopperInteraction": "Ecommerce",
            "paymentMethod": {"type": "scheme", "number": card, "expiryMonth": "03", "expiryYear": "2030",
                              "cvc": "737", "holderName": "J Smith"}}
        if self.native:
            doc["authenticationData"] = {"threeDSRequestData": {"nativeThreeDS": "preferred"}}
        return await self._call("POST", "/v71/payments", json=doc,
                                headers={**self.headers, "Idempotency-Key": f"{reference}-auth"})

    def payment_id(self, answer: dict[str, Any]) -> str:
        return str(answer["pspReference"])

    def action(self, answer: dict[str, Any]) -> Action | None:
        if answer["resultCode"] in ("Authorised", "Refused"):
            assert "action" not in answer
            return None
        action = answer["action"]
        assert action["paymentMethodType"] == "scheme"
        if self.native:
            assert (answer["resultCode"], action["type"], action["subtype"]) == ("ChallengeShopper", "threeDS2",
                                                                                 "challenge")
            token = orjson.loads(base64.urlsafe_b64decode(action["token"] + "=" * (-len(action["token"]) % 4)))
            return Action("GET", token["acsURL"])
        assert (answer["resultCode"], action["type"]) == ("RedirectShopper", "redirect")
        return Action(action["method"], action["url"], action.get("data"))

    def expected_return(self, payment_id: str, params: dict[str, str], approved: bool) -> None:
        assert params["order"] and params.get("threeDSResult" if self.native else "redirectResult")

    async def complete(self, params: dict[str, str]) -> dict[str, Any]:
        details = {"threeDSResult": params["threeDSResult"]} if self.native else {
            "redirectResult": params["redirectResult"]}
        status, doc = await self._call("POST", "/v71/payments/details", json={"details": details},
                                       headers={**self.headers, "Idempotency-Key": f"details-{next(_seq)}"})
        assert status == 200, doc
        return doc

    def outcome(self, answer: dict[str, Any]) -> str:
        return {"Authorised": "approved", "Refused": "declined", "RedirectShopper": "pending",
                "ChallengeShopper": "pending", "Cancelled": "cancelled"}[answer["resultCode"]]

    async def read(self, payment_id: str) -> dict[str, Any]:
        status, doc = await self._call("GET", f"/v71/payments/{payment_id}", headers=self.headers)
        assert status == 200
        return doc

    async def cancel(self, payment_id: str) -> int:
        status, _ = await self._call("POST", f"/v71/payments/{payment_id}/cancels", headers=self.headers,
                                     json={"merchantAccount": MERCHANT, "reference": f"cancel-{payment_id}"})
        return status


class NativeAdyenDriver(AdyenDriver):
    native = True


class CheckoutDriver(Driver):
    kind = "checkout"
    frictionless = "4485040371536584"  # 3DS2 frictionless, authentication successful
    challenge = "4010061700000021"  # 3DS2 challenge, authentication successful
    approved_event, declined_event = "payment_approved", "payment_authentication_failed"
    cancelled_event = "payment_canceled"
    headers = {"Authorization": "Bearer sk_sbox_threeds"}

    async def pay(self, card: str, reference: str) -> tuple[int, dict[str, Any]]:
        doc = {"source": {"type": "card", "number": card, "expiry_month": 3, "expiry_year": 2030, "cvv": "100"},
               "amount": 1500, "currency": "EUR", "reference": reference, "3ds": {"enabled": True},
               "success_url": f"{self.shop.url}/success?order={reference}",
               "failure_url": f"{self.shop.url}/failure?order={reference}"}
        return await self._call("POST", "/payments", json=doc,
                                headers={**self.headers, "Cko-Idempotency-Key": f"{reference}-auth"})

    def payment_id(self, answer: dict[str, Any]) -> str:
        return str(answer["id"])

    def action(self, answer: dict[str, Any]) -> Action | None:
        if answer["status"] != "Pending":
            assert "redirect" not in answer["_links"]
            return None
        return Action("GET", answer["_links"]["redirect"]["href"])

    def expected_return(self, payment_id: str, params: dict[str, str], approved: bool) -> None:
        assert params["cko-session-id"].startswith("sid_") and params["order"]

    async def complete(self, params: dict[str, str]) -> dict[str, Any]:
        return await self.read(params["cko-session-id"])

    def outcome(self, answer: dict[str, Any]) -> str:
        return {"Authorized": "approved", "Captured": "approved", "Declined": "declined", "Pending": "pending",
                "Canceled": "cancelled"}[answer["status"]]

    async def read(self, payment_id: str) -> dict[str, Any]:
        status, doc = await self._call("GET", f"/payments/{payment_id}", headers=self.headers)
        assert status == 200
        return doc

    async def cancel(self, payment_id: str) -> int:
        status, _ = await self._call("POST", f"/payments/{payment_id}/voids", json={"reference": "abandoned"},
                                     headers={**self.headers, "Cko-Idempotency-Key": f"void-{payment_id}"})
        return status


DRIVERS: dict[str, type[Driver]] = {"stripe": StripeDriver, "adyen": AdyenDriver, "adyen-native": NativeAdyenDriver,
                                    "checkout": CheckoutDriver}


@dataclass
class Rig:
    driver: Driver
    browser: Browser
    receiver: Receiver
    shop: Shop

    @property
    def server(self) -> EmulatorServer:
        return self.driver.server

    @property
    def kind(self) -> str:
        return self.driver.kind

    async def events_for(self, payment_id: str, n: int) -> list[str]:
        """The next `n` notifications, each verified, all about `payment_id`."""
        got = await self.receiver.take(n)
        assert all(verified(self.kind, r.headers, r.body) for r in got)
        assert {payment_of(self.kind, r.body) for r in got} == {payment_id}
        return [label(self.kind, r.body) for r in got]

    def charges(self, reference: str) -> int:
        return sum(1 for e in self.server.emulator.ledger.charges() if e.payment_ref == reference)


async def _shop(aiohttp_server: Callable[..., Any]) -> Shop:
    app = web.Application()
    shop = Shop("")
    app.router.add_get("/{page}", shop.handle)
    server = await aiohttp_server(app)
    shop.url = str(server.make_url("")).rstrip("/")
    return shop


async def _receiver(aiohttp_server: Callable[..., Any], kind: str) -> tuple[Receiver, str]:
    receiver = Receiver(kind, check=True)
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    server = await aiohttp_server(app)
    return receiver, str(server.make_url("/hooks"))


@pytest.fixture(params=sorted(DRIVERS))
async def rig(request: pytest.FixtureRequest, aiohttp_server: Callable[..., Any]) -> AsyncIterator[Rig]:
    driver_class = DRIVERS[request.param]
    shop = await _shop(aiohttp_server)
    receiver, hooks = await _receiver(aiohttp_server, driver_class.kind)
    server = EmulatorServer(EMULATORS[driver_class.kind].emulator())
    server.emulator.webhooks.set_target(WebhookTarget(url=hooks, secret=SECRETS[driver_class.kind]))
    await server.start()
    try:
        async with ClientSession() as http:
            yield Rig(driver_class(server, http, shop), Browser(http), receiver, shop)
    finally:
        await server.stop()


# -- the flows ----------------------------------------------------------------------------------------


async def test_a_frictionless_card_is_approved_without_an_action(rig: Rig) -> None:
    reference = f"pay_3ds_{next(_seq)}"
    status, answer = await rig.driver.pay(rig.driver.frictionless, reference)
    assert status in (200, 201), answer
    assert rig.driver.action(answer) is None
    payment_id = rig.driver.payment_id(answer)
    assert rig.driver.outcome(await rig.driver.read(payment_id)) == "approved"
    assert (await rig.events_for(payment_id, 1))[0] == rig.driver.approved_event
    assert rig.charges(reference) == 1 and rig.server.emulator.challenges.snapshot() == []


async def test_a_completed_challenge_is_approved_and_notified_once(rig: Rig) -> None:
    reference = f"pay_3ds_{next(_seq)}"
    status, answer = await rig.driver.pay(rig.driver.challenge, reference)
    assert status == (202 if rig.kind == "checkout" else 200), answer
    payment_id = rig.driver.payment_id(answer)
    action = rig.driver.action(answer)
    assert action is not None
    assert rig.charges(reference) == 0  # nothing charged while the shopper is away
    assert rig.driver.outcome(await rig.driver.read(payment_id)) == "pending"

    assert await rig.browser.press(action.method, action.url, "Complete", action.data) == 200
    path, params = await rig.shop.returned()
    assert path in ("/return", "/success")
    rig.driver.expected_return(payment_id, params, approved=True)
    completed = await rig.driver.complete(params)  # the completion call first, then the webhook
    assert rig.driver.outcome(completed) == "approved"
    events = await rig.events_for(payment_id, 2 if rig.kind == "checkout" else 1)
    assert events[0] == rig.driver.approved_event  # (Checkout.com then captures: payment_captured)

    # The shopper presses again (a reload, a double click): back to the shop, nothing changes.
    async with rig.browser.http.post(action.url, data={"choice": "complete"}) as again:
        assert again.status == 200
    assert (await rig.shop.returned())[1] == params
    assert rig.driver.outcome(await rig.driver.complete(params)) == "approved"
    assert rig.charges(reference) == 1 and rig.server.emulator.ledger.duplicates() == {}
    await rig.server.emulator.webhooks.idle()
    assert len(rig.server.emulator.webhooks.emitted()) == len(events)


async def test_a_failed_challenge_is_declined_and_notified(rig: Rig) -> None:
    reference = f"pay_3ds_{next(_seq)}"
    _, answer = await rig.driver.pay(rig.driver.challenge, reference)
    payment_id = rig.driver.payment_id(answer)
    action = rig.driver.action(answer)
    assert action is not None
    assert await rig.browser.press(action.method, action.url, "Fail", action.data) == 200
    path, params = await rig.shop.returned()
    assert path in ("/return", "/failure")
    rig.driver.expected_return(payment_id, params, approved=False)
    assert await rig.events_for(payment_id, 1) == [rig.driver.declined_event]  # the webhook first this time
    assert rig.driver.outcome(await rig.driver.complete(params)) == "declined"
    assert rig.driver.outcome(await rig.driver.read(payment_id)) == "declined"
    assert rig.charges(reference) == 0


async def test_an_abandoned_challenge_waits_until_it_is_cancelled(rig: Rig) -> None:
    reference = f"pay_3ds_{next(_seq)}"
    _, answer = await rig.driver.pay(rig.driver.challenge, reference)
    payment_id = rig.driver.payment_id(answer)
    action = rig.driver.action(answer)
    assert action is not None
    await rig.browser.open(action.method, action.url, action.data)  # the shopper looks, then leaves
    assert rig.driver.outcome(await rig.driver.read(payment_id)) == "pending"
    assert rig.server.emulator.webhooks.emitted() == []  # no outcome, so no notification yet

    assert await rig.driver.cancel(payment_id) in (200, 201, 202)
    assert await rig.events_for(payment_id, 1) == [rig.driver.cancelled_event]
    assert rig.driver.outcome(await rig.driver.read(payment_id)) == "cancelled"
    # The shopper comes back too late: the page is gone and nothing is charged.
    async with rig.browser.http.get(action.url) as late:
        assert late.status == 410
    async with rig.browser.http.post(action.url, data={"choice": "complete"}) as late:
        assert late.status == 410
    assert rig.charges(reference) == 0
    assert rig.shop.returns.empty()
    assert [c["state"] for c in rig.server.emulator.challenges.snapshot()] == ["cancelled"]
