"""The incident questions as queries over the transaction-log views, gathered into a `Report`.

What was asked after an incident, and where the answer comes from:

- approval rate over time per provider: of the payments a provider was asked to authorise in a
  bucket (one per payment and provider, skips included), how many it approved; plus the
  payments' own approval rate (all providers);
- failures by provider x outcome class x raw code (attempt level: ``unavailable``,
  ``unknown``, ``rejected`` and the router's ``skipped``; declines are the card's answer and are
  listed separately as top decline codes);
- failovers, retries and reroutes (the router skipping a provider), and how many of those
  payments ended approved (saved); for retries also how many the retried try itself approved;
- latency p50/p95/p99 per provider (calls that left the gateway) and per payment;
- breaker open periods per provider (attempts seen with the breaker open or refused by it);
- pending payments and how reconciliation settled them;
- the headline: the provider and window where the failure rate peaked, with the dominant error
  class and raw code, e.g. ``stripe: unavailable/connect_failed 20:00–20:05``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.analysis.view import FAILURE_CLASSES, VIEW_COLUMNS, TimeRange, open_log

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "CONSEQUENCE_CODES",
    "Report",
    "WorstWindow",
    "analyze",
    "build_report",
    "format_window",
    "jsonable",
    "parse_bucket",
    "parse_time",
]

# Codes the gateway gives an attempt it refused or cut short itself. They follow from a failure
# (an open breaker, a full bulkhead, a spent deadline) and are never its cause, so the headline
# names them only when nothing else failed.
CONSEQUENCE_CODES = frozenset({"breaker_open", "bulkhead_full", "deadline_exceeded", "over_quota", "not_attempted"})
# Outcomes for which a provider really answered (or failed to): these have a meaningful latency.
_NOT_SENT_SQL = "outcome = 'skipped' OR coalesce(raw_code, '') IN ('breaker_open', 'bulkhead_full', " \
    "'deadline_exceeded', 'over_quota', 'not_attempted')"
_FAIL_SQL = "outcome IN (" + ", ".join(f"'{c}'" for c in FAILURE_CLASSES) + ")"

MAX_BUCKETS = 10_000
_NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
# A bucket in the worst window fails at least this share of the peak rate...
WINDOW_SHARE_OF_PEAK = 0.5
# ...and the window bridges at most this many buckets without any attempt at that provider.
WINDOW_MAX_GAP = 2
_Z = 1.96  # 95 % Wilson bound


# -- parsing the command-line values ----------------------------------------------------------

_BUCKET_RE = re.compile(r"^\s*(\d+)\s*(s|sec|m|min|h|d)?\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_bucket(text: str) -> int:
    """``30s``, ``1m``, ``5m``, ``1h`` (or plain seconds) -> seconds, 1 s .. 1 day."""
    match = _BUCKET_RE.match(text)
    if not match:
        raise ValueError(f"bucket {text!r}: use a number with s, m, h or d, e.g. 1m")
    seconds = int(match.group(1)) * _UNIT_S[(match.group(2) or "s").lower()]
    if not 1 <= seconds <= 86400:
        raise ValueError(f"bucket {text!r}: must be between 1s and 1d")
    return seconds


_CLOCK_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?$")


def parse_time(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """ISO-8601 (``2025-11-28T20:00``, ``...Z``, ``...+01:00``) or ``HH:MM[:SS]`` today (UTC).

    Returns naive UTC. A time without an offset is UTC.
    """
    value = text.strip()
    clock = _CLOCK_RE.match(value)
    if clock:
        hour, minute = int(clock.group(1)), int(clock.group(2))
        second = int(clock.group(3) or 0)
        micro = int((clock.group(4) or "0").ljust(6, "0"))
        today = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).date()
        try:
            return dt.datetime.combine(today, dt.time(hour, minute, second, micro))
        except ValueError as exc:
            raise ValueError(f"time {text!r}: {exc}") from None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"time {text!r}: use ISO-8601 (2025-11-28T20:00Z) or HH:MM (today, UTC)") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed


# -- the report -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorstWindow:
    """Where one provider failed most, and with what."""

    provider: str
    start: dt.datetime
    end: dt.datetime  # exclusive: start of the bucket after the window
    error_class: str
    raw_code: str
    attempts: int
    failures: int
    failure_rate: float
    peak_bucket: dt.datetime
    peak_rate: float
    peak_attempts: int
    first_failure: dt.datetime
    last_failure: dt.datetime
    causes: list[dict[str, Any]]
    payments: dict[str, int]
    text: str


@dataclass(slots=True)
class Report:
    meta: dict[str, Any]
    summary: dict[str, Any]
    headline: WorstWindow | None
    headline_text: str
    approval: dict[str, Any]
    failure_rate: dict[str, Any]
    failures: list[dict[str, Any]]
    failovers: dict[str, Any]
    latency: dict[str, list[dict[str, Any]]]
    breaker_open: list[dict[str, Any]]
    pending: dict[str, Any]
    declines: list[dict[str, Any]]
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: timestamps as ISO-8601 UTC strings (``Z``), durations in seconds."""
        return jsonable(asdict(self))


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds") + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> dict[str, Any]:
    rows = _rows(con, sql, params)
    return rows[0] if rows else {}


def _wilson_lower(failures: int, n: int) -> float:
    """Lower bound of the failure rate: one failed call in a quiet bucket does not beat a
    hundred failed calls in a busy one."""
    if n == 0:
        return 0.0
    p = failures / n
    denom = 1 + _Z * _Z / n
    centre = p + _Z * _Z / (2 * n)
    margin = _Z * math.sqrt(p * (1 - p) / n + _Z * _Z / (4 * n * n))
    return (centre - margin) / denom


def format_window(start: dt.datetime, end: dt.datetime, bucket_s: int) -> str:
    """``20:00–20:05`` (minutes when the window is on whole minutes, else seconds)."""
    whole_minutes = bucket_s % 60 == 0 and start.second == 0 and end.second == 0
    fmt = "%H:%M" if whole_minutes else "%H:%M:%S"
    return f"{start.strftime(fmt)}–{end.strftime(fmt)}"


def _bucket_sql(bucket_s: int, column: str) -> str:
    return f"time_bucket(to_microseconds({bucket_s * 1_000_000}), {column}, TIMESTAMP '1970-01-01')"


def _choose_bucket(requested: int, span_s: float) -> int:
    if span_s / requested <= MAX_BUCKETS:
        return requested
    for nice in _NICE_BUCKETS:
        if nice >= requested and span_s / nice <= MAX_BUCKETS:
            return nice
    return 86400


def analyze(
    paths: Iterable[str | Path] = (),
    *,
    time_range: TimeRange | None = None,
    bucket_s: int = 60,
    threads: int | None = None,
) -> Report:
    """Read the log files (see `gateway.analysis.view.resolve_paths`) and build the report."""
    started = time.perf_counter()
    con, files = open_log(paths, time_range=time_range, materialize="all", columns=VIEW_COLUMNS,
                          threads=threads)
    try:
        report = build_report(con, files=files, time_range=time_range, bucket_s=bucket_s)
    finally:
        con.close()
    report.meta["seconds"] = round(time.perf_counter() - started, 3)
    return report


def build_report(
    con: duckdb.DuckDBPyConnection,
    *,
    files: Sequence[Path] = (),
    time_range: TimeRange | None = None,
    bucket_s: int = 60,
) -> Report:
    """Run the queries on a connection that has the views of `open_log`."""
    rng = time_range or TimeRange()
    summary = _summary(con)
    span = 0.0
    if summary["first_ts"] is not None and summary["last_ts"] is not None:
        span = (summary["last_ts"] - summary["first_ts"]).total_seconds()
    used_bucket = _choose_bucket(bucket_s, span)
    meta: dict[str, Any] = {
        "files": [str(f) for f in files],
        "from": rng.start,
        "to": rng.end,
        "bucket_s": used_bucket,
        "bucket_requested_s": bucket_s,
        "generated_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
    }
    provider_buckets = _provider_buckets(con, used_bucket)
    headline = _worst_window(con, provider_buckets, used_bucket)
    if headline is not None:
        headline_text = headline.text
    elif summary["attempts"]:
        headline_text = f"no provider failures in {summary['attempts']:,} attempts"
    else:
        headline_text = "no provider attempts in the selected logs"
    return Report(
        meta=meta,
        summary=summary,
        headline=headline,
        headline_text=headline_text,
        approval=_approval(con, used_bucket),
        failure_rate=_failure_series(provider_buckets, used_bucket),
        failures=_failures(con),
        failovers=_failovers(con),
        latency=_latency(con),
        breaker_open=_breaker_periods(con, used_bucket),
        pending=_pending(con),
        declines=_declines(con),
        errors=_payment_errors(con),
    )


def _summary(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    lines = _one(con, """
        SELECT count(*) AS lines,
               count(*) FILTER (WHERE event = 'payment') AS payment_lines,
               count(*) FILTER (WHERE event = 'capture') AS captures,
               count(*) FILTER (WHERE event = 'void') AS voids,
               count(*) FILTER (WHERE event = 'refund') AS refunds,
               count(*) FILTER (WHERE event = 'reconciliation') AS reconciliations,
               min(ts) AS first_ts, max(ts) AS last_ts
        FROM transactions""")
    unreadable = _one(con, "SELECT count(*) AS n FROM log_lines WHERE event IS NULL")["n"]
    payments = _one(con, """
        SELECT count(*) AS payments,
               count(*) FILTER (WHERE auth_status = 'approved') AS approved,
               count(*) FILTER (WHERE auth_status = 'declined') AS declined,
               count(*) FILTER (WHERE auth_status IN ('pending', 'attempting', 'received')) AS pending,
               count(*) FILTER (WHERE auth_status = 'failed') AS failed,
               sum(amount) FILTER (WHERE auth_status = 'approved') AS approved_amount
        FROM payments""")
    attempts = _one(con, "SELECT count(*) AS attempts, count(*) FILTER (WHERE " + _FAIL_SQL + ") AS failed "
                         "FROM attempts")
    total = payments.get("payments") or 0
    return {
        **lines,
        "unreadable_lines": unreadable,
        **payments,
        "approval_rate": (payments["approved"] / total) if total else None,
        "attempts": attempts["attempts"],
        "failed_attempts": attempts["failed"],
    }


def _provider_buckets(con: duckdb.DuckDBPyConnection, bucket_s: int) -> list[dict[str, Any]]:
    return _rows(con, f"""
        SELECT provider, {_bucket_sql(bucket_s, 'started_at')} AS bucket, count(*) AS attempts,
               count(*) FILTER (WHERE {_FAIL_SQL}) AS failures
        FROM attempts WHERE provider IS NOT NULL AND started_at IS NOT NULL
        GROUP BY ALL ORDER BY provider, bucket""")


def _failure_series(rows: list[dict[str, Any]], bucket_s: int) -> dict[str, Any]:
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(row["provider"], []).append({
            "bucket": row["bucket"], "attempts": row["attempts"], "failures": row["failures"],
            "rate": row["failures"] / row["attempts"] if row["attempts"] else None,
        })
    return {"bucket_s": bucket_s, "series": series}


def _approval(con: duckdb.DuckDBPyConnection, bucket_s: int) -> dict[str, Any]:
    # One (payment, provider) pair per provider a payment was sent to (or skipped at); status
    # queries count, so an unknown answer that the status query found approved is approved.
    per_provider = _rows(con, f"""
        WITH pairs AS (
            SELECT provider, payment_id, min(started_at) AS t, bool_or(outcome = 'approved') AS ok
            FROM attempts WHERE operation IN ('authorize', 'status') AND provider IS NOT NULL
            GROUP BY provider, payment_id)
        SELECT provider, {_bucket_sql(bucket_s, 't')} AS bucket, count(*) AS payments,
               count(*) FILTER (WHERE ok) AS approved
        FROM pairs GROUP BY ALL ORDER BY provider, bucket""")
    overall = _rows(con, f"""
        SELECT {_bucket_sql(bucket_s, 'logged_at')} AS bucket, count(*) AS payments,
               count(*) FILTER (WHERE auth_status = 'approved') AS approved,
               count(*) FILTER (WHERE auth_status = 'declined') AS declined,
               count(*) FILTER (WHERE auth_status = 'failed') AS failed,
               count(*) FILTER (WHERE auth_status IN ('pending', 'attempting', 'received')) AS pending
        FROM payments WHERE logged_at IS NOT NULL GROUP BY ALL ORDER BY bucket""")
    series: dict[str, list[dict[str, Any]]] = {}
    for row in per_provider:
        series.setdefault(row["provider"], []).append({
            "bucket": row["bucket"], "payments": row["payments"], "approved": row["approved"],
            "rate": row["approved"] / row["payments"] if row["payments"] else None,
        })
    for row in overall:
        row["rate"] = row["approved"] / row["payments"] if row["payments"] else None
    totals = []
    for provider, points in series.items():
        payments = sum(p["payments"] for p in points)
        approved = sum(p["approved"] for p in points)
        totals.append({"provider": provider, "payments": payments, "approved": approved,
                       "rate": approved / payments if payments else None})
    return {"bucket_s": bucket_s, "series": series, "overall": overall, "providers": totals}


def _failures(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    return _rows(con, f"""
        SELECT provider, outcome AS class, raw_code, count(*) AS attempts,
               count(DISTINCT payment_id) AS payments,
               min(started_at) AS first_seen, max(started_at) AS last_seen
        FROM attempts WHERE {_FAIL_SQL}
        GROUP BY ALL ORDER BY attempts DESC, provider, class, raw_code""")


def _failovers(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    totals = _one(con, """
        SELECT count(*) AS payments,
               count(*) FILTER (WHERE failovers > 0) AS payments_with_failover,
               coalesce(sum(failovers), 0) AS failovers,
               count(*) FILTER (WHERE failovers > 0 AND auth_status = 'approved') AS saved_by_failover,
               count(*) FILTER (WHERE retries > 0) AS payments_with_retry,
               coalesce(sum(retries), 0) AS retries,
               count(*) FILTER (WHERE retries > 0 AND auth_status = 'approved') AS saved_by_retry
        FROM payments WHERE logged_at IS NOT NULL""")
    # Stricter: the retried try itself was approved (not a provider failed over to afterwards).
    totals["approved_on_retry"] = _one(con, """
        SELECT count(DISTINCT payment_id) AS n FROM attempts
        WHERE "try" > 1 AND operation = 'authorize' AND outcome = 'approved'""")["n"]
    rerouted = _one(con, """
        WITH s AS (SELECT DISTINCT payment_id FROM attempts WHERE outcome = 'skipped')
        SELECT count(*) AS payments_rerouted,
               count(*) FILTER (WHERE p.auth_status = 'approved') AS saved_by_reroute
        FROM s JOIN payments AS p USING (payment_id)""")
    by_reason = _rows(con, """
        SELECT a.failover_reason AS reason, a.provider AS to_provider, count(*) AS failovers,
               count(*) FILTER (WHERE p.auth_status = 'approved' AND p.provider = a.provider) AS approved_there
        FROM attempts AS a JOIN payments AS p USING (payment_id)
        WHERE a.failover_reason IS NOT NULL
        GROUP BY ALL ORDER BY failovers DESC, reason, to_provider""")
    retries = _rows(con, """
        SELECT provider, count(*) AS retries,
               count(*) FILTER (WHERE outcome = 'approved') AS approved_on_retry
        FROM attempts WHERE "try" > 1 AND operation <> 'status'
        GROUP BY provider ORDER BY retries DESC, provider""")
    return {**totals, **rerouted, "by_reason": by_reason, "retries_by_provider": retries}


def _quantiles(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        q = row.pop("q") or [None, None, None]
        row["p50_ms"], row["p95_ms"], row["p99_ms"] = (None if v is None else round(float(v), 3) for v in q)
        if row.get("max_ms") is not None:
            row["max_ms"] = round(float(row["max_ms"]), 3)
    return rows


def _latency(con: duckdb.DuckDBPyConnection) -> dict[str, list[dict[str, Any]]]:
    attempts = _quantiles(_rows(con, f"""
        SELECT provider, count(*) AS calls, quantile_cont(latency_ms, [0.5, 0.95, 0.99]) AS q,
               max(latency_ms) AS max_ms
        FROM attempts WHERE latency_ms IS NOT NULL AND provider IS NOT NULL AND NOT ({_NOT_SENT_SQL})
        GROUP BY provider ORDER BY provider"""))
    payments = _quantiles(_rows(con, """
        SELECT coalesce(provider, '(none)') AS provider, count(*) AS payments,
               quantile_cont(latency_ms, [0.5, 0.95, 0.99]) AS q, max(latency_ms) AS max_ms
        FROM transactions WHERE event = 'payment' AND latency_ms IS NOT NULL
        GROUP BY GROUPING SETS ((), (coalesce(provider, '(none)')))
        ORDER BY grouping(coalesce(provider, '(none)')) DESC, provider"""))
    payments = [row for row in payments if row["payments"]]  # no payment lines: no "(all)" row either
    if payments:
        payments[0]["provider"] = "(all)"
    return {"attempts": attempts, "payments": payments}


def _breaker_periods(con: duckdb.DuckDBPyConnection, merge_gap_s: float) -> list[dict[str, Any]]:
    """Periods in which a provider's breaker was seen open, from the attempts' point of view.

    An island is a run of consecutive attempts (per provider, in time order) refused by the
    breaker or failing while it was open (the half-open trials); it ends at the first attempt that
    found it closed, or the first trial that succeeded (``closed_seen_at``).
    Islands less than `merge_gap_s` apart are one period: with several workers each has its own
    breaker, and their attempts interleave.
    """
    # One sort: each open attempt's island is the number of not-open attempts before it; the
    # island's last attempt's successor is the first that found the breaker closed again.
    islands = _rows(con, f"""
        WITH s AS (
            SELECT provider, started_at, outcome, raw_code,
                   coalesce(raw_code = 'breaker_open' OR (breaker_state = 'open' AND {_FAIL_SQL}), false) AS is_open
            FROM attempts
            WHERE provider IN (SELECT DISTINCT provider FROM attempts
                               WHERE raw_code = 'breaker_open' OR breaker_state = 'open')
              AND started_at IS NOT NULL),
        g AS (
            SELECT *, sum(CASE WHEN is_open THEN 0 ELSE 1 END) OVER w AS grp, lead(started_at) OVER w AS next_at
            FROM s WINDOW w AS (PARTITION BY provider ORDER BY started_at
                                ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW))
        SELECT provider, min(started_at) AS first_seen, max(started_at) AS last_seen, count(*) AS attempts,
               count(*) FILTER (WHERE outcome = 'skipped' OR raw_code = 'breaker_open') AS refused,
               count(*) FILTER (WHERE NOT (outcome = 'skipped' OR raw_code = 'breaker_open')) AS trial_calls,
               arg_max(next_at, started_at) AS closed_seen_at
        FROM g WHERE is_open GROUP BY provider, grp
        ORDER BY provider, first_seen""")
    gap = dt.timedelta(seconds=merge_gap_s)
    periods: list[dict[str, Any]] = []
    for island in islands:
        last = periods[-1] if periods else None
        if last is not None and last["provider"] == island["provider"] \
                and island["first_seen"] - last["last_seen"] <= gap:
            last["last_seen"] = island["last_seen"]
            last["closed_seen_at"] = island["closed_seen_at"]
            for key in ("attempts", "refused", "trial_calls"):
                last[key] += island[key]
            continue
        periods.append(dict(island))
    for period in periods:
        period["seen_open_s"] = (period["last_seen"] - period["first_seen"]).total_seconds()
    periods.sort(key=lambda p: (p["first_seen"], p["provider"]))
    return periods


def _pending(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    rows = _rows(con, """
        SELECT payment_id, provider, logged_at AS pending_at, reconciled_at,
               CASE WHEN reconciled_at IS NULL THEN 'unresolved' ELSE auth_status END AS resolution,
               logged_at IS NULL AS recovered_after_crash, error_code, amount, currency,
               date_diff('millisecond', logged_at, reconciled_at) / 1000.0 AS resolved_after_s
        FROM payments
        WHERE first_status IN ('pending', 'attempting', 'received')
           OR (logged_at IS NULL AND reconciled_at IS NOT NULL)
        ORDER BY reconciled_at IS NOT NULL, resolved_after_s DESC NULLS FIRST, pending_at""")
    by_resolution: dict[str, int] = {}
    for row in rows:
        by_resolution[row["resolution"]] = by_resolution.get(row["resolution"], 0) + 1
    waits = sorted(r["resolved_after_s"] for r in rows if r["resolved_after_s"] is not None)
    return {
        "payments": len(rows),
        "unresolved": by_resolution.get("unresolved", 0),
        "recovered_after_crash": sum(1 for r in rows if r["recovered_after_crash"]),
        "by_resolution": by_resolution,
        "median_resolve_s": waits[len(waits) // 2] if waits else None,
        "max_resolve_s": waits[-1] if waits else None,
        "list": rows[:50],
    }


def _declines(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    rows = _rows(con, """
        SELECT raw_code AS code, outcome AS class, count(*) AS attempts,
               count(DISTINCT payment_id) AS payments, histogram(provider) AS by_provider
        FROM attempts WHERE outcome IN ('hard_decline', 'soft_decline')
        GROUP BY ALL ORDER BY attempts DESC, code LIMIT 10""")
    for row in rows:
        row["by_provider"] = dict(row["by_provider"] or {})
    return rows


def _payment_errors(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Why payments failed, as the checkout saw it (the payment's own error code)."""
    return _rows(con, """
        SELECT auth_status AS status, error_code, count(*) AS payments
        FROM payments WHERE auth_status = 'failed'
        GROUP BY ALL ORDER BY payments DESC, error_code LIMIT 10""")


def _worst_window(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]], bucket_s: int) -> WorstWindow | None:
    best: tuple[float, int, float] | None = None
    peak: dict[str, Any] | None = None
    for row in rows:
        if not row["failures"]:
            continue
        key = (_wilson_lower(row["failures"], row["attempts"]), row["failures"], -row["bucket"].timestamp())
        if best is None or key > best:
            best, peak = key, row
    if peak is None:
        return None
    provider = peak["provider"]
    step = dt.timedelta(seconds=bucket_s)
    buckets = {r["bucket"]: r for r in rows if r["provider"] == provider}
    peak_rate = peak["failures"] / peak["attempts"]
    threshold = peak_rate * WINDOW_SHARE_OF_PEAK

    def qualifies(b: dt.datetime) -> bool | None:
        row = buckets.get(b)
        if row is None:
            return None  # no traffic: neither extends nor ends the window
        return row["failures"] > 0 and row["failures"] / row["attempts"] >= threshold

    def extend(direction: int) -> dt.datetime:
        edge = peak["bucket"]
        b, gap = edge + direction * step, 0
        lo, hi = min(buckets), max(buckets)
        while lo <= b <= hi:
            ok = qualifies(b)
            if ok is None:
                gap += 1
                if gap > WINDOW_MAX_GAP:
                    break
            elif ok:
                edge, gap = b, 0
            else:
                break
            b += direction * step
        return edge

    start = extend(-1)
    end = extend(+1) + step
    causes = _rows(con, f"""
        SELECT outcome AS class, raw_code, count(*) AS attempts,
               min(started_at) AS first_seen, max(started_at) AS last_seen
        FROM attempts WHERE provider = $1 AND started_at >= $2 AND started_at < $3 AND {_FAIL_SQL}
        GROUP BY ALL ORDER BY attempts DESC, class, raw_code""", [provider, start, end])
    # A skip for an expired client certificate is a cause; a skip for an open breaker is not.
    root = next((c for c in causes if (c["raw_code"] or "") not in CONSEQUENCE_CODES), causes[0])
    totals = _one(con, f"""
        SELECT count(*) AS attempts, count(*) FILTER (WHERE {_FAIL_SQL}) AS failures
        FROM attempts WHERE provider = $1 AND started_at >= $2 AND started_at < $3""", [provider, start, end])
    impact = _one(con, """
        WITH touched AS (
            SELECT DISTINCT payment_id FROM all_attempts
            WHERE provider = $1 AND started_at >= $2 AND started_at < $3 AND operation IN ('authorize', 'status'))
        SELECT count(*) AS touched,
               count(*) FILTER (WHERE p.auth_status = 'approved' AND p.provider IS DISTINCT FROM $1)
                   AS approved_elsewhere,
               count(*) FILTER (WHERE p.auth_status = 'approved' AND p.provider = $1) AS approved_there,
               count(*) FILTER (WHERE p.auth_status = 'declined') AS declined,
               count(*) FILTER (WHERE p.auth_status = 'failed') AS failed,
               count(*) FILTER (WHERE p.auth_status IN ('pending', 'attempting', 'received')) AS pending
        FROM touched JOIN payments AS p USING (payment_id)""", [provider, start, end])
    rate = totals["failures"] / totals["attempts"] if totals["attempts"] else 0.0
    first = min(c["first_seen"] for c in causes)
    last = max(c["last_seen"] for c in causes)
    window = format_window(start, end, bucket_s)
    day = start.strftime("%Y-%m-%d")
    time_fmt = "%H:%M" if bucket_s % 60 == 0 else "%H:%M:%S"
    text = (
        f"{provider}: {root['class']}/{root['raw_code']} {window} UTC on {day}"
        f" — {totals['failures']:,} of {totals['attempts']:,} attempts failed ({rate:.0%}),"
        f" peak {peak_rate:.0%} at {peak['bucket'].strftime(time_fmt)};"
        f" {impact.get('touched', 0):,} payments sent there: {impact.get('approved_elsewhere', 0):,} approved"
        f" by another provider, {impact.get('approved_there', 0):,} approved there, {impact.get('failed', 0):,}"
        f" failed, {impact.get('pending', 0):,} pending"
    )
    return WorstWindow(
        provider=provider, start=start, end=end, error_class=root["class"], raw_code=root["raw_code"],
        attempts=totals["attempts"], failures=totals["failures"], failure_rate=rate,
        peak_bucket=peak["bucket"], peak_rate=peak_rate, peak_attempts=peak["attempts"],
        first_failure=first, last_failure=last, causes=causes, payments=impact, text=text,
    )
