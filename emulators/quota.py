"""Provider quotas: the request rate an account may send before the provider answers 429.

A real provider limits each account, and at a peak sale that limit breaks before anything else
does: Stripe allows 100 operations per second in live mode and 25 in test mode (docs.stripe.com
/rate-limits), Checkout.com about 100 write requests per second per account (its "API rate
limits" page), Adyen rate-limits too and says so in its 429 answer. An emulator with a quota
lets a drill, a test or a rehearsal meet that limit on loopback.

The limit is a token bucket: `rate_limit_per_s` tokens a second, continuously refilled, at most
`burst` held (default: one second's worth), one token per API request. A request that finds
the bucket empty gets the provider's own rate-limit answer (each emulator's
`quota_exceeded_response`) and is not processed: nothing is charged and its idempotency key is
not claimed, so the same request later is processed afresh, as the providers document.
The plan is data, set at launch (`gateway emulator stripe --rate-limit-per-s 25`) or at run
time on the admin API (`PUT /_emulator/quota`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class QuotaPlan(BaseModel):
    """`rate_limit_per_s` None: no limit (the default, as before quotas existed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_limit_per_s: float | None = Field(None, gt=0, le=1_000_000)
    burst: int | None = Field(None, ge=1, le=1_000_000)

    @field_validator("burst")
    @classmethod
    def _burst_needs_a_rate(cls, burst: int | None, info: ValidationInfo) -> int | None:
        if burst is not None and info.data.get("rate_limit_per_s") is None:
            raise ValueError("burst needs rate_limit_per_s (a bucket with no refill rate)")
        return burst

    @property
    def capacity(self) -> float:
        """The most requests answered back to back after a quiet spell."""
        if self.burst is not None:
            return float(self.burst)
        return float(max(1, math.ceil(self.rate_limit_per_s or 1)))


class Quota:
    """One account's token bucket. Single event loop: no lock needed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._plan = QuotaPlan()
        self._tokens = 0.0
        self._at = clock()
        self.limited = 0  # requests answered 429 by the quota since the last set/refill

    @property
    def plan(self) -> QuotaPlan:
        return self._plan

    def set(self, plan: QuotaPlan) -> None:
        """A new plan starts with a full bucket."""
        self._plan = plan
        self.refill()

    def clear(self) -> None:
        self.set(QuotaPlan())

    def refill(self) -> None:
        self._tokens = self._plan.capacity
        self._at = self._clock()
        self.limited = 0

    def take(self) -> float | None:
        """None: the request may proceed (a token was spent). Otherwise the seconds until the
        next token, for the answer's retry hint."""
        rate = self._plan.rate_limit_per_s
        if rate is None:
            return None
        now = self._clock()
        self._tokens = min(self._plan.capacity, self._tokens + (now - self._at) * rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        self.limited += 1
        return (1.0 - self._tokens) / rate

    def snapshot(self) -> dict[str, Any]:
        return {"plan": self._plan.model_dump(), "limited": self.limited}
