"""Provider-side idempotency, with the policies real providers differ on.

Stripe stores the first answer for a key, a 500 included; Checkout.com stores only 2xx answers,
so a retry after its 5xx runs again; Adyen rejects a duplicate that arrives while the first is
still processing. The gateway has to be safe under each, so the emulators reproduce each.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    status: int
    body: bytes
    content_type: str


class Claim(StrEnum):
    NEW = "new"
    REPLAY = "replay"
    IN_FLIGHT = "in_flight"
    MISMATCH = "mismatch"


StorePolicy = Literal["all", "success"]


class ProviderIdempotency:
    def __init__(self, policy: StorePolicy) -> None:
        self.policy = policy
        self._fingerprints: dict[str, str] = {}
        self._answers: dict[str, StoredAnswer] = {}
        self._in_flight: set[str] = set()

    def claim(self, key: str, fingerprint: str) -> tuple[Claim, StoredAnswer | None]:
        known = self._fingerprints.get(key)
        if known is not None and known != fingerprint:
            return Claim.MISMATCH, None
        if key in self._in_flight:
            return Claim.IN_FLIGHT, None
        if key in self._answers:
            return Claim.REPLAY, self._answers[key]
        self._fingerprints[key] = fingerprint
        self._in_flight.add(key)
        return Claim.NEW, None

    def finish(self, key: str, answer: StoredAnswer) -> None:
        self._in_flight.discard(key)
        if self.policy == "all" or 200 <= answer.status < 300:
            self._answers[key] = answer
        else:
            # Not stored: the next request with this key is processed afresh.
            self._fingerprints.pop(key, None)

    def abandon(self, key: str) -> None:
        """The request died before producing an answer (nothing processed)."""
        self._in_flight.discard(key)
        if key not in self._answers:
            self._fingerprints.pop(key, None)

    def clear(self) -> None:
        self._fingerprints.clear()
        self._answers.clear()
        self._in_flight.clear()
