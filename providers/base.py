"""What a provider mapping is: pure translation between our payment and a provider's HTTP API.

Following Hyperswitch's connector split, a mapping builds requests and classifies answers
and never does I/O; `providers.transport` makes every call. That keeps each provider's
rules reviewable as data and lets one place own timeouts, TLS and error translation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from domain.types import FollowUp, Operation, PaymentOrder, ProviderResult


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

    def build(self, op: Operation, subject: PaymentOrder | FollowUp, idempotency_key: str | None) -> ProviderRequest:
        """Build the HTTP request for `op`; status queries take no idempotency key."""
        ...

    def parse(self, op: Operation, response: ProviderResponse) -> ProviderResult:
        """Classify any HTTP answer into exactly one outcome."""
        ...
