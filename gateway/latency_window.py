"""A provider's recent p99 latency, so the router can demote a provider that is slowing down
(a brown-out) before its calls start timing out: routes[].demote_above_p99_ms.

The last `size` calls' latencies, in a ring of preallocated floats (one store per call, no
allocation); the p99 is computed from the calls of the last `window_s` when the router asks,
at most once per `REFRESH_S` (sorting a few hundred floats), and cached in between. Too few
recent calls: None, no judgement.
"""

from __future__ import annotations

import math
import time

REFRESH_S = 0.5


class LatencyWindow:
    __slots__ = ("size", "window_s", "min_samples", "_ms", "_at", "_next", "_p99", "_computed_at")

    def __init__(self, size: int, window_s: float, min_samples: int) -> None:
        self.size = size
        self.window_s = window_s
        self.min_samples = min(min_samples, size)
        self._ms = [0.0] * size
        self._at = [-math.inf] * size
        self._next = 0
        self._p99: float | None = None
        self._computed_at = -math.inf

    def record(self, ms: float, now: float | None = None) -> None:
        i = self._next
        self._ms[i] = ms
        self._at[i] = time.monotonic() if now is None else now
        self._next = i + 1 if i + 1 < self.size else 0

    def p99_ms(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if now - self._computed_at >= REFRESH_S:
            self._computed_at = now
            horizon = now - self.window_s
            recent = sorted(ms for ms, at in zip(self._ms, self._at) if at > horizon)
            self._p99 = recent[math.ceil(0.99 * len(recent)) - 1] if len(recent) >= self.min_samples else None
        return self._p99
