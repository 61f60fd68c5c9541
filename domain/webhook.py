"""A provider's asynchronous notification, as one type whatever the provider's wire shape.

Each provider's webhook module (`providers/<name>/webhook.py`) verifies a delivery's signature on
the raw body and parses it into `ProviderEvent`s; the gateway journals them and applies each
through the payment's state machine (`gateway.webhooks`). Nothing here knows a wire format.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


MAX_ID = 200  # longer event ids are not the provider's


class EventKind(StrEnum):
    """What the notification reports on: the payment itself, or one of its follow-ups."""

    AUTHORISATION = "authorisation"
    CAPTURE = "capture"
    REFUND = "refund"
    CANCEL = "cancel"
    OTHER = "other"  # a type we do not act on (kept in the journal, applied as nothing)


class SignatureInvalid(Exception):
    """The delivery is not provably the provider's: no signature, a wrong one, or too old. The
    message says which (it never holds a secret or the expected signature)."""


class MalformedEvent(Exception):
    """The delivery is signed correctly but is not an event shape we can read."""


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One notification item. `event_id` is the provider's own identity for it (the dedupe key
    with the provider's name); `payment_reference` is the reference we sent with the payment
    (our payment id) or with a follow-up (its provider key), whichever the provider echoes;
    `provider_reference` the provider's id of the payment; `success` is None for a state that is
    not final yet (a refund still pending)."""

    event_id: str
    kind: EventKind
    type: str  # the provider's own event type (eventCode, `type`), for the log
    success: bool | None
    payment_reference: str | None
    follow_up_reference: str | None = None
    provider_reference: str | None = None
    amount: int | None = None
    currency: str | None = None
    reason: str | None = None  # a refusal code or reason, when the provider gives one
    # A failure reported after the operation was reported done (Adyen CAPTURE_FAILED,
    # REFUND_FAILED, REFUNDED_REVERSED; Stripe `refund.failed`): it undoes that success.
    reverses: bool = False

    def __post_init__(self) -> None:
        """The fields come from outside: a value of the wrong type (a number where a reference
        belongs, a bool for an amount) is absent, never carried on to the journal as is."""
        for name in ("payment_reference", "follow_up_reference", "provider_reference", "currency", "reason"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                object.__setattr__(self, name, None)
        if self.amount is not None and (not isinstance(self.amount, int) or isinstance(self.amount, bool)):
            object.__setattr__(self, "amount", None)
        if not isinstance(self.event_id, str) or not self.event_id or len(self.event_id) > MAX_ID:
            raise MalformedEvent(f"an event needs an id of at most {MAX_ID} characters")
