"""What a drill saw, as one summary: pure functions over the answers, the journal and the
emulators' ledgers, so the arithmetic is testable without running anything.

Definitions (the drill contract in DESIGN.md):
- `approved/declined/pending/failed`: the gateway's answers as the caller saw them; `failed`
  is everything else that was sent (a `failed` payment, an error answer, no answer at all), so
  the four add up to `sent`. `failure_reasons` counts the failed ones by why: the error code
  of the answer or of the journalled payment, else the HTTP status or the exception's name.
- `duplicates`: checkout payments (merchant references, one Idempotency-Key each) with more
  than one approved charge across all ledgers, whether under one gateway payment id or under
  several (a key that became two gateway payments is a double charge too).
- `lost`: payments the gateway accepted (an answer with a payment id, or no answer at all)
  without a final or pending record in the journal once the drill is over.
- `charged_without_approval`: a ledger charge whose payment the journal does not hold as
  approved or pending (the customer paid, the merchant was told otherwise).
- `declines_failed_over`: payments tried at another provider after a hard decline.
- `journal_mismatches`: payments where the journal and the provider's ledger disagree: a charge
  the journal does not hold at that provider (or holds where the ledger has none), or a
  captured, refunded or voided amount that differs. A payment still `pending` is not compared
  (the reconciler owns it, and it has no follow-ups yet); one with a follow-up pending is.
- `failovers`/`retries`: from the journal's attempts, counted as the transaction log counts them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from gateway.drill.scenarios import INVARIANTS, Scenario

FOLLOW_UP_PENDING = frozenset({"capture_pending", "void_pending", "refund_pending"})
FINAL_OR_PENDING = frozenset({"approved", "declined", "failed", "pending", "captured", "voided", "refunded",
                              *FOLLOW_UP_PENDING})
HOLDS_A_CHARGE = frozenset({"approved", "pending", "captured", "refunded", "voided", *FOLLOW_UP_PENDING})
UNSETTLED = frozenset({"received", "attempting", "pending"})
ANSWER_STATUSES = ("approved", "declined", "pending")


@dataclass(frozen=True, slots=True)
class SendResult:
    """One request to the gateway, as the drill's client saw it."""

    index: int
    merchant_reference: str
    latency_ms: float
    http_status: int | None = None  # None: no answer (connection error or client timeout)
    payment_id: str | None = None
    status: str | None = None  # the payment's status in the answer
    error: str | None = None  # error code of an answer without a payment, or the exception's name
    decline_card: bool = False


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _authorize_attempts(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [a for a in doc.get("attempts", ()) if a.get("operation") == "authorize"]


def declined_then_failed_over(doc: Mapping[str, Any]) -> bool:
    """A hard decline followed by an authorisation attempt at another provider."""
    declined_at: str | None = None
    for attempt in _authorize_attempts(doc):
        if declined_at is not None and attempt.get("provider") != declined_at and attempt.get("outcome") != "skipped":
            return True
        if attempt.get("outcome") == "hard_decline":
            declined_at = attempt.get("provider")
    return False


@dataclass(frozen=True, slots=True)
class LedgerView:
    """One payment object at one provider, as its emulator's ledger holds it."""

    provider: str
    approved: bool
    captured: int
    refunded: int
    voided: bool


def charges_of(ledger: Mapping[str, Sequence[LedgerView]]) -> dict[str, list[str]]:
    """Gateway payment id -> the provider of each approved charge."""
    return {pid: [e.provider for e in entries if e.approved] for pid, entries in ledger.items()
            if any(e.approved for e in entries)}


def journal_mismatches(by_id: Mapping[str, Mapping[str, Any]], ledger: Mapping[str, Sequence[LedgerView]]) -> int:
    """Payments on which the journal and the providers' ledgers disagree (see the module doc)."""
    mismatched = 0
    for pid in by_id.keys() | ledger.keys():
        doc, entries = by_id.get(pid), ledger.get(pid, ())
        if doc is None:
            mismatched += any(e.approved for e in entries)
            continue
        held = [e for e in entries if e.approved and e.provider == doc.get("provider")]
        status = doc.get("status")
        if status in UNSETTLED or not held:  # a pending charge is the reconciler's; it has no follow-ups yet
            mismatched += status not in UNSETTLED and status in HOLDS_A_CHARGE
            continue
        if status not in HOLDS_A_CHARGE:
            mismatched += 1
            continue
        if (doc.get("captured_amount", 0) != sum(e.captured for e in held)
                or doc.get("refunded_amount", 0) != sum(e.refunded for e in held)
                or (status == "voided") != any(e.voided for e in held)):
            mismatched += 1
    return mismatched


def summarize(
    *,
    scenario: Scenario,
    sends: Sequence[SendResult],
    journal: Iterable[Mapping[str, Any]],
    ledger: Mapping[str, Sequence[LedgerView]],
    abandoned: int,
    seconds: float,
    log_dir: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The drill's summary. `journal` holds this run's payment documents, `ledger` maps a
    gateway payment id to its payment objects in every provider's ledger."""
    charges = charges_of(ledger)
    by_id: dict[str, Mapping[str, Any]] = {}
    by_ref: dict[str, Mapping[str, Any]] = {}
    for doc in journal:
        by_id[doc["id"]] = doc
        by_ref[doc["merchant_reference"]] = doc

    answers = Counter(s.status for s in sends if s.payment_id is not None and s.status in ANSWER_STATUSES)
    sent = len(sends)
    no_answer = sum(1 for s in sends if s.http_status is None)
    error_answers = sum(1 for s in sends if s.http_status is not None and s.payment_id is None)

    failure_reasons: Counter[str] = Counter()
    for s in sends:
        if s.payment_id is not None and s.status in ANSWER_STATUSES:
            continue
        doc = by_id.get(s.payment_id or "") or {}
        failure_reasons[s.error or doc.get("error_code") or (f"http {s.http_status}" if s.http_status else "no answer")] += 1

    lost = 0
    for s in sends:
        if s.payment_id is not None:
            doc = by_id.get(s.payment_id)
        elif s.http_status is None:
            doc = by_ref.get(s.merchant_reference)
        else:  # refused at the door (an error answer without a payment): not accepted, unless journalled
            doc = by_ref.get(s.merchant_reference)
            if doc is None:
                continue
        if doc is None or doc.get("status") not in FINAL_OR_PENDING:
            lost += 1

    charges_per_reference: Counter[str] = Counter()
    for pid, providers in charges.items():
        charges_per_reference[by_id[pid]["merchant_reference"] if pid in by_id else pid] += len(providers)
    duplicates = sum(1 for n in charges_per_reference.values() if n > 1)
    payments_per_reference = Counter(doc["merchant_reference"] for doc in by_id.values())
    charged_without_approval = sum(
        1 for pid in charges if by_id.get(pid, {}).get("status") not in HOLDS_A_CHARGE
    )
    charges_by_provider = Counter(p for providers in charges.values() for p in providers)

    failovers = retries = skipped = status_queries = declines_failed_over = 0
    journal_status: Counter[str] = Counter()
    for doc in by_id.values():
        journal_status[doc.get("status", "?")] += 1
        for a in doc.get("attempts", ()):
            if a.get("failover_reason"):
                failovers += 1
            if a.get("try_number", 0) > 1 and a.get("operation") != "status":
                retries += 1
            if a.get("outcome") == "skipped":
                skipped += 1
            if a.get("operation") == "status":
                status_queries += 1
        if declined_then_failed_over(doc):
            declines_failed_over += 1

    approved, declined, pending = answers["approved"], answers["declined"], answers["pending"]
    latencies = [s.latency_ms for s in sends if s.http_status is not None]
    not_declined = sent - declined
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "primary": scenario.primary,
        "sent": sent,
        "approved": approved,
        "declined": declined,
        "pending": pending,
        "failed": sent - approved - declined - pending,
        "no_answer": no_answer,
        "error_answers": error_answers,
        "failure_reasons": dict(sorted(failure_reasons.items())),
        "abandoned": abandoned,
        "duplicates": duplicates,
        "lost": lost,
        "charged_without_approval": charged_without_approval,
        "journal_mismatches": journal_mismatches(by_id, ledger),
        "follow_ups_pending": sum(1 for d in by_id.values() if d.get("status") in FOLLOW_UP_PENDING),
        "references_with_several_payments": sum(1 for n in payments_per_reference.values() if n > 1),
        "declines_failed_over": declines_failed_over,
        "expected_declines": sum(1 for s in sends if s.decline_card),
        "approval_rate": round(approved / not_declined, 5) if not_declined else 1.0,
        "failovers": failovers,
        "retries": retries,
        "skipped": skipped,
        "status_queries": status_queries,
        "charges_by_provider": dict(sorted(charges_by_provider.items())),
        "journal_status": dict(sorted(journal_status.items())),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "seconds": round(seconds, 3),
        "log_dir": log_dir,
    }
    if extra:
        summary.update(extra)
    checks = {c.name: bool(c.test(summary)) for c in (*INVARIANTS, *scenario.checks)}
    summary["checks"] = checks
    summary["ok"] = all(checks.values())
    return summary


_TABLE_ROWS = (
    ("sent", "sent"), ("approved", "approved"), ("declined", "declined"), ("pending", "pending"),
    ("failed", "failed"), ("why they failed", "failure_reasons"), ("no answer", "no_answer"), ("abandoned (time cap)", "abandoned"),
    ("approval rate (non-declined)", "approval_rate"), ("failovers", "failovers"), ("retries", "retries"),
    ("breaker skips", "skipped"), ("status queries", "status_queries"), ("charges by provider", "charges_by_provider"),
    ("journal after settling", "journal_status"), ("duplicates", "duplicates"), ("lost", "lost"),
    ("charged without approval", "charged_without_approval"), ("journal mismatches", "journal_mismatches"),
    ("follow-ups still pending", "follow_ups_pending"), ("declines failed over", "declines_failed_over"),
    ("p50 latency (ms)", "p50_ms"), ("p99 latency (ms)", "p99_ms"), ("seconds", "seconds"), ("log dir", "log_dir"),
)


# Shown only when the drill reports them (crash-restart, cert-expiry).
_OPTIONAL_ROWS = (
    ("kills (under load)", "kills"), ("restarts", "restarts"), ("unresolved in journal at kills", "unresolved_at_kills"),
    ("client retries (same key)", "client_retries"), ("answers contradicting journal", "answers_contradicting_journal"),
    ("transaction log lines missing", "txlog_missing"), ("seed", "seed"),
)


def render_table(summary: Mapping[str, Any]) -> Table:
    table = Table(title=f"drill {summary['scenario']} (primary: {summary['primary']})", show_header=True)
    table.add_column("measure")
    table.add_column("value", overflow="fold")
    for label, key in _TABLE_ROWS:
        value = summary.get(key)
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        table.add_row(label, str(value))
    for label, key in _OPTIONAL_ROWS:
        if key in summary:
            table.add_row(label, str(summary[key]))
    for phase, doc in summary.get("phases", {}).items():
        charges = ", ".join(f"{k} {v}" for k, v in doc["charges_by_provider"].items()) or "-"
        table.add_row(f"phase {phase}", f"sent {doc['sent']}; charges: {charges}")
    for name, passed in summary["checks"].items():
        table.add_row(f"check {name}", "[green]pass[/green]" if passed else "[bold red]FAIL[/bold red]")
    return table
