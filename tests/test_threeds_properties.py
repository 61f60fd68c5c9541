"""Property test: a payment whose provider asked for its shopper (`action_required`) is never sent
to another provider, whatever the route's cascade list says and whatever faults surround it.

Each example draws 2-3 Stripe-kind providers (emulators over mTLS) with one fault each (outage,
503, 500 after processing, reset before sending, timeout after processing, latency, a forced
decline), a cascade list that may name every code the primary can answer (the action's own
`requires_action` and the failed challenge's code included), and a handful of payments with 3-D
Secure cards (challenged, challenged then declined, frictionless, and asked-for challenges) and
a shopper's choice for each (complete, fail, abandon). The shoppers act on the emulators'
challenge pages, the checkout calls `/complete`, faults are cleared, and the abandoned
challenges expire through the reconciler. Throughout:

- after an `action_required` answer from a provider, every later call of that payment (complete,
  status, the expiry's cancel) goes to that provider, and no other provider's ledger has an
  entry for it beyond the ones tried before the action;
- at most one charge per payment across all providers;
- once settled, the journal agrees with the provider: approved has its charge, declined and
  failed (`expired` included) have none.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.outcome import PaymentStatus
from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from gateway.app import build_app
from gateway.app_keys import RECONCILER
from gateway.certs.tls import client_context
from gateway.config import parse_config
from tests.conftest import AUTH, PROVIDER_NAMES, card_payment, engine_config_data, entries, journal
from tests.test_emulator_threeds import Browser, _shop

CARDS = {"challenge": ("4000000000003220", "automatic"), "challenge_then_declined": ("4000008400001629", "automatic"),
         "frictionless": ("4000000000003055", "automatic"), "asked": ("4000000000003055", "any"),
         "plain": ("4242424242424242", "automatic")}
# Every code a primary's first answer can carry here: the cascade list may name any of them.
CODES = ("requires_action", "do_not_honor", "generic_decline", "payment_intent_authentication_failure",
         "requires_payment_method")
FAULTS = ("none", "outage", "error_503", "error_500_after", "reset_before", "timeout_after", "latency",
          "decline_soft")
CHOICES = ("Complete", "Fail", "abandon")


@dataclass(frozen=True)
class Fault:
    kind: str
    share: float

    def rule(self) -> FaultRule | None:
        ops = ("authorize",)
        match self.kind:
            case "error_503":
                return FaultRule(kind="error", status=503, share=self.share, operations=ops)
            case "error_500_after":
                return FaultRule(kind="error", status=500, after_processing=True, share=self.share, operations=ops)
            case "reset_before":
                return FaultRule(kind="reset_before", share=self.share, operations=ops)
            case "timeout_after":
                return FaultRule(kind="timeout_after", hang_s=2, share=self.share, operations=ops)
            case "latency":
                return FaultRule(kind="latency", latency_ms=40, share=self.share)
            case "decline_soft":
                return FaultRule(kind="decline", decline_code="do_not_honor", share=self.share)
        return None


faults = st.builds(Fault, kind=st.sampled_from(FAULTS), share=st.sampled_from((1.0, 0.5)))
scenarios = st.integers(2, 3).flatmap(lambda n: st.tuples(
    st.lists(faults, min_size=n, max_size=n),
    st.lists(st.sampled_from(CODES), max_size=len(CODES), unique=True),
    st.lists(st.tuples(st.sampled_from(tuple(CARDS)), st.sampled_from(CHOICES)), min_size=1, max_size=4),
))
_examples = itertools.count()


def _providers_before_action(record: Any) -> tuple[str | None, set[str]]:
    """The provider that asked for the shopper (None: none did) and every provider tried up to
    and including that answer; asserts that no call after it went anywhere else."""
    for i, attempt in enumerate(record.attempts):
        if attempt.outcome == "action_required":
            later = {a.provider for a in record.attempts[i + 1:]}
            assert later <= {attempt.provider}, f"{record.id}: after the action at {attempt.provider}: {later}"
            return attempt.provider, {a.provider for a in record.attempts[:i + 1] if a.outcome != "skipped"}
    return None, {a.provider for a in record.attempts if a.outcome != "skipped"}


def _charges(servers: dict[str, EmulatorServer], payment_id: str) -> list[str]:
    return [name for name, s in servers.items() for e in entries(s, payment_id) if e.approved]


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios)
async def test_an_action_is_never_followed_by_another_provider(scenario, stripes, dev_certs, tmp_path: Path,
                                                               aiohttp_server) -> None:
    drawn, cascade_on, payments = scenario
    order = PROVIDER_NAMES[:len(drawn)]
    for seed, (name, fault) in enumerate(zip(order, drawn)):
        server = stripes[name]
        server.emulator.reset()
        await server.set_outage(fault.kind == "outage")
        if (rule := fault.rule()) is not None:
            server.emulator.faults.set(FaultPlan(rules=(rule,), seed=seed))
    shop = await _shop(aiohttp_server)
    config = parse_config(engine_config_data(
        tmp_path / f"ex-{next(_examples)}", dev_certs, stripes, order,
        providers={n: {"timeout_ms": 250, "breaker": {"fail_max": 3}} for n in order},
        route={"cascade_on": list(cascade_on), "return_url": "required"}, engine={"deadline_ms": 2000},
        three_ds={"allow_http_loopback_return_url": True, "action_expiry_s": 0.3}))
    tls = client_context(dev_certs.provider_ca("stripe"), dev_certs.client_cert("stripe"),
                         dev_certs.client_key("stripe"))

    async with TestClient(TestServer(build_app(config, reconcile_interval_s=3600))) as client, \
            ClientSession() as http:
        browser = Browser(http, tls)
        answered: list[tuple[dict[str, Any], str]] = []
        for n, (card, choice) in enumerate(payments):  # one after another: seeded faults hit the same calls
            number, three_ds = CARDS[card]
            body = card_payment(number, merchant_reference=f"order-{n}", three_ds=three_ds,
                                return_url=f"{shop.url}/return?n={n}")
            resp = await client.post("/v1/payments", json=body, headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
            doc = await resp.json()
            assert resp.status in (201, 502), doc
            answered.append((doc, choice))

        for doc, choice in answered:
            record = await journal(client, doc["id"])
            bound, tried = _providers_before_action(record)
            if doc["status"] == "action_required":
                assert bound == doc["provider"] and doc["action"]["type"] == "redirect"
                assert [a["provider"] for a in doc["attempts"] if a["outcome"] == "action_required"] == [bound]
            touched = {name for name, s in stripes.items() if entries(s, doc["id"])}
            assert touched <= tried, f"{doc['id']}: entries at {touched}, tried {tried}"

        for server in stripes.values():  # the shoppers' turn, faults off
            server.emulator.faults.clear()
            await server.set_outage(False)
        for doc, choice in answered:
            if doc["status"] != "action_required" or choice == "abandon":
                continue
            action = doc["action"]
            assert await browser.press(action["method"], action["url"], choice) == 200
            _, params = await shop.returned()
            resp = await client.post(f"/v1/payments/{doc['id']}/complete", json={"return_params": params},
                                     headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
            done = await resp.json()
            assert resp.status == 200 and done["status"] in ("approved", "declined"), done
            if choice == "Fail":
                assert done["status"] == "declined"

        expiries = [doc["action_expires_at"] for doc, _ in answered if doc.get("action_expires_at")]
        await asyncio.sleep(max([0.0] + [at - time.time() for at in expiries]))  # abandoned challenges expire
        reconciler = client.app[RECONCILER]
        await reconciler.run_once(min_age_s=0, abandoned_after_s=0, ignore_backoff=True)
        await reconciler.run_once(min_age_s=0, abandoned_after_s=0, ignore_backoff=True)  # one bound by a lookup

        for doc, choice in answered:
            record = await journal(client, doc["id"])
            bound, tried = _providers_before_action(record)
            touched = {name for name, s in stripes.items() if entries(s, doc["id"])}
            assert touched <= tried, f"{doc['id']}: entries at {touched}, tried {tried}"
            charged = _charges(stripes, doc["id"])
            assert len(charged) <= 1, charged
            if bound is not None:
                assert record.status is not PaymentStatus.ACTION_REQUIRED, record
                if choice == "abandon" and doc["status"] == "action_required":
                    assert (record.status, record.error_code) == (PaymentStatus.FAILED, "expired")
            if record.status is PaymentStatus.APPROVED:
                assert charged == [record.provider]
            if record.status in (PaymentStatus.DECLINED, PaymentStatus.FAILED):
                assert charged == [], f"{doc['id']} is {record.status.value} but charged at {charged}"
