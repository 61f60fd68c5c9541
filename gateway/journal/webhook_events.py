"""What the journal keeps of a provider's webhook delivery: one row per notification item,
identified by (provider, event id), so a delivery repeated (at least once, in any order) is
journalled once.

Only the parsed event is stored (`domain.webhook.ProviderEvent`: ids, kind, success, amount,
the provider's reason), never the raw body, which can carry card details (Adyen's
`additionalData.cardSummary`, a Checkout.com `source`) and whose signature is of no use after
verification. The reason and the payment reference the provider echoes (ours are letters only,
so the card-number rule never touches one; anything else is an orphan's, which may be anything)
pass the log's redaction like every journal document (`gateway.journal.records`); the
provider's own identifiers and the amounts stay verbatim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from domain.webhook import EventKind, ProviderEvent
from gateway.redaction import Redactor

_REDACTOR = Redactor()
_FREE_TEXT = ("reason", "payment_reference")  # what the redaction sees before a row is written


class WebhookState(StrEnum):
    PENDING = "pending"  # journalled, not applied yet: the processor leases these
    APPLIED = "applied"  # it changed the payment (or a follow-up) it reports on
    UNCHANGED = "unchanged"  # its payment was already in that state or past it (a replay, a late event)
    ORPHAN = "orphan"  # no payment of ours matches it: kept and shown, never dropped


@dataclass(slots=True)
class WebhookEventRecord:
    provider: str  # the configured provider name the delivery came in for (its URL)
    event: ProviderEvent
    received_at: float
    state: WebhookState = WebhookState.PENDING
    payment_id: str | None = None  # ours, once the processor matched it
    outcome: str | None = None  # what applying it did, for ops (`approved`, `already captured`, ...)
    processed_at: float | None = None

    @property
    def event_id(self) -> str:
        return self.event.event_id

    def to_doc(self) -> bytes:
        event = dataclasses.asdict(self.event)
        for name in _FREE_TEXT:
            if event[name] is not None:
                event[name] = _REDACTOR.scrub(event[name])
        return orjson.dumps({"event": event, "outcome": self.outcome})

    @classmethod
    def from_row(cls, provider: str, state: str, received_at: float, payment_id: str | None,
                 processed_at: float | None, doc: bytes) -> WebhookEventRecord:
        data: dict[str, Any] = orjson.loads(doc)
        event = dict(data["event"])
        event["kind"] = EventKind(event["kind"])
        return cls(provider, ProviderEvent(**event), received_at, WebhookState(state), payment_id,
                   data.get("outcome"), processed_at)
