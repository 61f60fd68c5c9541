"""The payment domain's own types: what a payment, a follow-up and a classified provider answer
are, independent of any provider's wire format and of the gateway's machinery.

Both the gateway and the provider adapters import these; neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from domain.cards import card_brand
from domain.outcome import LocalRefusal, Outcome
from domain.secret import Secret


class Operation(StrEnum):
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"
    STATUS = "status"
    COMPLETE = "complete"  # read the result of the shopper's action (3-D Secure) at the provider


class ThreeDS(StrEnum):
    """The caller's 3-D Secure preference, as Stripe names its `request_three_d_secure` values."""

    AUTOMATIC = "automatic"  # the provider (and the card's issuer) decide
    ANY = "any"  # ask for authentication, frictionless or challenged
    CHALLENGE = "challenge"  # ask for a challenge


@dataclass(frozen=True, slots=True)
class ShopperAction:
    """What the shopper must do before the provider can finish the payment, normalised: open
    `url` with `method` (posting `data` as a form where given). `type` is `redirect`, or `sdk`
    where only the provider's client SDK can run it (Stripe's `use_stripe_sdk`).
    `provider_action` is the provider's own action object, for client SDKs that take it whole."""

    type: str
    url: str
    method: str = "GET"
    data: Mapping[str, str] = field(default_factory=dict)
    provider_action: Mapping[str, object] = field(default_factory=dict)

    def to_doc(self) -> dict[str, object]:
        return {"type": self.type, "url": self.url, "method": self.method, "data": dict(self.data),
                "provider_action": dict(self.provider_action)}


@dataclass(frozen=True, slots=True)
class Card:
    """Raw card data: held in memory for the provider call only, never journalled or logged.
    The number and security code are `Secret`s: a mapping `reveal()`s them into its request."""

    number: Secret
    exp_month: int
    exp_year: int
    cvc: Secret | None = None
    holder_name: str | None = None

    def __repr__(self) -> str:  # a Card printed by accident shows nothing sensitive
        return f"Card({self.brand}, ****{self.number.reveal()[-4:]})"

    @property
    def brand(self) -> str:
        return card_brand(self.number.reveal())


@dataclass(frozen=True, slots=True)
class PaymentOrder:
    """Everything a mapping needs to build an authorisation."""

    payment_id: str
    amount: int
    currency: str
    capture: bool
    merchant_reference: str
    card: Card | None = None
    token: Secret | None = None  # a provider's stored payment method or one-time token
    country: str | None = None
    description: str | None = None
    # Where the provider sends the shopper back after an action (3-D Secure); None: no redirect
    # can come back to the merchant, so the gateway asks no provider for one.
    return_url: str | None = None
    three_ds: ThreeDS = ThreeDS.AUTOMATIC


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A capture, void, refund or status query aimed at the provider that holds the payment."""

    payment_id: str
    provider_reference: str | None
    amount: int | None = None
    currency: str | None = None
    follow_up_id: str | None = None
    # COMPLETE: the parameters the shopper's browser brought back to the return URL.
    return_params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """One classified answer to an authorisation or a follow-up (capture, void, refund).
    `raw_code` keeps the provider's own code for the log. A status query's answer is a
    `StatusAnswer`, which says found / not found / unknown as a type rather than a flag here."""

    outcome: Outcome
    raw_code: str | None = None
    http_status: int | None = None
    reference: str | None = None
    provider_status: str | None = None
    retry_after_s: float | None = None
    message: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    # The provider's own verdict on re-sending this request with the same idempotency key:
    # True "a retry can succeed" (Stripe-Should-Retry: true, Adyen's transient-error: true),
    # False "a retry cannot change this answer" (Stripe-Should-Retry: false), None: no verdict.
    # It never says whether the request was processed: the outcome says that.
    retry_hint: bool | None = None
    # The provider accepted the request and reports its outcome later (Adyen's `received`,
    # Checkout.com's 202, a Stripe refund `pending`): a follow-up stays `<op>_pending` until its
    # webhook (or a lookup, where the provider has one) says what became of it.
    settles_later: bool = False
    # Set by the engine, not by mappings: the gateway did not send the call (and why).
    refusal: LocalRefusal | None = None
    # Set by the engine: re-sending with the same idempotency key cannot charge twice (the
    # provider replays answers), so an unknown may be retried at this provider.
    replay_safe: bool = False
    # Set by the engine: a status query proved the provider holds no such payment, so nothing
    # was charged and a retry or failover is safe.
    proven_absent: bool = False
    # Set by the engine: a status query found more than one charge for this one payment.
    duplicate_suspected: bool = False
    # ACTION_REQUIRED: what the shopper must do (the provider's action, normalised).
    action: ShopperAction | None = None

    @classmethod
    def refused(cls, refusal: LocalRefusal, message: str | None = None,
                retry_after_s: float | None = None) -> ProviderResult:
        """`retry_after_s`: when the call could be made (a quota's next token, a 429's wait)."""
        return cls(refusal.outcome, raw_code=refusal.value, refusal=refusal, message=message,
                   retry_after_s=retry_after_s)


class Lookup(StrEnum):
    """What a status query learnt about one payment at its provider."""

    FOUND = "found"  # the provider holds it: `StatusAnswer.result` says in which state
    NOT_FOUND = "not_found"  # the provider answered that it holds no such payment (proof only where its lookup has no lag)
    UNKNOWN = "unknown"  # the query itself failed (transport, 5xx, auth): it proves nothing either way


@dataclass(frozen=True, slots=True)
class FollowUpState:
    """One capture, refund or void the provider lists for a payment."""

    operation: Operation
    reference: str | None  # our follow-up's reference (the provider key we sent), where the provider echoes it
    amount: int | None
    outcome: Outcome  # APPROVED: done · HARD_DECLINE: refused or failed · UNKNOWN: the provider is still on it


@dataclass(frozen=True, slots=True)
class StatusAnswer:
    """A status query's answer as a type of its own (not an outcome with a flag): found, not
    found, or unknown, with the payment's state, how many charges the provider holds for it,
    and, where the provider lists them, the payment's captures, refunds and voids."""

    lookup: Lookup
    result: ProviderResult  # FOUND: the payment's state as an outcome; otherwise the raw answer (status, code)
    charges: int = 0  # charged payments found for this one payment: more than one is a suspected duplicate
    follow_ups: tuple[FollowUpState, ...] = ()
    # Whether `follow_ups` is the provider's complete, current list for the payment (read from the
    # payment by its id, never from a lagging search), so an absence can be trusted once no call
    # of ours can still be in flight.
    follow_ups_listed: bool = False
