"""3-D Secure end to end in a real browser: Debian's headless chromium through Selenium (as
tests/test_console_browser.py drives it), at each of the three providers' emulators.

The test runs a small shop: its checkout page has a Pay button; the shop's server posts the
payment to the gateway (the API key never reaches the browser) with a return URL of its own,
and answers the browser with a redirect to the action's URL, the emulator's challenge page.
The browser clicks Complete (or Fail) there, the emulator sends it back to the shop's return
page with its provider's parameters, and the shop's server calls the gateway's `/complete`
with them and shows the payment's status.
"""

from __future__ import annotations

import asyncio
import html
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from emulators.registry import EMULATORS
from emulators.server import EmulatorServer
from gateway.certs.devca import DevCertLayout
from gateway.config import parse_config
from gateway.emulator_launch import start_emulator
from emulators.webhooks import WebhookTarget
from gateway.app_keys import WEBHOOKS
from tests.conftest import AUTH, card_payment, gateway_config_data, journal
from tests.test_emulator_threeds import _chromium
from tests.test_threeds_api import PLAIN_HTTP
from tests.test_threeds_webhooks import SECRETS
from tests.webhook_shapes import WEBHOOK_ENV, WEBHOOK_PROVIDERS


@dataclass
class Shop:
    """The merchant: a checkout page, the server side that talks to the gateway, a return page."""

    gateway: TestClient
    card: str
    url: str = ""
    # Awaited on the return page before /complete (the provider's webhook applied first).
    before_complete: Callable[[], Awaitable[Any]] | None = None
    orders: dict[str, str] = field(default_factory=dict)  # order -> payment id
    completions: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/checkout", self.checkout)
        app.router.add_post("/pay", self.pay)
        app.router.add_get("/return", self.back)
        return app

    async def checkout(self, _request: web.Request) -> web.Response:
        return _page("Checkout", '<form method="post" action="/pay"><button id="pay" type="submit">Pay 12.99 EUR'
                                 "</button></form>")

    async def pay(self, _request: web.Request) -> web.StreamResponse:
        order = f"order-{uuid.uuid4().hex[:10]}"
        body = card_payment(self.card, merchant_reference=order, return_url=f"{self.url}/return?order={order}")
        resp = await self.gateway.post("/v1/payments", json=body,
                                       headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
        doc = await resp.json()
        self.orders[order] = doc["id"]
        if doc["status"] != "action_required":
            return _page("Payment", f'<p id="status">{html.escape(doc["status"])}</p>')
        action = doc["action"]
        assert action["type"] == "redirect" and action["method"] == "GET", action
        raise web.HTTPSeeOther(action["url"])  # to the provider's challenge page

    async def back(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        payment_id = self.orders[params.pop("order")]
        if self.before_complete is not None:
            await self.before_complete()
        resp = await self.gateway.post(f"/v1/payments/{payment_id}/complete", json={"return_params": params},
                                       headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
        doc = await resp.json()
        self.completions.append({"http": resp.status, **doc})
        return _page("Payment", f'<p id="status">{html.escape(str(doc.get("status") or doc.get("code")))}</p>')


def _page(title: str, body: str) -> web.Response:
    return web.Response(text=f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>",
                        content_type="text/html")


def _shop_in_browser(browser: Any, checkout_url: str, button: str) -> str:
    """Blocking: the shopper pays, acts on the challenge page, and reads the shop's answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(checkout_url)
    browser.find_element(By.ID, "pay").click()
    WebDriverWait(browser, 15, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, button))
    assert "3-D Secure" in browser.title
    browser.find_element(By.ID, button).click()
    WebDriverWait(browser, 15, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, "status"))
    return str(browser.find_element(By.ID, "status").text)


@pytest.fixture(params=["stripe", "adyen", "checkout"])
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, EmulatorServer]]:
    server = await start_emulator(request.param)  # plain HTTP: the browser has no client certificate
    try:
        yield request.param, server
    finally:
        await server.stop()


@pytest.mark.parametrize(("button", "expected"), [("complete", "approved"), ("fail", "declined")])
async def test_a_shopper_passes_the_challenge_in_chromium(
        provider: tuple[str, EmulatorServer], button: str, expected: str, tmp_path: Path, dev_certs: DevCertLayout,
        aiohttp_server: Callable[..., Any], start_gateway: Callable[..., Any]) -> None:
    kind, emulator = provider
    data = gateway_config_data(tmp_path, dev_certs, {kind: emulator}, (kind,), every_provider=PLAIN_HTTP,
                               route={"return_url": "required"},
                               three_ds={"allow_http_loopback_return_url": True})
    gateway = await start_gateway(parse_config(data))
    shop = Shop(gateway, EMULATORS[kind].threeds_cards()["challenge"])
    server = await aiohttp_server(shop.app())
    shop.url = str(server.make_url("")).rstrip("/")
    browser = await asyncio.to_thread(_chromium, str(tmp_path / "chromium"))
    try:
        shown = await asyncio.to_thread(_shop_in_browser, browser, f"{shop.url}/checkout", button)
    finally:
        await asyncio.to_thread(browser.quit)
    assert shown == expected
    [done] = shop.completions
    assert (done["http"], done["status"], done["provider"]) == (200, expected, kind)
    [payment_id] = shop.orders.values()
    assert len(emulator.emulator.ledger.charges()) == (1 if expected == "approved" else 0)
    got = await (await gateway.get(f"/v1/payments/{payment_id}", headers=AUTH)).json()
    assert got["status"] == expected and got["action"] is None


async def test_the_webhook_settles_first_and_the_return_page_sees_it(
        provider: tuple[str, EmulatorServer], tmp_path: Path, dev_certs: DevCertLayout,
        aiohttp_server: Callable[..., Any], start_gateway: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's signed notification reaches the gateway and is applied before the
    shopper's browser is back: /complete then finds the payment approved and changes nothing."""
    kind, emulator = provider
    for name, value in WEBHOOK_ENV.items():
        monkeypatch.setenv(name, value)
    data = gateway_config_data(tmp_path, dev_certs, {kind: emulator}, (kind,), every_provider=PLAIN_HTTP,
                               providers={kind: WEBHOOK_PROVIDERS[kind]}, route={"return_url": "required"},
                               three_ds={"allow_http_loopback_return_url": True})
    gateway = await start_gateway(parse_config(data), webhook_interval_s=3600)
    emulator.emulator.webhooks.set_target(WebhookTarget(url=str(gateway.make_url(f"/v1/webhooks/{kind}")),
                                                        secret=SECRETS[kind], time_factor=0.001))
    versions: list[int] = []

    async def webhook_first() -> None:
        await emulator.emulator.webhooks.idle()
        await gateway.app[WEBHOOKS].processor.run_once()
        [payment_id] = shop.orders.values()
        record = await journal(gateway, payment_id)
        assert record.status.value == "approved"  # settled by the notification alone
        versions.append(record.version)

    shop = Shop(gateway, EMULATORS[kind].threeds_cards()["challenge"], before_complete=webhook_first)
    server = await aiohttp_server(shop.app())
    shop.url = str(server.make_url("")).rstrip("/")
    browser = await asyncio.to_thread(_chromium, str(tmp_path / "chromium"))
    try:
        shown = await asyncio.to_thread(_shop_in_browser, browser, f"{shop.url}/checkout", "complete")
    finally:
        await asyncio.to_thread(browser.quit)
    assert shown == "approved" and [c["http"] for c in shop.completions] == [200]
    [payment_id] = shop.orders.values()
    assert [(await journal(gateway, payment_id)).version] == versions  # /complete changed nothing
    assert len(emulator.emulator.ledger.charges()) == 1
