"""The retry budget, and the wait strategy between tries (a tenacity wait).

The budget is Envoy's: retries may add at most `ratio` of recent requests (plus a floor per
second), so a provider outage turns into fast failover rather than a retry storm.
"""

from __future__ import annotations

import time
from collections import deque

from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_random_exponential

from domain.types import ProviderResult


class RetryBudget:
    """Sliding-window counts of requests and retries, in one-second buckets."""

    def __init__(self, *, ratio: float, min_per_s: float, window_s: float) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._requests: deque[tuple[int, int]] = deque()
        self._retries: deque[tuple[int, int]] = deque()

    def _add(self, buckets: deque[tuple[int, int]], now: float) -> None:
        second = int(now)
        if buckets and buckets[-1][0] == second:
            buckets[-1] = (second, buckets[-1][1] + 1)
        else:
            buckets.append((second, 1))

    def _count(self, buckets: deque[tuple[int, int]], now: float) -> int:
        horizon = now - self.window_s
        while buckets and buckets[0][0] < horizon:
            buckets.popleft()
        return sum(n for _, n in buckets)

    def record_request(self, now: float | None = None) -> None:
        self._add(self._requests, time.monotonic() if now is None else now)

    def try_acquire(self, now: float | None = None) -> bool:
        """Take one retry from the budget if there is one left."""
        now = time.monotonic() if now is None else now
        allowed = max(self.min_per_s * self.window_s, self.ratio * self._count(self._requests, now))
        if self._count(self._retries, now) >= allowed:
            return False
        self._add(self._retries, now)
        return True

    def remaining(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        allowed = max(self.min_per_s * self.window_s, self.ratio * self._count(self._requests, now))
        return max(0.0, allowed - self._count(self._retries, now))


class wait_retry_after(wait_base):
    """The provider's `Retry-After` when it gave one, otherwise exponential full jitter."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self._fallback = wait_random_exponential(multiplier=base_s, max=max_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            result = outcome.result()
            if isinstance(result, ProviderResult) and result.retry_after_s is not None:
                return result.retry_after_s
        return self._fallback(retry_state)
