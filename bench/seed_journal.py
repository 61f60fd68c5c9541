"""Seed an SQLite journal with history: N settled payments and their idempotency records.

    python bench/seed_journal.py PATH --rows N [--expired 0]

The rows have the real shape and size: each payment's document is what `payment_row` stores
for an approved card payment (one attempt), each key's record holds the stored answer the
gateway writes for it (`StoredResponse`), keys are random UUIDs as a checkout sends them, and
payment ids are made by `new_payment_id` (time-ordered, as in production). The keys fall due
over the next retention period, as a day of traffic's do, so the expiry of old records (the
reconciler's purge) runs at its steady rate while a bench runs on the file; a share `--expired`
of them is already past it, a backlog for the expiry to catch up with (a gateway restarted after
downtime longer than the retention). The schema is the gateway's own (`sqlite_prepare`).

Bounded: at most MAX_ROWS rows, written in transactions of BATCH rows with
`synchronous=OFF` (seeding is not a payment; the gateway opens the file with FULL again). About
2 KB of disk per row: 1 M rows take about 2 GB.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domain.outcome import PaymentStatus  # noqa: E402
from gateway.answers import payment_answer  # noqa: E402
from gateway.api.payments import new_payment_id  # noqa: E402
from gateway.journal.records import Attempt, PaymentRecord, StoredResponse  # noqa: E402
from gateway.journal.schema import sqlite_prepare  # noqa: E402
from gateway.journal.store import payment_row  # noqa: E402

MAX_ROWS = 20_000_000
BATCH = 50_000
RETENTION_S = 24 * 3600.0


def _template(now: float) -> tuple[str, bytes, bytes]:
    """One approved payment's row document and stored answer; the id is replaced per row."""
    payment_id = new_payment_id()
    record = PaymentRecord(id=payment_id, client="checkout", amount=1299, currency="EUR", capture=True,
                           merchant_reference="bench", metadata={}, card_brand="visa", card_bin="424242",
                           card_last4="4242", created_at=now, updated_at=now)
    record.status, record.outcome, record.route, record.provider = PaymentStatus.CAPTURED, "approved", "default", "stripe"
    record.provider_reference = "pi_3QbenchbenchbenchbenchAB"
    record.provider_idempotency_key = f"{payment_id}-stripe-auth"
    record.captured_amount = record.amount
    record.attempts = [Attempt("stripe", 1, "authorize", record.provider_idempotency_key, now, "approved",
                               "succeeded", 200, 180.5, "closed", record.provider_reference)]
    doc = payment_row(record)[4]
    answer = StoredResponse(201, payment_answer(record).body).body
    return payment_id, doc, answer


def seed(path: Path, rows: int, expired_share: float) -> float:
    started = time.monotonic()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    sqlite_prepare(conn, migrate=True)
    conn.execute("PRAGMA synchronous=OFF")
    now = time.time()
    template_id, doc, answer = _template(now)
    expired_every = round(1 / expired_share) if expired_share > 0 else 0
    written = 0
    while written < rows:
        n = min(BATCH, rows - written)
        payments, keys = [], []
        for i in range(written, written + n):
            payment_id = new_payment_id()
            created = now - RETENTION_S * 2 * (1 - i / rows)  # spread over two retention periods
            # Past retention (a backlog for the expiry), or due over the next retention period (its trickle).
            expires = now - 60 if expired_every and i % expired_every == 0 else now + RETENTION_S * (i / rows)
            payments.append((payment_id, "captured", created, created, doc.replace(template_id.encode(),
                                                                                   payment_id.encode())))
            keys.append(("checkout", str(uuid.uuid4()), "f" * 64, payment_id, "done", 201,
                         answer.replace(template_id.encode(), payment_id.encode()), created, expires))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO payments (id, status, created_at, updated_at, doc, version) "
                         "VALUES (?, ?, ?, ?, ?, 3)", payments)
        conn.executemany("INSERT INTO idempotency (scope, key, fingerprint, resource_id, state, status, body, "
                         "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", keys)
        conn.execute("COMMIT")
        written += n
        print(f"\r{written:,} / {rows:,} rows", end="", file=sys.stderr, flush=True)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(file=sys.stderr)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--expired", type=float, default=0.0, help="share of keys already past retention (0..1)")
    args = ap.parse_args()
    if not 0 < args.rows <= MAX_ROWS:
        ap.error(f"--rows: 1..{MAX_ROWS}")
    if not 0 <= args.expired <= 1:
        ap.error("--expired: 0..1")
    seconds = seed(args.path, args.rows, args.expired)
    print(f"seeded {args.rows:,} payments and keys into {args.path} in {seconds:.0f} s "
          f"({args.path.stat().st_size / 2**20:,.0f} MB)")


if __name__ == "__main__":
    main()
