"""What the fleet drill reads back after the run: the journal from its PostgreSQL schema, and
every replica's transaction-log files (rotated and gzipped ones included), checked against each
other. Pure functions over lines and documents, so the arithmetic is testable on its own.

A transaction line records one state change: a payment's answer (`payment`), a follow-up's
(`capture`, `refund`, `void`), or the reconciler settling something (`reconciliation`, of the
payment or of one follow-up), or a provider's notification settling it (`webhook`, once per
event id). Definitions:
- `txlog_missing`: a state change the journal holds with no line in any file: a settled payment
  without a `payment`, `reconciliation` or `webhook` line, a capture or refund the journal counts
  without a line that made it (its own, the reconciliation that found it, or its notification's).
- `txlog_repeated`: a state change with more than one line across all files (one payment logged
  by two replicas, a line written again by the outbox after it was on disk). A follow-up the
  provider did not take (`unavailable`: nothing made) is not a state change, and its retry is a
  new transaction. A notification applied twice (two replicas, one event id) is one too.
- `reconciled_twice`: the part of those that are a payment (or a follow-up of it) settled by two
  reconciliation passes: two replicas that both took one orphan.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from gateway.drill.report import FINAL_OR_PENDING

FOLLOW_UP_EVENTS = frozenset({"capture", "refund", "void"})
MADE = frozenset({"approved"})  # a follow-up line whose outcome says the provider made it
NOT_MADE = "unavailable"


def transaction_files(log_dirs: Iterable[Path]) -> list[Path]:
    """Every transaction-log file of every replica and worker, live and rotated."""
    return sorted(p for d in log_dirs for p in d.glob("transactions*.jsonl*") if p.is_file())


def read_lines(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as lines:
            for line in lines:
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(doc, dict) and isinstance(doc.get("payment_id"), str):
                    yield doc


def _change(line: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(payment id, what changed, how) for a line that records a state change; None otherwise."""
    pid, event = line["payment_id"], line.get("event")
    follow_up = line.get("follow_up") or {}
    if event == "payment":
        return pid, "payment", "answer"
    if event == "reconciliation":
        return pid, str(follow_up.get("operation", "authorize")), "reconciliation"
    if event == "webhook":  # a provider's notification settled it: once per event id, fleet-wide
        return pid, str(follow_up.get("operation", "authorize")), f"webhook:{(line.get('webhook') or {}).get('event_id')}"
    if event in FOLLOW_UP_EVENTS:
        outcome = follow_up.get("outcome")
        if outcome == NOT_MADE:
            return None
        return pid, str(event), f"answer:{outcome}"
    return None


def txlog_figures(lines: Iterable[Mapping[str, Any]], journal: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """txlog_missing, txlog_repeated and reconciled_twice (module doc), and the line counts."""
    changes: Counter[tuple[str, str, str]] = Counter()
    events: Counter[str] = Counter()
    for line in lines:
        events[str(line.get("event"))] += 1
        change = _change(line)
        if change is not None:
            changes[change] += 1
    logged: dict[str, set[str]] = {}
    for (pid, what, how), _n in changes.items():
        if how in ("answer", "reconciliation") or how.startswith("webhook:") or how.removeprefix("answer:") in MADE:
            logged.setdefault(pid, set()).add(what)
    missing = 0
    for doc in journal:
        if doc.get("status") not in FINAL_OR_PENDING:
            continue
        have = logged.get(doc["id"], set())
        missing += "payment" not in have and "authorize" not in have
        missing += doc.get("captured_amount", 0) > 0 and "capture" not in have
        missing += doc.get("refunded_amount", 0) > 0 and "refund" not in have
    return {
        "txlog_missing": missing,
        "txlog_repeated": sum(1 for n in changes.values() if n > 1),
        "reconciled_twice": sum(1 for (_p, _w, how), n in changes.items() if how == "reconciliation" and n > 1),
        "txlog_lines": dict(sorted(events.items())),
    }


async def read_postgres_journal(dsn: str, reference_prefix: str) -> list[dict[str, Any]]:
    """This run's payment documents, read from the drill's schema once the fleet has stopped."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch("SELECT doc FROM payments")
    finally:
        await conn.close()
    docs = (orjson.loads(bytes(row["doc"])) for row in rows)
    return [d for d in docs if str(d.get("merchant_reference", "")).startswith(reference_prefix)]


async def unresolved_count(dsn: str) -> int:
    """Rows the reconciler still owns (payments and follow-ups not settled)."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM payments WHERE status IN ('received', 'attempting', 'pending', "
            "'capture_pending', 'void_pending', 'refund_pending')"))
    finally:
        await conn.close()


async def schema_version(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
    finally:
        await conn.close()
