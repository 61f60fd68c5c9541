"""What the console shows about recent traffic: a small in-memory sliding window per provider.

The payment service calls `ConsoleStats.observe` once per logged transaction (the same place
that writes the transaction log line), so the window sees every payment exactly once. Per
provider and per second it keeps counters and a latency histogram; a snapshot (about once a
second, only while someone watches) folds the seconds of the window together into a `Traffic`
per provider. A `Traffic` is sums only, so the workers of one host add theirs into the host's
(`gateway.console.host`) with nothing lost: the host's percentiles come from the summed bins.

Bounded by construction: one bucket per provider per second of the window, each histogram at
most `_BINS` entries, the last failures in a fixed-size deque. `observe` is O(attempts) and
does no I/O, so the hot path pays a few dictionary updates per payment.

Latency percentiles come from a log-scale histogram (5 % wide bins from 0.1 ms to about a
minute), so p50/p99 are exact to within a few percent whatever the traffic.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.journal.records import Attempt, PaymentRecord
from gateway.txlog.trace_ids import current_trace_id

GATEWAY = "*"  # the key of the gateway-wide tally (payments as the checkout service saw them)
FAILURE_OUTCOMES = frozenset({"unavailable", "unknown", "rejected"})  # listed as failures, unless NOT_SENT
DECLINES = frozenset({"hard_decline", "soft_decline"})
# Refused inside the gateway, nothing sent: not a call, so no latency and no failure of the provider.
NOT_SENT = frozenset({"breaker_open", "bulkhead_full", "bulkhead_timeout", "deadline_exceeded", "over_quota",
                      "not_attempted"})

_MIN_MS = 0.1
_STEP = 1.05
_LOG_STEP = math.log(_STEP)
_BINS = 300  # 0.1 ms * 1.05**300 is about 4 minutes: far past any deadline


def latency_bin(ms: float) -> int:
    if ms <= _MIN_MS:
        return 0
    return min(_BINS, int(math.log(ms / _MIN_MS) / _LOG_STEP) + 1)


def bin_value(index: int) -> float:
    """The geometric middle of a bin, in milliseconds."""
    if index <= 0:
        return _MIN_MS
    return _MIN_MS * _STEP ** (index - 0.5)


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return bin_value(index)
    return bin_value(max(histogram))  # pragma: no cover - unreachable


@dataclass(slots=True)
class _Tally:
    """One provider (or the gateway) during one second."""

    second: int
    payments: int = 0  # provider: payments whose authorisation was sent there; gateway: all payments
    approved: int = 0
    declined: int = 0
    pending: int = 0
    failed: int = 0
    attempts: int = 0  # authorisation tries sent to the provider
    retries: int = 0
    failovers: int = 0  # provider: moves away from it to the next one; gateway: all moves
    skipped: int = 0  # routed around without a call (breaker open, certificate, bulkhead full)
    outcomes: Counter[str] = field(default_factory=Counter)
    latency: Counter[int] = field(default_factory=Counter)

    def add(self, other: _Tally) -> None:
        self.payments += other.payments
        self.approved += other.approved
        self.declined += other.declined
        self.pending += other.pending
        self.failed += other.failed
        self.attempts += other.attempts
        self.retries += other.retries
        self.failovers += other.failovers
        self.skipped += other.skipped
        self.outcomes.update(other.outcomes)
        self.latency.update(other.latency)

    def to_wire(self) -> dict[str, Any]:
        doc: dict[str, Any] = {name: getattr(self, name) for name in _COUNTS}
        doc["outcomes"] = dict(self.outcomes)
        doc["latency"] = sorted(self.latency.items())  # [[bin, count], ...]: JSON keys are strings
        return doc

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> _Tally:
        tally = cls(0, **{name: int(doc[name]) for name in _COUNTS})
        tally.outcomes.update({str(k): int(v) for k, v in doc["outcomes"].items()})
        tally.latency.update({int(b): int(n) for b, n in doc["latency"]})
        return tally


_COUNTS = ("payments", "approved", "declined", "pending", "failed", "attempts", "retries", "failovers", "skipped")


@dataclass(slots=True)
class Traffic:
    """One provider's (or the gateway's) figures before they are rendered: the window folded,
    the rate window folded, and the series. Every part is a sum, so the windows of several
    processes add up to exactly the window of all their traffic (histograms included: the
    host's p99 is computed from the summed bins, never averaged)."""

    window: _Tally
    recent: _Tally
    series: list[list[int]]  # [payments, approved] per step, oldest first

    def add(self, other: Traffic) -> None:
        self.window.add(other.window)
        self.recent.add(other.recent)
        for mine, theirs in zip(self.series, other.series):
            mine[0] += theirs[0]
            mine[1] += theirs[1]

    def summary(self, rate_window_s: int) -> dict[str, Any]:
        """JSON-ready, as the console shows it."""
        window, recent = self.window, self.recent
        per_min = 60.0 / rate_window_s
        p50, p99 = percentile(window.latency, 0.50), percentile(window.latency, 0.99)
        return {
            "payments": window.payments,
            "approved": window.approved,
            "declined": window.declined,
            "pending": window.pending,
            "failed": window.failed,
            "approval_rate": window.approved / window.payments if window.payments else None,
            "attempts": window.attempts,
            "latency_p50_ms": round(p50, 1) if p50 is not None else None,
            "latency_p99_ms": round(p99, 1) if p99 is not None else None,
            "outcomes": dict(window.outcomes),
            "failovers_per_min": round(recent.failovers * per_min, 1),
            "retries_per_min": round(recent.retries * per_min, 1),
            "skipped_per_min": round(recent.skipped * per_min, 1),
            "payments_per_min": round(recent.payments * per_min, 1),
            "series": [list(step) for step in self.series],
        }

    def to_wire(self) -> dict[str, Any]:
        return {"window": self.window.to_wire(), "recent": self.recent.to_wire(), "series": self.series}

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> Traffic:
        return cls(_Tally.from_wire(doc["window"]), _Tally.from_wire(doc["recent"]),
                   [[int(p), int(a)] for p, a in doc["series"]])


@dataclass(frozen=True, slots=True)
class Failure:
    at: float  # wall-clock time of the attempt (or of the payment when none was made)
    payment_id: str
    provider: str | None
    operation: str
    outcome: str  # the taxonomy class: unavailable, unknown, rejected, or failed (no attempt)
    code: str | None  # the classified reason: provider code or the gateway's own
    http_status: int | None
    latency_ms: float | None
    payment_status: str
    trace_id: str | None = None  # the request's (or reconciler pass's) trace, when tracing is on

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "payment_id": self.payment_id, "provider": self.provider,
                "operation": self.operation, "outcome": self.outcome, "code": self.code,
                "http_status": self.http_status,
                "latency_ms": round(self.latency_ms, 1) if self.latency_ms is not None else None,
                "payment_status": self.payment_status, "trace_id": self.trace_id}


class ConsoleStats:
    """The sliding window. `observe` is the payment service's observer; `snapshot` is read by
    the console. Not thread-safe: both run on the event loop."""

    def __init__(self, *, window_s: int = 300, rate_window_s: int = 60, series_step_s: int = 5,
                 max_failures: int = 50, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < rate_window_s <= window_s or series_step_s <= 0:
            raise ValueError("need 0 < rate_window_s <= window_s and series_step_s > 0")
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self.series_step_s = series_step_s
        self._clock = clock
        self._tallies: dict[str, deque[_Tally]] = {}
        self._failures: deque[Failure] = deque(maxlen=max_failures)
        self.observer_errors = 0

    # -- feeding ---------------------------------------------------------------------------------

    def observe(self, record: PaymentRecord, kind: str, extra: Mapping[str, Any] | None = None) -> None:
        """Called once per transaction log line. Never raises: the console must not be able to
        fail a payment."""
        try:
            if kind == "payment":
                self._payment(record, (extra or {}).get("latency_ms"))
            elif kind == "reconciliation":
                self._attempt_failures(record, record.attempts[-1:])
            else:  # a follow-up: only the tries of this call, the trailing run that starts at try 1
                self._attempt_failures(record, _trailing_run(record.attempts, kind))
        except Exception:  # noqa: BLE001 - a bug here must stay a console bug, never fail a payment
            self.observer_errors += 1

    def _tally(self, key: str, second: int) -> _Tally:
        buckets = self._tallies.get(key)
        if buckets is None:
            buckets = self._tallies[key] = deque()
        if buckets and buckets[-1].second == second:
            return buckets[-1]
        tally = _Tally(second)
        buckets.append(tally)
        horizon = second - self.window_s
        while buckets[0].second <= horizon:
            buckets.popleft()
        return tally

    def _payment(self, record: PaymentRecord, latency_ms: float | None) -> None:
        second = int(self._clock())
        overall = self._tally(GATEWAY, second)
        overall.payments += 1
        _count_status(overall, record.status.value)
        if latency_ms is not None:
            overall.latency[latency_bin(latency_ms)] += 1
        last_outcome: dict[str, str | None] = {}  # provider -> its last authorisation outcome
        previous: str | None = None  # provider of the last attempt that reached the engine
        for attempt in record.attempts:
            t = self._tally(attempt.provider, second)
            if attempt.outcome == "skipped":
                t.skipped += 1
                continue
            if attempt.failover_reason and previous is not None and previous != attempt.provider:
                self._tally(previous, second).failovers += 1
                overall.failovers += 1
            previous = attempt.provider
            if attempt.operation == "authorize":
                if attempt.try_number > 1:
                    t.retries += 1
                t.outcomes[attempt.outcome or "none"] += 1
                if attempt.raw_code not in NOT_SENT:
                    t.attempts += 1
                    last_outcome[attempt.provider] = attempt.outcome
                    if attempt.latency_ms is not None:
                        t.latency[latency_bin(attempt.latency_ms)] += 1
            if attempt.outcome in FAILURE_OUTCOMES and attempt.raw_code not in NOT_SENT:
                self._failures.append(_failure(record, attempt))
        for provider, outcome in last_outcome.items():
            t = self._tally(provider, second)
            t.payments += 1
            if outcome == "approved":
                t.approved += 1
            elif outcome in DECLINES:
                t.declined += 1
            elif outcome == "unknown" and record.provider == provider and record.status.value == "pending":
                t.pending += 1
            else:
                t.failed += 1
        if not record.attempts or record.status.value == "failed" and record.error_code in (
                "no_route", "no_provider_available"):
            self._failures.append(Failure(at=record.updated_at, payment_id=record.id, provider=None,
                                          operation="authorize", outcome="failed", code=record.error_code,
                                          http_status=None, latency_ms=latency_ms,
                                          payment_status=record.status.value, trace_id=current_trace_id()))

    def _attempt_failures(self, record: PaymentRecord, attempts: Iterable[Attempt]) -> None:
        for attempt in attempts:
            if attempt.outcome in FAILURE_OUTCOMES and attempt.raw_code not in NOT_SENT:
                self._failures.append(_failure(record, attempt))

    # -- reading ---------------------------------------------------------------------------------

    def _fold(self, key: str, now_s: int, span_s: int) -> _Tally:
        total = _Tally(now_s)
        for tally in self._tallies.get(key, ()):
            if tally.second > now_s - span_s:
                total.add(tally)
        return total

    def _series(self, key: str, now_s: int) -> list[list[int]]:
        """[payments, approved] per step, oldest first, covering the window."""
        steps = self.window_s // self.series_step_s
        series = [[0, 0] for _ in range(steps)]
        for tally in self._tallies.get(key, ()):
            age_steps = (now_s - tally.second) // self.series_step_s
            if 0 <= age_steps < steps:
                slot = series[steps - 1 - age_steps]
                slot[0] += tally.payments
                slot[1] += tally.approved
        return series

    @property
    def keys(self) -> list[str]:
        """The providers (and `GATEWAY`) seen in the window."""
        return list(self._tallies)

    def traffic(self, key: str) -> Traffic:
        """The window for one provider (or `GATEWAY`), folded."""
        now_s = int(self._clock())
        return Traffic(self._fold(key, now_s, self.window_s), self._fold(key, now_s, self.rate_window_s),
                       self._series(key, now_s))

    def summary(self, key: str) -> dict[str, Any]:
        """The window for one provider (or `GATEWAY`), JSON-ready."""
        return self.traffic(key).summary(self.rate_window_s)

    def failures(self, limit: int = 15) -> list[dict[str, Any]]:
        """The most recent failures first."""
        items = list(self._failures)[-limit:]
        return [f.to_dict() for f in reversed(items)]


def _count_status(tally: _Tally, status: str) -> None:
    if status in ("approved", "captured"):
        tally.approved += 1
    elif status == "declined":
        tally.declined += 1
    elif status == "pending":
        tally.pending += 1
    else:
        tally.failed += 1


def _failure(record: PaymentRecord, attempt: Attempt) -> Failure:
    return Failure(at=attempt.started_at, payment_id=record.id, provider=attempt.provider,
                   operation=attempt.operation, outcome=attempt.outcome or "none", code=attempt.raw_code,
                   http_status=attempt.http_status, latency_ms=attempt.latency_ms,
                   payment_status=record.status.value, trace_id=current_trace_id())


def _trailing_run(attempts: list[Attempt], operation: str) -> list[Attempt]:
    """The tries of the latest call for `operation`: from its last try 1 to the end."""
    for index in range(len(attempts) - 1, -1, -1):
        attempt = attempts[index]
        if attempt.operation == operation and attempt.try_number == 1:
            return attempts[index:]
    return []
