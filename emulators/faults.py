"""Fault injection: what an emulator does wrong, to which share of requests, set at run time.

A plan is data (validated by pydantic) so the same rules arrive over the admin endpoint, from
a drill scenario or from a test's Python call.

Two families share the plan: faults of the API answer (`decide`, per request) and faults of the
webhook feed (`decide_webhook`, per notification: `webhook_delay`, `webhook_duplicate`,
`webhook_reorder`, `webhook_drop`, `webhook_forge`). `fail_by_notification` sits between them:
the modification is accepted as usual, and its notification reports that it failed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ApiFaultKind = Literal["latency", "error", "reset_before", "reset_after", "timeout_after", "rate_limit", "decline",
                       "fail_by_notification"]
WebhookFaultKind = Literal["webhook_delay", "webhook_duplicate", "webhook_reorder", "webhook_drop", "webhook_forge"]
FaultKind = ApiFaultKind | WebhookFaultKind
WEBHOOK_FAULT_KINDS: frozenset[str] = frozenset(WebhookFaultKind.__args__)  # type: ignore[attr-defined]


class FaultRule(BaseModel):
    """One misbehaviour. `share` picks the fraction of matching requests it hits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    share: float = Field(1.0, ge=0.0, le=1.0)
    # e.g. ("authorize",); None: every API call. Webhook faults match the operation the
    # notification reports (authorize, capture, refund, void).
    operations: tuple[str, ...] | None = None
    latency_ms: float = Field(0.0, ge=0.0, le=120_000)
    jitter_ms: float = Field(0.0, ge=0.0, le=120_000)
    status: int = Field(503, ge=400, le=599)
    after_processing: bool = False  # error: the payment was processed before the error answer
    # error before processing: the answer carries the provider's own documented "not processed,
    # the same key will be processed afresh" signal where it has one (Adyen's
    # `transient-error: true`); providers without such a signal answer as they always do.
    transient: bool = False
    retry_after_s: float = Field(1.0, ge=0.0, le=3600)
    decline_code: str | None = None
    hang_s: float = Field(30.0, ge=0.0, le=600)  # timeout_after: how long; webhook_reorder: longest hold
    drops: int = Field(1, ge=1, le=100)  # webhook_drop: delivery attempts lost before one is sent
    copies: int = Field(1, ge=1, le=10)  # webhook_duplicate: extra deliveries of the same notification
    # fail_by_notification: "refused" reports the modification failed (Adyen `success: false`,
    # Checkout.com `payment_capture_declined`, Stripe `refund.failed`); "failed_later" (Adyen
    # only) reports it succeeded and then CAPTURE_FAILED / REFUND_FAILED, as a scheme rejection does.
    reported_as: Literal["refused", "failed_later"] = "refused"


class FaultPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[FaultRule, ...] = ()
    seed: int | None = None


@dataclass(slots=True)
class FaultDecision:
    """What happens to one request, decided once when it arrives."""

    delay_s: float = 0.0
    error: FaultRule | None = None
    reset_before: bool = False
    reset_after: bool = False
    timeout_after_s: float | None = None
    rate_limit_s: float | None = None
    decline_code: str | None = None
    fail_modification: FaultRule | None = None


@dataclass(slots=True)
class WebhookDecision:
    """What happens to one notification, decided once when the emulator emits it."""

    delay_s: float = 0.0
    copies: int = 0
    reorder_hold_s: float | None = None
    drops: int = 0
    forge: bool = False


class FaultInjector:
    def __init__(self) -> None:
        self._plan = FaultPlan()
        self._rng = random.Random()

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    def set(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._rng = random.Random(plan.seed)

    def clear(self) -> None:
        self.set(FaultPlan())

    def _hits(self, operation: str, webhook: bool) -> list[FaultRule]:
        """The rules of one family that hit this request or notification (one draw per rule)."""
        hits = []
        for rule in self._plan.rules:
            if (rule.kind in WEBHOOK_FAULT_KINDS) is not webhook:
                continue
            if rule.operations is not None and operation not in rule.operations:
                continue
            if rule.share < 1.0 and self._rng.random() >= rule.share:
                continue
            hits.append(rule)
        return hits

    def decide(self, operation: str) -> FaultDecision:
        decision = FaultDecision()
        for rule in self._hits(operation, webhook=False):
            match rule.kind:
                case "latency":
                    decision.delay_s += (rule.latency_ms + self._rng.uniform(0, rule.jitter_ms)) / 1000
                case "error":
                    decision.error = decision.error or rule
                case "reset_before":
                    decision.reset_before = True
                case "reset_after":
                    decision.reset_after = True
                case "timeout_after":
                    decision.timeout_after_s = rule.hang_s
                case "rate_limit":
                    decision.rate_limit_s = rule.retry_after_s
                case "decline":
                    decision.decline_code = decision.decline_code or rule.decline_code
                case "fail_by_notification":
                    decision.fail_modification = decision.fail_modification or rule
        return decision

    def decide_webhook(self, operation: str) -> WebhookDecision:
        decision = WebhookDecision()
        for rule in self._hits(operation, webhook=True):
            match rule.kind:
                case "webhook_delay":
                    decision.delay_s += (rule.latency_ms + self._rng.uniform(0, rule.jitter_ms)) / 1000
                case "webhook_duplicate":
                    decision.copies += rule.copies
                case "webhook_reorder":
                    decision.reorder_hold_s = rule.hang_s
                case "webhook_drop":
                    decision.drops += rule.drops
                case "webhook_forge":
                    decision.forge = True
        return decision
