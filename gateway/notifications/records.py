"""What the notification outbox stores: one row per event, committed with the state change it
reports, kept after delivery (for `gateway webhooks list|replay`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DeliveryState(StrEnum):
    PENDING = "pending"  # to be delivered (again) at `next_attempt_at`
    DELIVERED = "delivered"
    GIVEN_UP = "given_up"  # failed for longer than `notifications.give_up_after_s`


class DeliveryOutcome(StrEnum):
    """One attempt, as the metric `gateway_notification_deliveries_total{outcome}` counts it."""

    DELIVERED = "delivered"  # 2xx
    FAILED = "failed"  # anything else; retried with backoff
    GIVEN_UP = "given_up"  # failed, and the next try would fall past the retry window

    @property
    def state(self) -> DeliveryState:
        """The row's state after an attempt with this outcome."""
        return _STATE_AFTER[self]


_STATE_AFTER = {DeliveryOutcome.DELIVERED: DeliveryState.DELIVERED, DeliveryOutcome.FAILED: DeliveryState.PENDING,
                DeliveryOutcome.GIVEN_UP: DeliveryState.GIVEN_UP}


@dataclass(frozen=True, slots=True)
class Notification:
    """One event. `body` is the exact JSON the checkout receives (and the signature covers);
    `retry_from` starts its retry window (its creation, or the last `replay`)."""

    event_id: str
    event_type: str
    payment_id: str
    created_at: float
    body: bytes
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    retry_from: float | None = None
    next_attempt_at: float | None = None
    delivered_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None

    @property
    def window_start(self) -> float:
        return self.created_at if self.retry_from is None else self.retry_from


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """What one delivery attempt leaves on its row."""

    outcome: DeliveryOutcome
    retry_in_s: float = 0.0  # FAILED: when to try again
    http_status: int | None = None
    error: str | None = None
