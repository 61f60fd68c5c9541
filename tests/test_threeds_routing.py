"""Routing for shopper actions: a route may prefer providers whose accounts take 3-D Secure
redirects for payments that bring a return URL, and says whether such a URL is required."""

from __future__ import annotations

from gateway.config import RouteConfig
from gateway.router import Router, RoutingFacts


def healthy(_provider: str) -> None:
    return None


def facts(redirect: bool) -> RoutingFacts:
    return RoutingFacts(1000, "EUR", "DE", "visa", "m1", redirect=redirect)


def test_payments_with_a_return_url_try_redirect_capable_providers_first() -> None:
    route = RouteConfig(name="r", providers=("a", "b", "c"), prefer_redirects=True, return_url="required")
    router = Router([route], healthy, without_redirects=("a",))
    assert router.route(facts(True)).candidates == ("b", "c", "a")
    assert router.route(facts(False)).candidates == ("a", "b", "c")  # nothing to prefer without a return URL
    assert router.route(facts(True)).return_url_required is True


def test_without_the_preference_the_order_stays() -> None:
    router = Router([RouteConfig(name="r", providers=("a", "b"), return_url="optional")], healthy,
                    without_redirects=("a",))
    decision = router.route(facts(True))
    assert decision.candidates == ("a", "b") and decision.return_url_required is False
