"""The fleet drill, small: three real gateway processes (once with `--workers 2` each) behind a
real HAProxy, on a PostgreSQL schema and a Redis of the drill's own, through every event of the
drill (primary outage, a replica SIGKILLed and restarted, Redis restarted empty, the fleet's
PostgreSQL sessions terminated, a live migration and a rolling restart), then the books.

Run as ops would, `gateway drill fleet ... --json` in its own process: the exit code and the
JSON line are what is asserted. The drill itself is the proof (gateway/drill/fleet.py); these
tests pin the figures it must reach, and the transaction-log arithmetic on its own.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.drill.fleet_report import read_lines, transaction_files, txlog_figures
from gateway.journal.schema import migrations

ROOT = Path(__file__).resolve().parent.parent
LATEST = len(migrations("postgres"))
# The fleet starts one step behind when the newest step is deferrable (0003, an index), so the
# drill migrates live; a newer step that is not deferrable makes the live migration a no-op.
START = LATEST - 1 if migrations("postgres")[-1].deferrable else LATEST
EVENTS = ["primary_outage", "replica_sigkill", "redis_restart", "postgres_sessions_terminated",
          "migration_and_rolling_restart"]


def run_drill(log_dir: Path, *args: str) -> tuple[int, dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "drill", "fleet", "--json", "--log-dir", str(log_dir),
                           *args], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    return done.returncode, orjson.loads(lines[-1])


def assert_fleet_figures(code: int, s: dict[str, Any], payments: int, workers: int) -> None:
    failed = [name for name, ok in s["checks"].items() if not ok]
    assert code == 0 and s["ok"], (failed, {k: s.get(k) for k in ("events", "follow_up_answers", "http_statuses")})
    assert s["sent"] == payments and s["abandoned"] == 0
    for key in ("duplicates", "lost", "journal_mismatches", "http_500", "txlog_missing", "txlog_repeated",
                "reconciled_twice", "charged_without_approval", "charged_at_other_provider", "follow_ups_pending"):
        assert s[key] == 0, (key, s[key])
    # A payment may fail while every provider is out at once (the outage meets a killed replica's
    # breaker trips): failed means never charged (`charged_without_approval` above), and rare.
    assert s["approved"] + s["pending"] + s["failed"] == payments and s["failed"] <= payments // 50

    events = {e["event"]: e for e in s["events"]}
    assert list(events) == EVENTS and s["events_failed"] == 0
    assert all(e["under_load"] for e in s["events"])
    # Every replica saw the trip, within a second of the first.
    assert set(s["breaker_seen_ms"]) == {"r1", "r2", "r3"} and None not in s["breaker_seen_ms"].values()
    assert s["breaker_spread_ms"] <= 1000
    assert s["failovers"] > 0 and s["charges_by_provider"].get("adyen", 0) > 0  # the outage was routed around
    kill = events["replica_sigkill"]
    assert kill["processes_killed"] >= 1 + (workers if workers > 1 else 0)  # the supervisor and its workers
    assert -9 in s["gateway_exit_codes"][kill["replica"]]
    assert events["postgres_sessions_terminated"]["sessions_terminated"] > 0
    roll = events["migration_and_rolling_restart"]
    assert (roll["schema_before"], roll["schema_after"]) == (START, LATEST) and roll["migrate_exit_code"] == 0
    assert [r["exit_code"] for r in roll["replicas"]] == [0, 0, 0]  # drained, then stopped cleanly
    assert s["restarts"] == 1 + 3

    # Captures and refunds: every approved payment captured and partly refunded, the racing ones
    # (capture and refund at once on two replicas) too; the journal equals the ledgers on all.
    assert s["racing"]["payments"] > 0 and s["racing"]["refunds_made"] == s["racing"]["payments"]
    assert s["journal_status"].get("refunded", 0) >= s["approved"] - 2
    assert s["txlog_files"] >= 3 * workers and s["txlog_files_rotated"] > 0  # rotation lost nothing


def test_fleet_drill_three_replicas(tmp_path: Path) -> None:
    code, summary = run_drill(tmp_path / "run", "--payments", "150", "--replicas", "3", "--seed", "7")
    assert_fleet_figures(code, summary, 150, workers=1)


def test_fleet_drill_three_replicas_of_two_workers(tmp_path: Path) -> None:
    code, summary = run_drill(tmp_path / "run", "--payments", "150", "--replicas", "3", "--workers", "2",
                              "--seed", "8")
    assert_fleet_figures(code, summary, 150, workers=2)


# -- the transaction-log arithmetic, on lines written here -----------------------------------------


def line(pid: str, event: str, **extra: Any) -> dict[str, Any]:
    return {"payment_id": pid, "event": event, **extra}


def test_txlog_figures_count_missing_repeated_and_twice_reconciled_changes(tmp_path: Path) -> None:
    journal = [
        {"id": "p1", "status": "refunded", "captured_amount": 300, "refunded_amount": 100},
        {"id": "p2", "status": "approved"},  # settled by the reconciler only: one reconciliation line
        {"id": "p3", "status": "captured", "captured_amount": 300},  # its capture line is missing
        {"id": "p4", "status": "approved"},  # logged by two replicas, and reconciled twice
        {"id": "p5", "status": "received"},  # not settled: nothing expected
    ]
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    live = [line("p1", "payment"), line("p1", "capture", follow_up={"operation": "capture", "outcome": "unavailable"}),
            line("p1", "capture", follow_up={"operation": "capture", "outcome": "unavailable"}),  # not made, twice
            line("p1", "capture", follow_up={"operation": "capture", "outcome": "approved"}),
            line("p2", "reconciliation"), line("p3", "payment"), line("p4", "payment"), line("p4", "reconciliation")]
    rotated = [line("p1", "refund", follow_up={"operation": "refund", "outcome": "unknown"}),
               line("p1", "reconciliation", follow_up={"operation": "refund", "amount": 100}),
               line("p4", "payment"), line("p4", "reconciliation")]
    (tmp_path / "r1" / "transactions.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in live) + b"{torn")
    with gzip.open(tmp_path / "r2" / "transactions-w2-20261201T000000000000.jsonl.gz", "wb") as f:
        f.write(b"".join(orjson.dumps(x) + b"\n" for x in rotated))

    files = transaction_files([tmp_path / "r1", tmp_path / "r2"])
    figures = txlog_figures(read_lines(files), journal)

    assert len(files) == 2
    assert figures["txlog_missing"] == 1  # p3's capture
    assert figures["txlog_repeated"] == 2  # p4's payment line and its reconciliation
    assert figures["reconciled_twice"] == 1
    assert figures["txlog_lines"] == {"capture": 3, "payment": 4, "reconciliation": 4, "refund": 1}


@pytest.mark.parametrize("journal_status", ["captured", "refunded"])
def test_a_follow_up_line_that_was_not_made_does_not_count_as_logging_it(journal_status: str) -> None:
    journal = [{"id": "p1", "status": journal_status, "captured_amount": 300,
                "refunded_amount": 100 if journal_status == "refunded" else 0}]
    lines = [line("p1", "payment"), line("p1", "capture", follow_up={"operation": "capture", "outcome": "unavailable"})]
    if journal_status == "refunded":
        lines.append(line("p1", "capture", follow_up={"operation": "capture", "outcome": "approved"}))
    assert txlog_figures(lines, journal)["txlog_missing"] == 1
