"""What a provider mapping is: pure translation between our payment and a provider's HTTP API.

Following Hyperswitch's connector split, a mapping builds requests and classifies answers
and never does I/O; `providers.transport` makes every call. That keeps each provider's
rules reviewable as data and lets one place own timeouts, TLS and error translation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from gateway.outcome import Outcome


class Operation(StrEnum):
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"
    STATUS = "status"


@dataclass(frozen=True, slots=True)
class Card:
    """Raw card data: held in memory for the provider call only, never journalled or logged."""

    number: str
    exp_month: int
    exp_year: int
    cvc: str | None = None
    holder_name: str | None = None

    def __repr__(self) -> str:  # a Card printed by accident shows nothing sensitive
        return f"Card(****{self.number[-4:]})"


@dataclass(frozen=True, slots=True)
class PaymentOrder:
    """Everything a mapping needs to build an authorisation."""

    payment_id: str
    amount: int
    currency: str
    capture: bool
    merchant_reference: str
    card: Card | None = None
    token: str | None = None
    country: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A capture, void, refund or status query aimed at the provider that holds the payment."""

    payment_id: str
    provider_reference: str | None
    amount: int | None = None
    currency: str | None = None
    follow_up_id: str | None = None


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


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """One classified answer. `raw_code` keeps the provider's own code for the log."""

    outcome: Outcome
    raw_code: str | None = None
    http_status: int | None = None
    reference: str | None = None
    provider_status: str | None = None
    retry_after_s: float | None = None
    message: str | None = None
    found: bool = True
    extra: Mapping[str, str] = field(default_factory=dict)
    # Set by the engine, not by mappings: re-sending with the same idempotency key cannot
    # charge twice (the provider replays answers), so an unknown may be retried at this provider.
    replay_safe: bool = False


class ProviderMapping(Protocol):
    """The pure half of an adapter. One instance per configured provider."""

    name: str
    # The provider stores the answer for an idempotency key, errors included, and replays it:
    # re-sending an unknown request with the same key can never charge twice.
    replays_answers: bool
    # An empty status-query result proves the provider holds no such payment (no lag).
    status_query_consistent: bool

    def build(self, op: Operation, subject: PaymentOrder | FollowUp, idempotency_key: str | None) -> ProviderRequest:
        """Build the HTTP request for `op`; status queries take no idempotency key."""
        ...

    def parse(self, op: Operation, response: ProviderResponse) -> ProviderResult:
        """Classify any HTTP answer into exactly one outcome."""
        ...
