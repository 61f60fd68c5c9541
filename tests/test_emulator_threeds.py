"""3-D Secure at the emulators, driven as a shop and a shopper's browser would drive it.

Each test talks to a real emulator on loopback in its provider's own request shape, follows the
action to the emulator's challenge page, posts the page's form as a browser does (aiohttp follows
the 303 like a browser), lands on a return-URL server the test runs (the "shop"), and then makes
the provider's completion call with what the browser brought back. The signed notification goes
to a receiver the test runs, and is verified the provider's way (tests/test_emulator_webhooks.py).
The same flow runs over mTLS as the gateway reaches the emulators, and once in Debian's headless
chromium (the page needs no JavaScript). Last, the official SDKs read the action shapes the
emulators answer with.
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

    def challenge_state(self, payment_id: str) -> str:
        """What the ledger records of the shopper's choice."""
        entry = self.server.emulator.ledger.get(payment_id)
        assert entry is not None
        return str(entry.extra["three_ds"]["state"])

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
    assert rig.challenge_state(payment_id) == "pending"
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
    assert rig.challenge_state(payment_id) == "authenticated"
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
    assert rig.charges(reference) == 0 and rig.challenge_state(payment_id) == "failed"


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
    assert rig.challenge_state(payment_id) == "cancelled"


# -- over TLS, as the gateway reaches the emulators ------------------------------------------------


@pytest.mark.parametrize("kind", ["stripe", "adyen", "checkout"])
async def test_the_challenge_works_over_mtls(kind: str, dev_certs: DevCertLayout,
                                             aiohttp_server: Callable[..., Any]) -> None:
    """The emulator as `gateway emulator` and drills start it: HTTPS with client certificates;
    the challenge page is served on the same site and the browser trusts the dev CA."""
    shop = await _shop(aiohttp_server)
    receiver, hooks = await _receiver(aiohttp_server, kind)
    server = await start_emulator(kind, certs=dev_certs, webhook=WebhookTarget(url=hooks, secret=SECRETS[kind]))
    tls = client_context(dev_certs.provider_ca(kind), dev_certs.client_cert(kind), dev_certs.client_key(kind))
    try:
        assert server.url.startswith("https://")
        async with ClientSession() as http:
            driver = DRIVERS[kind](server, http, shop, tls)
            rig = Rig(driver, Browser(http, tls), receiver, shop)
            reference = f"pay_3ds_tls_{next(_seq)}"
            _, answer = await driver.pay(driver.challenge, reference)
            action = driver.action(answer)
            assert action is not None and action.url.startswith(server.url)
            assert await rig.browser.press(action.method, action.url, "Complete", action.data) == 200
            _, params = await shop.returned()
            assert driver.outcome(await driver.complete(params)) == "approved"
            assert (await rig.events_for(driver.payment_id(answer), 1))[0] == driver.approved_event
            assert rig.charges(reference) == 1
    finally:
        await server.stop()


# -- the official SDKs read the action shapes -----------------------------------------------------------


class _DirectSession(HttpClientBuilderInterface):
    """A requests session that ignores proxy settings from the environment: loopback only."""

    def __init__(self) -> None:
        self.session = requests.Session()
        self.session.trust_env = False

    def get_client(self) -> requests.Session:
        return self.session


@pytest.fixture
def direct() -> Iterator[_DirectSession]:
    http = _DirectSession()
    try:
        yield http
    finally:
        http.session.close()


@pytest.fixture
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[EmulatorServer]:
    server = EmulatorServer(EMULATORS[request.param].emulator())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.parametrize("emulator", ["stripe"], indirect=True)
async def test_stripe_python_sees_redirect_to_url_and_the_result(
        emulator: EmulatorServer, direct: _DirectSession, aiohttp_server: Callable[..., Any]) -> None:
    shop = await _shop(aiohttp_server)
    client = stripe.StripeClient("sk_test_threeds", base_addresses={"api": emulator.url}, max_network_retries=0,
                                 http_client=stripe.RequestsClient(session=direct.session))
    params: Any = {"amount": 1500, "currency": "eur", "confirm": True, "payment_method": "pm_card_threeDSecure2Required",
                   "return_url": f"{shop.url}/return", "metadata": {"gateway_payment_id": "pay_sdk_3ds"}}
    intent = await asyncio.to_thread(client.v1.payment_intents.create, params, {"idempotency_key": "sdk-3ds"})
    assert isinstance(intent, stripe.PaymentIntent) and intent.status == "requires_action"
    assert intent.next_action is not None and intent.next_action.type == "redirect_to_url"
    redirect = intent.next_action.redirect_to_url
    assert redirect is not None and redirect.url and redirect.url.startswith(emulator.url)
    assert redirect.return_url == f"{shop.url}/return"
    # The same shape, constructed from the raw JSON the way a webhook handler or client would.
    raw = await asyncio.to_thread(direct.session.get, f"{emulator.url}/v1/payment_intents/{intent.id}",
                                  headers={"Authorization": "Bearer sk_test_threeds"})
    constructed = stripe.PaymentIntent.construct_from(raw.json(), "sk_test_threeds")
    assert constructed.next_action.redirect_to_url.url == redirect.url  # type: ignore[union-attr]
    # Confirming while the shopper is away answers the same action.
    again = await asyncio.to_thread(client.v1.payment_intents.confirm, intent.id)
    assert again.status == "requires_action"

    async with ClientSession() as http:
        assert await Browser(http).press("GET", redirect.url, "Complete") == 200
    _, back = await shop.returned()
    assert back["payment_intent"] == intent.id and back["redirect_status"] == "succeeded"
    done = await asyncio.to_thread(client.v1.payment_intents.retrieve, intent.id)
    assert done.status == "succeeded" and done.next_action is None
    with pytest.raises(stripe.InvalidRequestError) as info:
        await asyncio.to_thread(client.v1.payment_intents.confirm, intent.id)
    assert info.value.code == "payment_intent_unexpected_state"


@pytest.mark.parametrize("emulator", ["adyen"], indirect=True)
async def test_adyen_python_sees_the_redirect_action_and_completes_with_details(
        emulator: EmulatorServer, aiohttp_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    shop = await _shop(aiohttp_server)
    checkout = Adyen.Adyen(xapikey="AQE-sdk", platform="test", http_timeout=5).checkout
    checkout.payments_api.baseUrl = f"{emulator.url}/v71"
    request = {"amount": {"value": 1500, "currency": "EUR"}, "reference": "pay_sdk_3ds", "merchantAccount": MERCHANT,
               "returnUrl": f"{shop.url}/return",
               "paymentMethod": {"type": "scheme", "number": AdyenDriver.challenge, "expiryMonth": "03",
                                 "expiryYear": "2030", "cvc": "737"}}
    paid = await asyncio.to_thread(checkout.payments_api.payments, request, idempotency_key="sdk-3ds")
    assert paid.status_code == 200 and paid.message["resultCode"] == "RedirectShopper"
    action = paid.message["action"]
    assert (action["type"], action["method"]) == ("redirect", "GET") and action["url"].startswith(emulator.url)

    async with ClientSession() as http:
        assert await Browser(http).press(action["method"], action["url"], "Complete") == 200
    _, back = await shop.returned()
    details = await asyncio.to_thread(checkout.payments_api.payments_details,
                                      {"details": {"redirectResult": back["redirectResult"]}},
                                      idempotency_key="sdk-3ds-details")
    assert details.status_code == 200 and details.message["resultCode"] == "Authorised"
    assert details.psp == paid.psp and "action" not in details.message


def _checkout_sdk(base_uri: str, http: _DirectSession) -> Any:
    environment = Environment(base_uri=base_uri, authorization_uri=base_uri + "connect/token", files_uri=base_uri,
                              transfers_uri=base_uri, balances_uri=base_uri, forward_uri=base_uri,
                              identity_uri=base_uri, is_sandbox=True)
    builder = CheckoutSdk.builder().secret_key("sk_sbox_" + "t" * 27).environment(environment)
    # A loopback address takes no merchant subdomain: the SDK's shared host (deprecated), as in
    # tests/test_provider_checkout.py.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return builder.http_client_builder(http).use_legacy_domain().build()


@pytest.mark.parametrize("emulator", ["checkout"], indirect=True)
async def test_checkout_sdk_sees_pending_with_a_redirect_link_and_the_result(
        emulator: EmulatorServer, direct: _DirectSession, aiohttp_server: Callable[..., Any]) -> None:
    shop = await _shop(aiohttp_server)
    payments = _checkout_sdk(emulator.url + "/", direct).payments
    source = PaymentRequestCardSource()
    source.number, source.expiry_month, source.expiry_year, source.cvv = CheckoutDriver.challenge, 3, 2030, "100"
    three_ds = ThreeDsRequest()
    three_ds.enabled = True
    request = PaymentRequest()
    request.source, request.amount, request.currency, request.reference = source, 1500, Currency.EUR, "pay_sdk_3ds"
    request.three_ds, request.success_url, request.failure_url = three_ds, f"{shop.url}/success", f"{shop.url}/failure"
    pending = await asyncio.to_thread(payments.request_payment, request, "sdk-3ds")
    assert pending.http_metadata.status_code == 202 and pending.status == "Pending"
    href = getattr(pending, "_links").redirect.href
    assert href.startswith(emulator.url)

    async with ClientSession() as http:
        assert await Browser(http).press("GET", href, "Complete") == 200
    path, back = await shop.returned()
    assert path == "/success"
    done = await asyncio.to_thread(payments.get_payment_details, back["cko-session-id"])
    assert (done.id, done.status, done.approved) == (pending.id, "Captured", True)
    assert urlsplit(href).path.startswith("/3ds/")


@pytest.mark.parametrize("kind", ["stripe", "checkout"])
async def test_a_card_that_authenticates_can_still_be_declined(kind: str, aiohttp_server: Callable[..., Any]) -> None:
    """Stripe's "3DS required, then declined" card and Checkout.com's "not authenticated"
    challenge card: the shopper completes the challenge and the payment is still declined."""
    card = EMULATORS[kind].threeds_cards()[{"stripe": "challenge_then_declined",
                                            "checkout": "challenge_not_authenticated"}[kind]]
    shop = await _shop(aiohttp_server)
    receiver, hooks = await _receiver(aiohttp_server, kind)
    server = EmulatorServer(EMULATORS[kind].emulator())
    server.emulator.webhooks.set_target(WebhookTarget(url=hooks, secret=SECRETS[kind]))
    await server.start()
    try:
        async with ClientSession() as http:
            driver = DRIVERS[kind](server, http, shop)
            rig = Rig(driver, Browser(http), receiver, shop)
            reference = f"pay_3ds_{next(_seq)}"
            _, answer = await driver.pay(card, reference)
            action = driver.action(answer)
            assert action is not None
            assert await rig.browser.press(action.method, action.url, "Complete") == 200
            _, params = await shop.returned()
            driver.expected_return(driver.payment_id(answer), params, approved=False)
            completed = await driver.complete(params)
            assert driver.outcome(completed) == "declined"
            if kind == "stripe":
                assert completed["last_payment_error"]["code"] == "card_declined"  # Stripe's "card_declined failure code"
            assert await rig.events_for(driver.payment_id(answer), 1) == [driver.declined_event]
            assert rig.charges(reference) == 0
    finally:
        await server.stop()


@pytest.mark.parametrize("emulator", ["stripe"], indirect=True)
async def test_stripe_without_a_return_url_answers_use_stripe_sdk_and_optional_cards_challenge_on_request(
        emulator: EmulatorServer) -> None:
    headers = {"Authorization": "Bearer sk_test_threeds"}
    base = {"amount": "900", "currency": "eur", "confirm": "true", "payment_method_data[type]": "card"}
    async with ClientSession() as http:
        async with http.post(f"{emulator.url}/v1/payment_intents", headers=headers, data={
                **base, "payment_method_data[card][number]": StripeDriver.challenge}) as answer:
            doc = await answer.json()
        assert (doc["status"], doc["next_action"]["type"]) == ("requires_action", "use_stripe_sdk")
        assert doc["next_action"]["use_stripe_sdk"]["stripe_js"].startswith(emulator.url)
        async with http.post(f"{emulator.url}/v1/payment_intents", headers=headers, data={
                **base, "payment_method_data[card][number]": StripeDriver.frictionless,
                "payment_method_options[card][request_three_d_secure]": "any",
                "return_url": "http://127.0.0.1:9/return"}) as answer:
            doc = await answer.json()
        assert (doc["status"], doc["next_action"]["type"]) == ("requires_action", "redirect_to_url")


@pytest.mark.parametrize("emulator", ["adyen"], indirect=True)
async def test_the_page_and_details_refuse_what_no_shopper_brought(emulator: EmulatorServer) -> None:
    """Bad input gets a clear 4xx: an unknown challenge, a choice that is neither button, a
    redirectResult the emulator never issued, a details call before the shopper came back."""
    headers = {"X-API-Key": "AQE-threeds-test"}
    async with ClientSession() as http:
        async with http.get(f"{emulator.url}/3ds/challenge/unknown") as page:
            assert page.status == 410
        async with http.post(f"{emulator.url}/v71/payments", headers=headers, json={
                "amount": {"value": 100, "currency": "EUR"}, "reference": "pay_bad", "merchantAccount": MERCHANT,
                "returnUrl": "http://127.0.0.1:9/return",
                "paymentMethod": {"type": "scheme", "number": AdyenDriver.challenge, "expiryMonth": "03",
                                  "expiryYear": "2030"}}) as answer:
            url = (await answer.json())["action"]["url"]
        async with http.post(url, data={"choice": "maybe"}) as page:
            assert page.status == 400
        token = urlsplit(url).path.rsplit("/", 1)[1]
        early = base64.urlsafe_b64encode(orjson.dumps({"token": token})).decode()
        for result in ("not-base64!", base64.urlsafe_b64encode(b"[1]").decode(), early):
            async with http.post(f"{emulator.url}/v71/payments/details", headers=headers,
                                 json={"details": {"redirectResult": result}}) as answer:
                assert answer.status == 422 and (await answer.json())["errorType"] == "validation"
        async with http.post(f"{emulator.url}/v71/payments/details", headers=headers, json={"details": {}}) as answer:
            assert answer.status == 422
    assert emulator.emulator.ledger.charges() == []


# -- a real browser on the challenge page --------------------------------------------------------------


def _chromium(profile: str) -> Any:
    """Debian's headless chromium through Selenium, as tests/test_console_browser.py drives it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))


def _click_through(browser: Any, url: str, button: str) -> str:
    """Blocking: open the challenge page, click the button, return the URL the browser lands on."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    browser.find_element(By.ID, button).click()
    WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: "Back at the shop" in b.page_source)
    return str(browser.current_url)


@pytest.mark.parametrize("kind", ["stripe", "adyen", "checkout"])
async def test_headless_chromium_completes_the_challenge_without_javascript(
        kind: str, aiohttp_server: Callable[..., Any], tmp_path: Any) -> None:
    shop = await _shop(aiohttp_server)
    server = EmulatorServer(EMULATORS[kind].emulator())
    await server.start()
    browser = await asyncio.to_thread(_chromium, str(tmp_path / "chromium"))
    try:
        async with ClientSession() as http:
            driver = DRIVERS[kind](server, http, shop)
            _, answer = await driver.pay(driver.challenge, f"pay_3ds_chromium_{next(_seq)}")
            action = driver.action(answer)
            assert action is not None and action.method == "GET"
            landed = await asyncio.to_thread(_click_through, browser, action.url, "complete")
            assert landed.startswith(shop.url)
            _, params = await shop.returned()
            driver.expected_return(driver.payment_id(answer), params, approved=True)
            assert driver.outcome(await driver.complete(params)) == "approved"
    finally:
        await asyncio.to_thread(browser.quit)
        await server.stop()
