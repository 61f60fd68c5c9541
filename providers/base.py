"""What a provider mapping is: pure translation between our payment and a provider's HTTP API.

Following Hyperswitch's connector split, a mapping builds requests and classifies answers
and never does I/O; `providers.transport` makes every call. That keeps each provider's
rules reviewable as data and lets one place own timeouts, TLS and error translation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from domain.types import FollowUp, Operation, PaymentOrder, ProviderResult, StatusAnswer


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


class ProviderMapping(Protocol):
    """The pure half of an adapter. One instance per configured provider."""

    name: str
    # The provider stores the answer for an idempotency key, errors included, and replays it:
    # re-sending an unknown request with the same key can never charge twice.
    replays_answers: bool
    # An empty status-query result proves the provider holds no such payment (no lag).
    status_query_consistent: bool
    # The provider has a payment lookup the engine may ask (Stripe, Checkout.com). Without one
    # (Adyen) an unknown or pending outcome is settled only by the provider's webhook.
    has_status_lookup: bool
    # It may answer an authorisation with a shopper action (3-D Secure, a redirect), which only
    # a return URL brings back: `gateway preflight` wants a return-URL policy on its routes.
    redirects: bool

    def build(self, op: Operation, subject: PaymentOrder | FollowUp, idempotency_key: str | None) -> ProviderRequest:
        """Build the HTTP request for `op`; status queries take no idempotency key. ValueError
        for an operation the provider does not have (STATUS where `has_status_lookup` is False).

        A STATUS `FollowUp` asks by the provider's id when `provider_reference` is set, else by
        our payment id. Capture, refund and void send `follow_up_id` (the follow-up's provider
        idempotency key) in a field the provider echoes in its lookup, so `parse_status` can
        name each follow-up by it. A STATUS `FollowUp` that carries a `follow_up_id` asks for
        the payment's follow-ups too, where the provider lists them apart from the payment
        (Checkout.com: `GET /payments/{id}/actions`, which needs the provider's id).

        COMPLETE reads the result of the shopper's action at the provider, from what the
        browser brought back (`FollowUp.return_params`); ValueError when a parameter the
        provider needs is missing.
        """
        ...

    def parse(self, op: Operation, response: ProviderResponse) -> ProviderResult:
        """Classify any HTTP answer to an authorisation, capture, void or refund into exactly one
        outcome. Raises ValueError for `Operation.STATUS`: a status answer is `parse_status`'s."""
        ...

    def parse_status(self, response: ProviderResponse) -> StatusAnswer:
        """A status query's answer: FOUND (with the payment's state, its charge count and, where
        listed, its follow-ups), NOT_FOUND only where the answer proves absence (an explicit
        empty result; never a bare 404), or UNKNOWN (an error answer: 5xx, auth, 404).

        Where a FOUND answer has `follow_ups_listed` False, asking again by the provider's id
        (`result.reference`) with a `follow_up_id` lists them.
        """
        ...


@runtime_checkable
class Probing(Protocol):
    """A mapping whose provider has no status lookup (Adyen) names another harmless request,
    one the real provider answers for a valid key and that changes nothing there (no payment,
    no idempotency key), for `gateway preflight` to reach it with."""

    def probe(self) -> ProviderRequest:
        ...


def reachability_probe(mapping: ProviderMapping, reference: str) -> ProviderRequest:
    """The one request `gateway preflight` sends a provider: where it has a status lookup, a
    status query for `reference` (which no payment has); else the mapping's `probe`. Never a
    request the real provider does not have, so preflight tests what production will call.
    ValueError for a mapping with neither (a bug in that mapping)."""
    if mapping.has_status_lookup:
        return mapping.build(Operation.STATUS, FollowUp(payment_id=reference, provider_reference=None), None)
    if isinstance(mapping, Probing):
        return mapping.probe()
    raise ValueError(f"{mapping.name}: no status lookup and no probe request to reach the provider with")
