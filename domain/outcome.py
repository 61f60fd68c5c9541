"""The outcome taxonomy of DESIGN.md: every provider answer maps into exactly one class.

The class decides what the engine may do next, so the rules live here as properties
rather than as conditions scattered through the executor.
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

    @property
    def is_decline(self) -> bool:
        return self in (Outcome.HARD_DECLINE, Outcome.SOFT_DECLINE)

    @property
    def counts_against_breaker(self) -> bool:
        """Declines and our own bad requests say nothing about a provider's health."""
        return self in (Outcome.UNAVAILABLE, Outcome.UNKNOWN)


class PaymentStatus(StrEnum):
    """What the checkout service sees."""

    RECEIVED = "received"
    ATTEMPTING = "attempting"
    APPROVED = "approved"
    DECLINED = "declined"
    PENDING = "pending"
    FAILED = "failed"
    CAPTURED = "captured"
    VOIDED = "voided"
    REFUNDED = "refunded"
