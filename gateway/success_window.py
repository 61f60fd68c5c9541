"""A provider's recent success rate, so the router can demote a degrading primary before its
breaker trips. Counts only whether the provider answered (declines are answers); kept in
one-second buckets over a sliding window, O(1) per record."""

from __future__ import annotations

import time
from collections import deque


class SuccessWindow:
    def __init__(self, window_s: float, min_samples: int) -> None:
        self.window_s = window_s
        self.min_samples = min_samples
        self._buckets: deque[list[int]] = deque()  # [second, ok, total]
        self._ok = 0
        self._total = 0

    def _expire(self, now: float) -> None:
        horizon = int(now - self.window_s)
        while self._buckets and self._buckets[0][0] <= horizon:
            _, ok, total = self._buckets.popleft()
            self._ok -= ok
            self._total -= total

    def record(self, ok: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._expire(now)
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += ok
        bucket[2] += 1
        self._ok += ok
        self._total += 1

    def rate(self, now: float | None = None) -> float | None:
        """The success share, or None while there are too few samples to judge."""
        self._expire(time.monotonic() if now is None else now)
        if self._total < self.min_samples:
            return None
        return self._ok / self._total
