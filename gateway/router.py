"""The router: an ordered list of candidate providers for one payment.

Routes are compiled once at start. The first route whose match fits the payment gives the
candidates, shuffled by weight when the route splits volume; providers that cannot take a call
right now (breaker open, client certificate expired, bulkhead full, quota without a token) are
skipped before any call. Providers whose recent success rate is below the route's bar, or whose
recent p99 latency is above its bound, are tried after the others (demoted).

When every candidate was skipped and at least one only for its quota, the decision says how soon
the first of those has a token (`quota_wait_s`): the payment service may wait that long, or
answer 503 with Retry-After; nothing was sent, so nothing is lost by either.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from domain.outcome import LocalRefusal
from gateway.config import RouteConfig

HealthCheck = Callable[[str], str | None]  # provider -> reason it cannot serve now, or None
SuccessRate = Callable[[str], float | None]  # provider -> recent success share, None if unknown
LatencyP99 = Callable[[str], float | None]  # provider -> recent p99 in ms, None if unknown
QuotaWait = Callable[[str], float | None]  # provider -> seconds until its quota has a token
OVER_QUOTA: str = LocalRefusal.OVER_QUOTA  # the skip reason of a provider whose quota has no token
SUCCESS_RATE = "success_rate"  # demotion reasons
LATENCY = "latency"


class Capability(Protocol):
    """What a provider may take; ProviderConfig fits."""

    currencies: tuple[str, ...] | None
    countries: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class RoutingFacts:
    amount: int
    currency: str
    country: str | None
    brand: str | None
    merchant: str | None
    # The payment can follow a shopper action: it brings a return URL.
    redirect: bool = False


@dataclass(frozen=True, slots=True)
class RouteDecision:
    route: str
    candidates: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    cascade_on: frozenset[str]
    demoted: tuple[str, ...] = ()
    demotion_reasons: tuple[str, ...] = ()  # one per demoted provider: SUCCESS_RATE or LATENCY
    # No candidate is usable, some only for their quota: seconds until the first has a token.
    quota_wait_s: float | None = None
    # The route's return-URL policy says a payment without one must be refused (its providers
    # may ask for the shopper, and only a return URL brings the shopper back).
    return_url_required: bool = False


class NoRoute(Exception):
    """No configured route matches the payment."""


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    name: str
    currencies: frozenset[str] | None
    countries: frozenset[str] | None
    brands: frozenset[str] | None
    merchants: frozenset[str] | None
    min_amount: int | None
    max_amount: int | None
    providers: tuple[str, ...]
    weights: tuple[float, ...] | None
    cascade_on: frozenset[str]
    demote_below: float | None
    demote_above_p99_ms: float | None
    return_url_required: bool = False
    prefer_redirects: bool = False

    def matches(self, f: RoutingFacts) -> bool:
        return (
            (self.currencies is None or f.currency in self.currencies)
            and (self.countries is None or f.country in self.countries)
            and (self.brands is None or f.brand in self.brands)
            and (self.merchants is None or f.merchant in self.merchants)
            and (self.min_amount is None or f.amount >= self.min_amount)
            and (self.max_amount is None or f.amount <= self.max_amount)
        )


def _set(values: Sequence[str] | None, upper: bool = False) -> frozenset[str] | None:
    if values is None:
        return None
    return frozenset(v.upper() if upper else v for v in values)


class Router:
    def __init__(self, routes: Sequence[RouteConfig], health: HealthCheck, rng: random.Random | None = None,
                 success_rate: SuccessRate | None = None,
                 capabilities: Mapping[str, Capability] | None = None,
                 without_redirects: Collection[str] = (), latency_p99: LatencyP99 | None = None,
                 quota_wait: QuotaWait | None = None) -> None:
        """`without_redirects`: providers whose accounts take no shopper actions (3-D Secure)."""
        self._health = health
        self._success_rate = success_rate
        self._latency_p99 = latency_p99
        self._quota_wait = quota_wait
        self._capabilities = {
            name: (_set(cap.currencies, upper=True), _set(cap.countries, upper=True))
            for name, cap in (capabilities or {}).items()
        }
        self._no_redirects = frozenset(without_redirects)
        self._rng = rng or random.Random()
        self._routes = tuple(
            _CompiledRoute(
                name=r.name,
                currencies=_set(r.match.currencies, upper=True),
                countries=_set(r.match.countries, upper=True),
                brands=_set(r.match.brands),
                merchants=_set(r.match.merchants),
                min_amount=r.match.min_amount,
                max_amount=r.match.max_amount,
                providers=r.providers,
                weights=r.weights,
                cascade_on=frozenset(r.cascade_on),
                demote_below=r.demote_below,
                demote_above_p99_ms=r.demote_above_p99_ms,
                return_url_required=r.return_url == "required",
                prefer_redirects=r.prefer_redirects,
            )
            for r in routes
        )

    def route(self, facts: RoutingFacts) -> RouteDecision:
        for route in self._routes:
            if route.matches(facts):
                ordered, demoted, why = self._demote(route, self._prefer_redirects(route, facts, self._order(route)))
                usable, skipped = [], []
                for provider in ordered:
                    reason = self._cannot_take(provider, facts) or self._health(provider)
                    if reason is None:
                        usable.append(provider)
                    else:
                        skipped.append((provider, reason))
                return RouteDecision(route.name, tuple(usable), tuple(skipped), route.cascade_on, demoted, why,
                                     None if usable else self._soonest_token(skipped), route.return_url_required)
        raise NoRoute(f"no route for {facts.currency} {facts.country or '-'} {facts.brand or '-'}")

    def _cannot_take(self, provider: str, facts: RoutingFacts) -> str | None:
        """The provider's contract, from its `currencies` / `countries` configuration."""
        currencies, countries = self._capabilities.get(provider, (None, None))
        if currencies is not None and facts.currency not in currencies:
            return "currency_not_supported"
        if countries is not None and facts.country is not None and facts.country not in countries:
            return "country_not_supported"
        return None

    def _prefer_redirects(self, route: _CompiledRoute, facts: RoutingFacts, ordered: list[str]) -> list[str]:
        """A payment that can follow a shopper action tries the providers whose accounts take
        them first (in order), where the route asks for that: a 3-D Secure card then reaches
        a provider that can challenge it rather than one that declines it."""
        if not (route.prefer_redirects and facts.redirect and self._no_redirects):
            return ordered
        return [p for p in ordered if p not in self._no_redirects] + [p for p in ordered if p in self._no_redirects]

    def _soonest_token(self, skipped: list[tuple[str, str]]) -> float | None:
        if self._quota_wait is None:
            return None
        waits = [w for p, reason in skipped if reason == OVER_QUOTA and (w := self._quota_wait(p)) is not None]
        return min(waits) if waits else None

    def _demotion(self, route: _CompiledRoute, provider: str) -> str | None:
        if route.demote_below is not None and self._success_rate is not None:
            rate = self._success_rate(provider)
            if rate is not None and rate < route.demote_below:
                return SUCCESS_RATE
        if route.demote_above_p99_ms is not None and self._latency_p99 is not None:
            p99 = self._latency_p99(provider)
            if p99 is not None and p99 > route.demote_above_p99_ms:
                return LATENCY
        return None

    def _demote(self, route: _CompiledRoute,
                ordered: list[str]) -> tuple[list[str], tuple[str, ...], tuple[str, ...]]:
        """Providers whose recent success rate fell below the route's bar, or whose recent p99
        rose above its bound, go last, in order; with the reason of each."""
        if route.demote_below is None and route.demote_above_p99_ms is None:
            return ordered, (), ()
        demoted, why = [], []
        for provider in ordered:
            reason = self._demotion(route, provider)
            if reason is not None:
                demoted.append(provider)
                why.append(reason)
        if not demoted:
            return ordered, (), ()
        return [p for p in ordered if p not in demoted] + demoted, tuple(demoted), tuple(why)

    def _order(self, route: _CompiledRoute) -> list[str]:
        """Weighted order without replacement: the first pick follows the volume split."""
        if route.weights is None:
            return list(route.providers)
        pool = list(zip(route.providers, route.weights, strict=True))
        ordered: list[str] = []
        while pool:
            total = sum(w for _, w in pool)
            if total <= 0:
                ordered.extend(p for p, _ in pool)
                break
            pick = self._rng.uniform(0, total)
            for i, (provider, weight) in enumerate(pool):
                pick -= weight
                if pick <= 0 or i == len(pool) - 1:
                    ordered.append(provider)
                    pool.pop(i)
                    break
        return ordered
