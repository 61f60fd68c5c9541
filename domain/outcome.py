"""The outcome taxonomy of DESIGN.md: every provider answer maps into exactly one class.

What each class lets the engine do next (retry, fail over, which payment status) is one table,
`gateway.policy.POLICY`; this module only names the vocabulary, so the adapters can speak it
without knowing the engine.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    APPROVED = "approved"
    HARD_DECLINE = "hard_decline"
    SOFT_DECLINE = "soft_decline"
    UNAVAILABLE = "unavailable"
    UNKNOWN = "unknown"
    REJECTED = "rejected"
    # The shopper must act first (a 3-D Secure challenge, a redirect): the provider holds the
    # payment waiting for them, so it is bound to that provider and never retried or failed over.
    ACTION_REQUIRED = "action_required"

    @property
    def is_decline(self) -> bool:
        return self in (Outcome.HARD_DECLINE, Outcome.SOFT_DECLINE)


class LocalRefusal(StrEnum):
    """Why the gateway itself did not send a call: nothing reached the provider, so none of these
    says anything about the provider's health or about an earlier call's possible charge."""

    BREAKER_OPEN = "breaker_open"
    BULKHEAD_FULL = "bulkhead_full"
    BULKHEAD_TIMEOUT = "bulkhead_timeout"
    # The provider account's quota (gateway/quota/) had no token left: sending it would earn a 429.
    OVER_QUOTA = "over_quota"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_BUILDABLE = "request_not_buildable"  # our own input cannot make a request: a bug or bad input

    @property
    def outcome(self) -> Outcome:
        return Outcome.REJECTED if self is LocalRefusal.NOT_BUILDABLE else Outcome.UNAVAILABLE


class PaymentStatus(StrEnum):
    """What the checkout service sees."""

    RECEIVED = "received"
    ATTEMPTING = "attempting"
    APPROVED = "approved"
    DECLINED = "declined"
    PENDING = "pending"
    FAILED = "failed"
    # Waiting for the shopper at the provider (3-D Secure, a redirect): finished by
    # `/complete`, the provider's webhook, or the reconciler's expiry.
    ACTION_REQUIRED = "action_required"
    CAPTURED = "captured"
    VOIDED = "voided"
    REFUNDED = "refunded"
    # A follow-up journalled before its call and not yet settled: the payment is held for it (a
    # second follow-up is refused), and the reconciler settles it if its request dies.
    CAPTURE_PENDING = "capture_pending"
    VOID_PENDING = "void_pending"
    REFUND_PENDING = "refund_pending"
