"""`gateway drill threeds`: 3-D Secure under load, with faults at the primary.

A share of the cards is challenged (the primary's own 3-D Secure test cards), some are
frictionless, the rest plain. Every payment carries a return URL to a shop page the drill runs
on loopback. A payment answered `action_required` has a shopper: they follow the action to the
emulator's challenge page and press Complete or Fail (the browser then lands on the shop's
return page, and the checkout calls `/complete` with what it brought back), or they abandon it,
and the reconciler must cancel it at the provider once `three_ds.action_expiry_s` has passed.
The route lists the action's own codes in `cascade_on`, and 15% of the primary's authorisations
answer 503 before processing and 10% create the payment and then hang past the per-try timeout
(the status query finds it waiting for its shopper), so the engine has every chance to send a
challenged payment elsewhere and must never do so.

Its JSON adds `action_required` (payments a provider asked a shopper for), `failed_over_after_action`
(payments with any call to another provider after that answer: must be 0), `abandoned_expired`
(abandoned challenges that ended `failed` / `expired`: must equal `shoppers_abandoned`), the
shoppers' choices and `completions` (answers of /complete), on top of every drill's invariants
(no duplicate, nothing lost, the journal equal to the ledgers).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import orjson
from aiohttp import web

from emulators.registry import EMULATORS
from emulators.server import EmulatorServer
from gateway.app_keys import RECONCILER
from gateway.certs.devca import DevCertLayout, generate_dev_certs
from gateway.certs.tls import client_context
from gateway.drill.report import SendResult, summarize
from gateway.drill.runner import (
    HOST,
    DrillOptions,
    DrillReport,
    PlannedPayment,
    ProgressHook,
    RunSetup,
    answer_result,
    client_session,
    inject_faults,
    ledger_view,
    lift_faults,
    read_journal,
    start_emulators,
    start_gateway_in_process,
)
from gateway.drill.scenarios import THREEDS, Scenario

CHALLENGE_SHARE = 0.4
FRICTIONLESS_SHARE = 0.2
CHOICES = (("complete", 0.6), ("fail", 0.2), ("abandon", 0.2))
ACTION_EXPIRY_S = 5.0  # a shopper who has not finished by then has abandoned the challenge
SETTLE_MAX_S = 20.0
SETTLE_PAUSE_S = 0.2
SHOPPER_TIMEOUT_S = 10.0
# The codes the providers' action answers carry: a route listing them must still never cascade.
ACTION_CODES = ("requires_action", "RedirectShopper", "ChallengeShopper", "Pending")


@dataclass(frozen=True, slots=True)
class Shopper:
    card_kind: str  # challenge, frictionless or plain
    choice: str  # complete, fail or abandon (only acted on when a provider asks)


@dataclass(slots=True)
class Outcome:
    send: SendResult
    shopper: Shopper
    acted: str | None = None  # what the shopper did: complete, fail, abandon; None: no action asked
    completion_status: int | None = None


class ReturnPage:
    """The shop's return URL: each order's browser comes back here with the provider's parameters."""

    def __init__(self) -> None:
        self.url = ""
        self._waiting: dict[str, asyncio.Future[dict[str, str]]] = {}

    def expect(self, order: str) -> asyncio.Future[dict[str, str]]:
        return self._waiting.setdefault(order, asyncio.get_running_loop().create_future())

    async def handle(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        future = self._waiting.get(params.pop("order", ""))
        if future is not None and not future.done():
            future.set_result(params)
        return web.Response(text="<p>Back at the shop.</p>", content_type="text/html")


def plan_shoppers(primary: str, plan: Sequence[PlannedPayment], seed: int) -> list[Shopper]:
    rng = random.Random(seed)
    shoppers = []
    for _ in plan:
        draw = rng.random()
        kind = ("challenge" if draw < CHALLENGE_SHARE else
                "frictionless" if draw < CHALLENGE_SHARE + FRICTIONLESS_SHARE else "plain")
        choice = rng.choices([c for c, _ in CHOICES], weights=[w for _, w in CHOICES])[0]
        shoppers.append(Shopper(kind, choice))
    return shoppers


def card_for(primary: str, shopper: Shopper) -> str:
    if shopper.card_kind == "plain":
        return EMULATORS[primary].scenario_cards()["approve"]
    return EMULATORS[primary].threeds_cards()[shopper.card_kind]


class Browsers:
    """The shoppers' browsers: the challenge pages are on the emulators' (mTLS) sites."""

    def __init__(self, servers: Mapping[str, EmulatorServer], certs: DevCertLayout) -> None:
        self._sites = {server.url: client_context(certs.provider_ca(kind), certs.client_cert(kind),
                                                  certs.client_key(kind)) for kind, server in servers.items()}

    def tls_for(self, url: str) -> ssl.SSLContext | bool:
        return next((ctx for site, ctx in self._sites.items() if url.startswith(site)), True)


async def act(http: aiohttp.ClientSession, browsers: Browsers, action: Mapping[str, Any], choice: str) -> bool:
    """The shopper opens the challenge page and presses a button (the page's form, as a browser
    posts it); False when the page is gone (expired) or not a challenge page."""
    tls = browsers.tls_for(str(action["url"]))
    async with http.request(str(action["method"]), str(action["url"]), data=action.get("data") or None,
                            ssl=tls) as page:
        if page.status != 200:
            return False
        text = await page.text()
    marker = 'form method="post" action="'
    start = text.find(marker)
    if start < 0:
        return False
    target = urljoin(str(action["url"]), text[start + len(marker):text.index('"', start + len(marker))])
    async with http.post(target, data={"choice": choice}, ssl=tls) as landed:
        await landed.read()
        return landed.status == 200


async def one_payment(session: aiohttp.ClientSession, http: aiohttp.ClientSession, browsers: Browsers,
                      page: ReturnPage, payment: PlannedPayment, shopper: Shopper) -> Outcome:
    started = time.perf_counter()
    returned = page.expect(payment.merchant_reference)
    body = orjson.dumps({
        "amount": payment.amount, "currency": "EUR", "merchant_reference": payment.merchant_reference,
        "payment_method": {"type": "card", "number": payment.card, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        "return_url": f"{page.url}/return?order={payment.merchant_reference}", "metadata": {"drill": "threeds"}})
    try:
        async with session.post("/v1/payments", data=body, headers={
                "Idempotency-Key": payment.idempotency_key, "Content-Type": "application/json"}) as response:
            status, raw = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(SendResult(payment.index, payment.merchant_reference, (time.perf_counter() - started) * 1000,
                                  error=type(exc).__name__), shopper)
    send = answer_result(payment, (time.perf_counter() - started) * 1000, status, raw)
    outcome = Outcome(send, shopper)
    doc = orjson.loads(raw)
    if send.status != "action_required" or not isinstance(doc.get("action"), dict):
        return outcome
    outcome.acted = shopper.choice
    if shopper.choice == "abandon" or doc["action"].get("type") != "redirect":
        outcome.acted = "abandon"
        return outcome
    if not await act(http, browsers, doc["action"], shopper.choice):
        return outcome
    params = await asyncio.wait_for(returned, SHOPPER_TIMEOUT_S)
    async with session.post(f"/v1/payments/{send.payment_id}/complete", data=orjson.dumps({"return_params": params}),
                            headers={"Idempotency-Key": f"{payment.idempotency_key}-complete",
                                     "Content-Type": "application/json"}) as response:
        outcome.completion_status = response.status
        await response.read()
    return outcome


async def final_status(session: aiohttp.ClientSession, outcome: Outcome) -> Outcome:
    """The payment as the checkout finally reads it (after completion or expiry)."""
    send = outcome.send
    if send.payment_id is None:
        return outcome
    async with session.get(f"/v1/payments/{send.payment_id}") as response:
        doc = orjson.loads(await response.read())
    outcome.send = SendResult(send.index, send.merchant_reference, send.latency_ms, send.http_status,
                              send.payment_id, doc.get("status"), send.error, send.decline_card)
    return outcome


async def settle(app: web.Application, until: float) -> int:
    """Reconciler passes until nothing is unresolved (abandoned challenges expire once their
    time is up) or the time cap passes."""
    reconciler = app[RECONCILER]
    settled = 0
    while time.monotonic() < until:
        if not await reconciler.service.store.unresolved_payments(limit=1):
            break
        settled += await reconciler.run_once(min_age_s=0, ignore_backoff=True)
        await asyncio.sleep(SETTLE_PAUSE_S)  # the providers' time, and the shoppers', pass
    return settled


def action_measures(journal: Sequence[Mapping[str, Any]], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The drill's own numbers, from the journal and what the shoppers did."""
    asked = after = 0
    for doc in journal:
        attempts = doc.get("attempts", [])
        first = next((i for i, a in enumerate(attempts) if a.get("outcome") == "action_required"), None)
        if first is None:
            continue
        asked += 1
        bound = attempts[first].get("provider")
        after += any(a.get("provider") != bound for a in attempts[first + 1:])
    by_id = {d["id"]: d for d in journal}
    abandoned = [o for o in outcomes if o.acted == "abandon"]
    expired = sum(1 for o in abandoned if (doc := by_id.get(o.send.payment_id or "")) is not None
                  and (doc.get("status"), doc.get("error_code")) == ("failed", "expired"))
    completions: dict[str, int] = {}
    for o in outcomes:
        if o.completion_status is not None:
            completions[str(o.completion_status)] = completions.get(str(o.completion_status), 0) + 1
    return {
        "action_required": asked,
        "failed_over_after_action": after,
        "abandoned_expired": expired,
        "shoppers_completed": sum(1 for o in outcomes if o.acted == "complete"),
        "shoppers_failed": sum(1 for o in outcomes if o.acted == "fail"),
        "shoppers_abandoned": len(abandoned),
        "completions": dict(sorted(completions.items())),
        "still_waiting": sum(1 for d in journal if d.get("status") == "action_required"),
    }


def gateway_sections(scenario: Scenario) -> dict[str, Any]:
    return {
        "three_ds": {"action_expiry_s": ACTION_EXPIRY_S, "allow_http_loopback_return_url": True},
        "routes": [{"name": "drill", "providers": list(scenario.route), "return_url": "required",
                    "cascade_on": ["do_not_honor", "issuer_not_available", "try_again_later", *ACTION_CODES]}],
    }


async def run_threeds_drill(options: DrillOptions | None = None, *,
                            on_progress: ProgressHook | None = None) -> DrillReport:
    options = options if options is not None else DrillOptions()
    scenario = THREEDS.with_primary(options.primary) if options.primary else THREEDS
    setup = RunSetup.new(scenario.name, options)
    started = time.monotonic()
    certs = await asyncio.to_thread(generate_dev_certs, setup.log_dir / "certs", list(scenario.route))
    plan = [PlannedPayment(i, f"{setup.reference_prefix}{i:06d}", f"{setup.reference_prefix}{i:06d}", "", False,
                           random.Random(setup.seed + i).randrange(1, 1000) * 100) for i in range(options.payments)]
    shoppers = plan_shoppers(scenario.primary, plan, setup.seed)
    plan = [PlannedPayment(p.index, p.merchant_reference, p.idempotency_key, card_for(scenario.primary, s), False,
                           p.amount) for p, s in zip(plan, shoppers)]
    extra: dict[str, Any] = {"seed": setup.seed, "run_id": setup.run_id}

    async with AsyncExitStack() as stack:
        servers = await start_emulators(stack, scenario.route, certs)
        gateway = await start_gateway_in_process(stack, scenario, setup, servers, certs, options.concurrency,
                                                 sections=gateway_sections(scenario))
        page = ReturnPage()
        shop = web.Application()
        shop.router.add_get("/return", page.handle)
        shop_runner = web.AppRunner(shop, access_log=None)
        await shop_runner.setup()
        stack.push_async_callback(shop_runner.cleanup)
        site = web.TCPSite(shop_runner, HOST, 0)
        await site.start()
        page.url = f"http://{HOST}:{next(a[1] for a in shop_runner.addresses if isinstance(a, tuple))}"
        browsers = Browsers(servers, certs)
        injections = await inject_faults(scenario, servers, setup.seed)
        outcomes: list[Outcome] = []
        try:
            load_started = time.monotonic()
            cap_at = load_started + options.max_seconds
            work = iter(zip(plan, shoppers))
            async with client_session(gateway.url, setup.client_key, options.concurrency) as session, \
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SHOPPER_TIMEOUT_S)) as http:
                async def worker() -> None:
                    for payment, shopper in work:
                        if time.monotonic() >= cap_at:
                            return
                        outcomes.append(await one_payment(session, http, browsers, page, payment, shopper))
                        if on_progress is not None:
                            on_progress(len(outcomes), len(plan))

                await asyncio.gather(*(worker() for _ in range(min(options.concurrency, len(plan)))))
                extra["load_seconds"] = round(time.monotonic() - load_started, 3)
                await lift_faults(injections)
                injections = []
                extra["reconciled_after_run"] = await settle(
                    gateway.app, time.monotonic() + ACTION_EXPIRY_S + SETTLE_MAX_S)
                outcomes = [await final_status(session, o) for o in outcomes]
        finally:
            await lift_faults(injections)
        ledger = ledger_view(servers)

    journal = await asyncio.to_thread(read_journal, Path(gateway.config.storage.sqlite_path), setup.reference_prefix)
    extra.update(action_measures(journal, outcomes))
    sends = [o.send for o in outcomes]
    summary = summarize(scenario=scenario, sends=sends, journal=journal, ledger=ledger,
                        abandoned=len(plan) - len(sends), seconds=time.monotonic() - started,
                        log_dir=str(setup.log_dir), extra=extra)
    return DrillReport(summary)
