"""A token bucket: `rate` tokens a second, continuously refilled, at most `capacity` held.

One token per provider request. Single event loop: no lock. `take` answers 0.0 when a token was
spent, else the seconds until the next one, so a caller can decide whether to wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("rate", "capacity", "_tokens", "_at", "_clock")

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity  # a new bucket starts full, as the provider's account does
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        tokens = self._tokens + (now - self._at) * self.rate
        self._tokens = tokens if tokens < self.capacity else self.capacity
        self._at = now
        return self._tokens

    def has_token(self) -> bool:
        return self._refill() >= 1.0

    def take(self) -> float:
        """0.0: a token was spent. Otherwise the seconds until the next token (nothing spent)."""
        tokens = self._refill()
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        return (1.0 - tokens) / self.rate

    def wait_s(self) -> float:
        """Seconds until a token is there (0.0: now), nothing spent."""
        tokens = self._refill()
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def observe(self, tokens: float) -> None:
        """Another holder of the same account said how many tokens are left (a shared bucket's
        answer): this bucket estimates from there, refilling at `rate`, until the next answer."""
        self._tokens = min(tokens, self.capacity)
        self._at = self._clock()
