"""A rehearsal's traffic as data: a rate curve made of constant-rate segments, and a mix of
payment kinds to draw from. Pure (no I/O, no clock): the load generator asks it when each
payment is due and what it is, and the verdict asks it which rate was offered when.

Why constant-rate segments: a verdict names "the highest rate sustained", which needs windows in
which one rate was offered. A ramp is therefore a staircase, a spike is a segment of its own, and
a profile read from a day's log is one segment per bucket of that day.

Arrivals are deterministic: the k-th payment is due when the integral of the rate reaches k - 1/2,
so a segment of rate r lasting d seconds holds r*d payments (within one), whatever the seed, and
the load is open loop: the schedule never waits for answers.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

MAX_PAYMENTS = 500_000  # every load loop is bounded in count ...
MAX_SECONDS = 3600.0  # ... and in time
MIN_SEGMENT_S = 0.5


@dataclass(frozen=True, slots=True)
class Segment:
    """`duration_s` seconds at `rate` payments a second; `label` names it in the verdict."""

    duration_s: float
    rate: float
    label: str

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError(f"segment {self.label!r}: duration_s must be positive")
        if not 0 <= self.rate <= 100_000:
            raise ValueError(f"segment {self.label!r}: rate must be 0..100000 a second")


@dataclass(frozen=True, slots=True)
class Window:
    """A segment placed on the run's clock: [start_s, end_s) at `rate`."""

    start_s: float
    end_s: float
    rate: float
    label: str


@dataclass(frozen=True, slots=True)
class RateProfile:
    name: str
    segments: tuple[Segment, ...]
    # The part of the run the scenario's faults centre on, as fractions of the duration.
    peak: tuple[float, float]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a profile needs at least one segment")
        if self.duration_s > MAX_SECONDS:
            raise ValueError(f"profile {self.name!r} lasts {self.duration_s:.0f} s, more than {MAX_SECONDS:.0f}")
        if self.expected_payments > MAX_PAYMENTS:
            raise ValueError(f"profile {self.name!r} sends about {self.expected_payments:.0f} payments, "
                             f"more than {MAX_PAYMENTS}")
        if not 0 <= self.peak[0] <= self.peak[1] <= 1:
            raise ValueError("peak must be two fractions 0 <= start <= end <= 1")

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.segments)

    @property
    def expected_payments(self) -> float:
        return sum(s.duration_s * s.rate for s in self.segments)

    @property
    def peak_rate(self) -> float:
        return max(s.rate for s in self.segments)

    def windows(self) -> list[Window]:
        out, t = [], 0.0
        for s in self.segments:
            out.append(Window(t, t + s.duration_s, s.rate, s.label))
            t += s.duration_s
        return out

    def rate_at(self, t: float) -> float:
        """The offered rate at `t` seconds into the run (0 outside it)."""
        for w in self.windows():
            if w.start_s <= t < w.end_s:
                return w.rate
        return 0.0

    def arrivals(self) -> list[float]:
        """When each payment is due, in seconds from the start (see the module doc)."""
        times: list[float] = []
        done = 0.0  # payments due before the current segment (the integral so far)
        t0 = 0.0
        for s in self.segments:
            upto = done + s.rate * s.duration_s
            k = max(0, math.ceil(done - 0.5))  # the first k not yet due: its integral k + 1/2 >= done
            while s.rate > 0 and k + 0.5 < upto:
                times.append(t0 + (k + 0.5 - done) / s.rate)
                k += 1
            done, t0 = upto, t0 + s.duration_s
        return times


def peak_sale(target_rate: float, seconds: float) -> RateProfile:
    """The synthetic sale: a staircase ramp to `target_rate` (40 % of the run in four steps),
    a hold (35 %), the top-of-the-hour spike at 1.5x (10 %: the newsletter lands, compressed
    from minutes to a tenth of the run), and the hold again (15 %)."""
    if not target_rate > 0:
        raise ValueError("target_rate must be positive")
    if seconds < 8 * MIN_SEGMENT_S:
        raise ValueError(f"a peak-sale rehearsal needs at least {8 * MIN_SEGMENT_S:g} seconds")
    ramp = [Segment(seconds * 0.10, target_rate * share, f"ramp {round(share * 100)}%")
            for share in (0.25, 0.5, 0.75)]
    return RateProfile("peak-sale", (
        *ramp,
        Segment(seconds * 0.10, target_rate, "ramp 100%"),
        Segment(seconds * 0.35, target_rate, "hold"),
        Segment(seconds * 0.10, target_rate * 1.5, "spike (top of the hour)"),
        Segment(seconds * 0.15, target_rate, "after the spike"),
    ), peak=(0.75, 0.85))


@dataclass(frozen=True, slots=True)
class PaymentKind:
    """What one payment of the mix is: the fields routing and the providers see, and whether
    its card is one the primary declines."""

    currency: str
    country: str | None
    brand: str
    decline: bool


class Mix:
    """Weighted draws of payment kinds, seeded: the same seed gives the same sequence."""

    def __init__(self, weights: Mapping[PaymentKind, float], seed: int) -> None:
        kinds = [(k, w) for k, w in weights.items() if w > 0]
        if not kinds:
            raise ValueError("a mix needs at least one kind with a positive weight")
        self.kinds: tuple[PaymentKind, ...] = tuple(k for k, _ in kinds)
        self._cumulative = list(accumulate(w for _, w in kinds))
        self._rng = random.Random(seed)

    def draw(self) -> PaymentKind:
        x = self._rng.random() * self._cumulative[-1]
        return self.kinds[min(bisect.bisect_right(self._cumulative, x), len(self.kinds) - 1)]

    def draws(self, n: int) -> list[PaymentKind]:
        return [self.draw() for _ in range(n)]


def sale_mix(seed: int, decline_share: float = 0.05) -> Mix:
    """The synthetic sale's mix: euro cards from a few countries, mostly Visa, some declines."""
    base = {("EUR", "DE", "visa"): 0.4, ("EUR", "FR", "visa"): 0.2, ("EUR", "NL", "mastercard"): 0.2,
            ("EUR", "DE", "mastercard"): 0.2}
    weights: dict[PaymentKind, float] = {}
    for (currency, country, brand), w in base.items():
        weights[PaymentKind(currency, country, brand, False)] = w * (1 - decline_share)
        weights[PaymentKind(currency, country, brand, True)] = w * decline_share
    return Mix(weights, seed)


def scaled(segments: Sequence[Segment], *, speedup: float, scale: float) -> tuple[Segment, ...]:
    """A day's segments compressed in time by `speedup` and multiplied in rate by `scale`
    (the same payments per log second, `scale` times as many, `speedup` times as fast)."""
    if not speedup > 0 or not scale > 0:
        raise ValueError("speedup and scale must be positive")
    return tuple(Segment(s.duration_s / speedup, s.rate * speedup * scale, s.label) for s in segments)
