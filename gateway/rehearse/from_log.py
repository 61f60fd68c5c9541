"""A traffic profile taken from a real transaction log (`--from-log logs/`): that day's rate
curve, its mix of currency, country, brand and declines, and each provider's latency.

Reading goes through the same DuckDB views `gateway logs analyze` uses (`gateway.analysis.view`),
so a rotated, compressed or crash-cut log reads as it does there. What is read is turned into a
profile by pure functions (`day_segments`, `mix_weights`, `latency_rules`), tested without a log.

Latency: a provider's answers in the log are summarised as p10, p90 and p99 of its calls that
reached it (approved or declined), and replayed by its emulator as two latency rules: every call
waits p10 plus a uniform share of p90 - p10, and 1 % wait p99 - p90 more (the tail). The
emulator's own time on loopback (about a millisecond) comes on top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from emulators.faults import FaultRule
from gateway.rehearse.profile import PaymentKind, RateProfile, Segment, scaled

NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
TARGET_BUCKETS = 20  # a day is cut into about this many constant-rate segments
TAIL_SHARE = 0.01


@dataclass(frozen=True, slots=True)
class LatencyQuantiles:
    p10_ms: float
    p90_ms: float
    p99_ms: float
    calls: int


@dataclass(frozen=True, slots=True)
class Day:
    """What a log says about its day, in the log's own time."""

    bucket_s: int
    counts: tuple[int, ...]  # payments per bucket, from the first payment's bucket on
    mix: dict[PaymentKind, float]
    latency: dict[str, LatencyQuantiles]

    @property
    def payments(self) -> int:
        return sum(self.counts)


def choose_bucket(span_s: float) -> int:
    """The smallest nice bucket that cuts `span_s` into at most TARGET_BUCKETS pieces."""
    for nice in NICE_BUCKETS_S:
        if span_s / nice <= TARGET_BUCKETS:
            return nice
    return NICE_BUCKETS_S[-1]


def day_segments(counts: Sequence[int], bucket_s: int) -> tuple[Segment, ...]:
    """One segment per bucket at that bucket's rate (labels: offset from the day's start)."""
    return tuple(Segment(float(bucket_s), n / bucket_s, f"log +{i * bucket_s}s") for i, n in enumerate(counts))


def mix_weights(rows: Iterable[tuple[str | None, str | None, str | None, str | None]]) -> dict[PaymentKind, float]:
    """(currency, country, brand, status) of each payment -> the share of each kind; a
    `declined` status is a decline card in the rehearsal."""
    counts: dict[PaymentKind, float] = {}
    for currency, country, brand, status in rows:
        kind = PaymentKind(currency or "EUR", country, brand or "visa", status == "declined")
        counts[kind] = counts.get(kind, 0) + 1
    total = sum(counts.values())
    return {k: n / total for k, n in counts.items()} if total else {}


def latency_rules(q: LatencyQuantiles) -> tuple[FaultRule, ...]:
    """The emulator rules that replay one provider's latency (see the module doc)."""
    rules = [FaultRule(kind="latency", latency_ms=q.p10_ms, jitter_ms=max(0.0, q.p90_ms - q.p10_ms),
                       operations=("authorize",))]
    if q.p99_ms > q.p90_ms:
        rules.append(FaultRule(kind="latency", share=TAIL_SHARE, latency_ms=q.p99_ms - q.p90_ms,
                               operations=("authorize",)))
    return tuple(rules)


def peak_fraction(counts: Sequence[int]) -> tuple[float, float]:
    """Where the busiest bucket lies, as fractions of the day."""
    i = max(range(len(counts)), key=lambda j: counts[j])
    return i / len(counts), (i + 1) / len(counts)


def log_profile(day: Day, *, speedup: float, scale: float) -> RateProfile:
    return RateProfile("from-log", scaled(day_segments(day.counts, day.bucket_s), speedup=speedup, scale=scale),
                       peak=peak_fraction(day.counts))


def read_day(paths: Sequence[Path]) -> Day:
    """The day in the logs at `paths` (files or directories, as `gateway logs analyze` takes)."""
    from gateway.analysis.view import open_log

    con, _files = open_log([str(p) for p in paths], materialize="lines")
    try:
        first, last = con.execute(
            "SELECT epoch(min(created_at)), epoch(max(created_at)) FROM log_lines "
            "WHERE event = 'payment'").fetchone() or (None, None)
        if first is None:
            raise ValueError("the log holds no payment lines")
        bucket = choose_bucket(float(last) - float(first) + 1)
        n = math.floor((float(last) - float(first)) / bucket) + 1
        counts = [0] * n
        for (i, c) in con.execute(
                f"SELECT floor((epoch(created_at) - {float(first)}) / {bucket})::INTEGER AS i, count(*) "
                "FROM log_lines WHERE event = 'payment' GROUP BY i").fetchall():
            counts[min(int(i), n - 1)] += int(c)
        mix = mix_weights(con.execute(
            "SELECT currency, country, card_brand, status FROM log_lines WHERE event = 'payment'").fetchall())
        latency = {
            provider: LatencyQuantiles(float(p10), float(p90), float(p99), int(calls))
            for provider, p10, p90, p99, calls in con.execute(
                "SELECT provider, quantile_cont(latency_ms, 0.1), quantile_cont(latency_ms, 0.9), "
                "quantile_cont(latency_ms, 0.99), count(*) FROM attempts "
                "WHERE operation = 'authorize' AND outcome IN ('approved', 'declined') AND latency_ms IS NOT NULL "
                "GROUP BY provider").fetchall()}
    finally:
        con.close()
    return Day(bucket, tuple(counts), mix, latency)


def latency_plans(day: Day) -> dict[str, tuple[FaultRule, ...]]:
    """Provider name -> the latency rules of its emulator, for every provider the log knows."""
    return {name: latency_rules(q) for name, q in day.latency.items()}
