"""Routing: matches, weights, health skips, and success-rate and latency demotion."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from gateway.app_keys import POOL
from gateway.config import RouteConfig, RouteMatch
from gateway.router import NoRoute, Router, RoutingFacts
from gateway.latency_window import LatencyWindow
from gateway.success_window import SuccessWindow
from emulators.faults import FaultRule
from tests.conftest import metrics_text, pay, set_faults

EUR = RoutingFacts(amount=1000, currency="EUR", country="DE", brand="visa", merchant="m1")


def healthy(_provider: str) -> str | None:
    return None


def test_first_matching_route_wins_and_match_fields_apply() -> None:
    routes = [
        RouteConfig(name="big-usd", match=RouteMatch(currencies=("usd",), min_amount=10_000), providers=("a",)),
        RouteConfig(name="amex", match=RouteMatch(brands=("amex",)), providers=("b",)),
        RouteConfig(name="de", match=RouteMatch(countries=("DE",), max_amount=5000), providers=("c", "a")),
    ]
    router = Router(routes, healthy)
    assert router.route(RoutingFacts(20_000, "USD", None, "visa", None)).route == "big-usd"
    assert router.route(RoutingFacts(100, "USD", None, "amex", None)).route == "amex"
    assert router.route(EUR).candidates == ("c", "a")
    with pytest.raises(NoRoute):
        router.route(RoutingFacts(9000, "EUR", "DE", "visa", None))


def test_weights_split_the_first_pick_and_keep_everyone_as_backup() -> None:
    router = Router([RouteConfig(name="split", providers=("a", "b"), weights=(3, 1))], healthy,
                    rng=random.Random(1))
    firsts = Counter(router.route(EUR).candidates[0] for _ in range(4000))
    assert 2800 < firsts["a"] < 3200
    assert all(set(router.route(EUR).candidates) == {"a", "b"} for _ in range(50))


def test_unhealthy_providers_are_skipped_with_their_reason() -> None:
    router = Router([RouteConfig(name="r", providers=("a", "b", "c"))],
                    lambda p: "client_certificate_expired" if p == "a" else None)
    decision = router.route(EUR)
    assert decision.candidates == ("b", "c")
    assert decision.skipped == (("a", "client_certificate_expired"),)


def test_providers_that_cannot_take_the_currency_or_country_are_skipped() -> None:
    caps = {"a": RouteMatch(currencies=("USD",)), "b": RouteMatch(countries=("FR",)), "c": RouteMatch()}
    router = Router([RouteConfig(name="r", providers=("a", "b", "c"))], healthy, capabilities=caps)
    decision = router.route(EUR)
    assert decision.candidates == ("c",)
    assert decision.skipped == (("a", "currency_not_supported"), ("b", "country_not_supported"))
    assert router.route(RoutingFacts(1000, "USD", None, "visa", None)).candidates == ("a", "b", "c")


def test_a_provider_below_the_success_bar_is_tried_last() -> None:
    windows = {p: SuccessWindow(30, min_samples=10) for p in ("a", "b")}
    for i in range(20):
        windows["a"].record(i % 2 == 0, now=100.0)  # 50 %
        windows["b"].record(True, now=100.0)
    router = Router([RouteConfig(name="r", providers=("a", "b"), demote_below=0.8)], healthy,
                    success_rate=lambda p: windows[p].rate(now=101.0))
    decision = router.route(EUR)
    assert decision.candidates == ("b", "a")
    assert decision.demoted == ("a",)


def test_success_window_needs_samples_and_forgets_old_ones() -> None:
    window = SuccessWindow(10, min_samples=3)
    window.record(False, now=0.0)
    window.record(False, now=0.5)
    assert window.rate(now=1.0) is None
    window.record(True, now=1.0)
    assert window.rate(now=1.0) == pytest.approx(1 / 3)
    assert window.rate(now=20.0) is None


async def test_degrading_primary_is_demoted_before_its_breaker_opens(engine_config, start_gateway, stripes) -> None:
    """Half of the primary's calls are turned away before processing (429): each fails over, the
    breaker (fail_max 100) stays closed, but after enough samples the router sends new payments
    to the backup first. (A 503 would not do: it is unknown, and such a payment stays pending.)"""
    config = engine_config(route={"demote_below": 0.8},
                           engine={"health_min_samples": 6, "health_window_s": 60},
                           providers={"primary": {"retry": {"max_attempts": 1}}})
    client = await start_gateway(config)
    set_faults(stripes["primary"], FaultRule(kind="rate_limit", retry_after_s=0, share=0.5), seed=3)
    firsts = []
    for _ in range(30):
        status, doc = await pay(client)
        assert status == 201 and doc["status"] == "approved"
        firsts.append(doc["attempts"][0]["provider"])
    assert firsts[0] == "primary"
    assert firsts[-10:] == ["backup"] * 10
    assert client.app[POOL]["primary"].breaker.state == "closed"


def test_a_provider_above_the_latency_bound_is_tried_last_with_its_reason() -> None:
    p99 = {"a": 400.0, "b": 20.0, "c": None}
    router = Router([RouteConfig(name="r", providers=("a", "b", "c"), demote_above_p99_ms=250)], healthy,
                    latency_p99=lambda p: p99[p])
    decision = router.route(EUR)
    assert decision.candidates == ("b", "c", "a")
    assert decision.demoted == ("a",) and decision.demotion_reasons == ("latency",)
    p99["a"] = 100.0
    assert router.route(EUR).demoted == ()


def test_latency_window_p99_needs_samples_and_forgets_old_calls() -> None:
    window = LatencyWindow(size=100, window_s=10, min_samples=5)
    for i in range(4):
        window.record(10.0, now=float(i))
    assert window.p99_ms(now=4.0) is None  # too few calls to judge
    for ms in (10.0,) * 94 + (500.0, 900.0):
        window.record(ms, now=5.0)
    assert window.p99_ms(now=6.0) == 500.0  # nearest rank over 100 calls: the second slowest
    assert window.p99_ms(now=6.1) == 500.0  # cached between refreshes
    assert window.p99_ms(now=30.0) is None  # every call older than the window


async def test_a_slowing_primary_is_demoted_by_its_p99(engine_config, start_gateway, stripes) -> None:
    """The primary answers every authorisation after 150 ms (under its timeout: nothing fails):
    once enough calls are in its window, new payments go to the backup first."""
    config = engine_config(route={"demote_above_p99_ms": 100},
                           engine={"health_min_samples": 5, "health_window_s": 60})
    client = await start_gateway(config)
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=150, share=1.0))
    firsts = []
    for _ in range(12):
        status, doc = await pay(client)
        assert status == 201 and doc["status"] == "approved"
        firsts.append(doc["attempts"][0]["provider"])
    assert firsts[:5] == ["primary"] * 5
    assert firsts[-3:] == ["backup"] * 3
    text = await metrics_text(client)
    assert re.search(r'gateway_route_demotions_total\{provider="primary",reason="latency"\} [1-9]', text), text
    found = re.search(r'gateway_provider_latency_p99_seconds\{provider="primary"\} (\S+)', text)
    assert found is not None and float(found.group(1)) >= 0.15, text  # every call took at least 150 ms
