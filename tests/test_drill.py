"""Drills, small: every scenario end to end (real emulators over mTLS, the real gateway on
loopback, real HTTP), the summary's arithmetic, and the `gateway drill` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.drill import SCENARIOS, DrillOptions, SendResult, get_scenario, percentile, run_drill, summarize
from gateway.drill.report import LedgerView, declined_then_failed_over, journal_mismatches
from gateway.drill.runner import CLIENT_KEY_ENV, RunSetup, plan_payments, provider_key_env
from gateway.redaction import Finding, Redactor

CONTRACT_KEYS = {"sent", "approved", "declined", "pending", "failed", "duplicates", "lost", "failovers", "retries",
                 "p50_ms", "p99_ms", "seconds", "log_dir", "journal_mismatches"}
SEED = 20240601


def _outcomes(s: dict[str, Any]) -> str:
    """What became of the payments, for a failure's message (a load-sensitive miss says which); a
    string, because pytest cuts a non-string message at 240 characters."""
    return str({k: s[k] for k in ("approved", "declined", "pending", "failed", "failure_reasons", "no_answer",
                                  "error_answers", "journal_status", "failovers", "retries", "quota_429s")})


def _scenario_holds(name: str, s: dict[str, Any]) -> None:
    match name:
        case "baseline":
            assert s["approved"] == s["sent"]
        case "primary-outage":
            assert s["approved"] == s["sent"], "the backups approve everything: " + _outcomes(s)
            assert s["failovers"] > 0
            assert s["charges_by_provider"].get("stripe", 0) == 0
        case "brownout":
            assert s["approved"] + s["pending"] == s["sent"]
        case "timeout-after-processing":
            assert s["approved"] + s["pending"] == s["sent"]
            assert s["status_queries"] > 0, "the unknown outcomes were settled by status query"
        case "decline-storm":
            assert s["expected_declines"] > 0
            assert s["declined"] == s["expected_declines"]
            assert s["declines_failed_over"] == 0
        case "rate-limited":
            assert s["retries"] + s["failovers"] > 0
        case "quota-spillover":
            assert s["approved"] == s["sent"], "no payment failed on the primary's 429"
            assert s["checks"]["primary_within_quota"] and s["checks"]["spilled_over_past_quota"]
        case "flapping":
            pass
        case "ambiguous-5xx":
            assert s["approved"] + s["pending"] == s["sent"]
            assert s["status_queries"] > 0, "each 503 after processing was settled by a status query"
        case "followup-unknown":
            assert s["follow_ups_sent"] >= 2 * s["approved"] > 0  # a capture and a refund each
            assert s["follow_ups_pending"] == 0
        case "webhook-chaos":
            assert s["pending"] > 0, "some authorisations went pending: only their notification settled them"
            assert s["pending_left"] == 0 and s["wrong_final_states"] == 0 and s["forged_accepted"] == 0
            assert s["lookups_by_provider"]["adyen"] == 0
            # Forgeries are drawn at random (5 %): every one that was sent was refused.
            forged = {k for k in s["webhook_deliveries"] if k.startswith("forged:")}
            assert forged <= {"forged:401"}, s["webhook_deliveries"]
            assert s["notifications_received"] > 0
            assert s["notifications_missing"] == 0 and s["notifications_repeated"] == 0
        case _:
            raise AssertionError(f"no expectation written for drill {name}")


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_each_drill_charges_once_and_loses_nothing(name: str, tmp_path: Path) -> None:
    report = await run_drill(name, DrillOptions(payments=40, concurrency=8, log_dir=tmp_path, seed=SEED))
    s = report.summary
    assert CONTRACT_KEYS <= s.keys()
    assert s["sent"] == 40 and s["abandoned"] == 0
    assert s["duplicates"] == 0
    assert s["lost"] == 0
    assert s["charged_without_approval"] == 0
    assert s["declines_failed_over"] == 0
    assert s["journal_mismatches"] == 0
    _scenario_holds(name, s)
    assert report.ok and report.exit_code == 0, f"{s['checks']} {_outcomes(s)}"
    assert (tmp_path / "gateway.db").exists()
    assert len((tmp_path / "transactions.jsonl").read_bytes().splitlines()) >= s["sent"]


async def test_the_time_cap_abandons_the_rest_and_says_so(tmp_path: Path) -> None:
    report = await run_drill("baseline", DrillOptions(payments=100_000, concurrency=4, log_dir=tmp_path,
                                                      max_seconds=0.5, seed=SEED))
    s = report.summary
    assert 0 < s["sent"] < 100_000
    assert s["sent"] + s["abandoned"] == 100_000
    assert s["lost"] == 0 and s["duplicates"] == 0


async def test_secrets_live_in_the_environment_only_while_the_config_is_read(tmp_path: Path) -> None:
    os.environ.pop(CLIENT_KEY_ENV, None)
    await run_drill("baseline", DrillOptions(payments=1, concurrency=1, log_dir=tmp_path, seed=SEED))
    assert CLIENT_KEY_ENV not in os.environ
    assert not any(provider_key_env(kind) in os.environ for kind in get_scenario("baseline").route)


@pytest.mark.parametrize("kwargs", [{"payments": 0}, {"payments": 100_001}, {"concurrency": 0},
                                    {"concurrency": 1001}, {"max_seconds": 0}])
def test_every_load_is_bounded(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DrillOptions(**kwargs)


# -- the summary catches what it exists to catch -------------------------------------------------


def _doc(pid: str, ref: str, status: str, *attempts: tuple[str, str, int, str | None]) -> dict[str, Any]:
    return {"id": pid, "merchant_reference": ref, "status": status,
            "attempts": [{"provider": p, "outcome": o, "try_number": t, "operation": "authorize",
                          "failover_reason": f} for p, o, t, f in attempts]}


def test_summary_counts_duplicates_lost_and_declines_failed_over() -> None:
    sends = [
        SendResult(0, "r0", 10.0, 201, "p0", "approved"),
        SendResult(1, "r1", 20.0, 201, "p1", "approved"),
        SendResult(2, "r2", 30.0),  # no answer, never journalled: lost
        SendResult(3, "r3", 40.0),  # no answer, journalled as pending: not lost
        SendResult(4, "r4", 50.0, 201, "p4", "declined", decline_card=True),
        SendResult(5, "r5", 60.0, 503, error="overloaded"),  # refused at the door: not accepted
        SendResult(6, "r6", 70.0, 201, "p6", "approved"),  # answered, journal still "attempting": lost
    ]
    journal = [
        _doc("p0", "r0", "approved", ("stripe", "approved", 1, None)),
        _doc("p1", "r1", "approved", ("stripe", "unavailable", 1, None), ("adyen", "approved", 1, "unavailable:x")),
        _doc("p3", "r3", "pending", ("stripe", "unknown", 1, None)),
        _doc("p4", "r4", "declined", ("stripe", "hard_decline", 1, None), ("adyen", "hard_decline", 1, "x")),
        _doc("p6", "r6", "attempting", ("stripe", None, 1, None)),
    ]
    ledger = {"p0": [LedgerView("stripe", True, 0, 0, False)], "p1": [LedgerView("stripe", True, 0, 0, False), LedgerView("adyen", True, 0, 0, False)], "p4": [LedgerView("adyen", True, 0, 0, False)]}
    s = summarize(scenario=get_scenario("decline-storm"), sends=sends, journal=journal, ledger=ledger,
                  abandoned=0, seconds=1.0, log_dir="x")
    assert (s["sent"], s["approved"], s["declined"], s["pending"], s["failed"]) == (7, 3, 1, 0, 3)
    assert s["duplicates"] == 1  # p1 charged at stripe and adyen
    assert s["lost"] == 2  # r2 and p6
    assert s["failure_reasons"] == {"no answer": 2, "overloaded": 1}
    assert s["charged_without_approval"] == 1  # p4: declined, yet adyen holds a charge
    assert s["declines_failed_over"] == 1
    assert s["failovers"] == 2 and s["expected_declines"] == 1
    assert s["checks"]["duplicates==0"] is False and s["checks"]["lost==0"] is False
    assert s["ok"] is False


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_a_soft_decline_cascade_is_not_a_declined_failover() -> None:
    doc = _doc("p", "r", "approved", ("stripe", "soft_decline", 1, None), ("adyen", "approved", 1, "soft_decline:x"))
    assert not declined_then_failed_over(doc)


# -- the command ---------------------------------------------------------------------------------


def test_drill_command_prints_one_json_line_and_exits_zero(tmp_path: Path) -> None:
    # Two at a time: twenty mTLS handshakes at once on a loaded machine can outlast the drill's
    # 400 ms try, and a baseline answered `pending` fails its approval check.
    result = CliRunner().invoke(app, ["drill", "baseline", "--payments", "20", "--concurrency", "2", "--json",
                                      "--log-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = orjson.loads(lines[-1])
    assert CONTRACT_KEYS <= summary.keys()
    assert summary["sent"] == 20 and summary["approved"] == 20
    assert summary["duplicates"] == 0 and summary["lost"] == 0
    assert summary["log_dir"] == str(tmp_path.resolve())


def test_drill_command_refuses_an_unknown_scenario() -> None:
    result = CliRunner().invoke(app, ["drill", "meteor-strike", "--json"])
    assert result.exit_code == 2
    assert "primary-outage" in result.output


def test_journal_mismatches_compare_charges_captures_refunds_and_voids_with_the_ledger() -> None:
    def doc(pid: str, status: str, captured: int = 0, refunded: int = 0, provider: str = "stripe") -> dict[str, Any]:
        return {"id": pid, "status": status, "provider": provider, "captured_amount": captured,
                "refunded_amount": refunded}

    journal = {d["id"]: d for d in (
        doc("agree", "refunded", 1000, 400), doc("refund_missing", "captured", 1000, 0),
        doc("capture_unseen", "approved", 0), doc("wrong_provider", "approved", provider="adyen"),
        doc("voided_here_only", "voided"), doc("pending", "pending"), doc("declined", "declined"),
        doc("refund_pending_done", "refund_pending", 1000, 0))}
    ledger = {
        "agree": [LedgerView("stripe", True, 1000, 400, False)],
        "refund_missing": [LedgerView("stripe", True, 1000, 400, False)],
        "capture_unseen": [LedgerView("stripe", True, 1000, 0, False)],
        "wrong_provider": [LedgerView("stripe", True, 0, 0, False)],
        "voided_here_only": [LedgerView("stripe", True, 0, 0, False)],
        "pending": [LedgerView("stripe", False, 0, 0, False)],  # pending: its charge is the reconciler's
        "declined": [LedgerView("stripe", False, 0, 0, False)],
        "refund_pending_done": [LedgerView("stripe", True, 1000, 500, False)],
        "not_journalled": [LedgerView("stripe", True, 0, 0, False)],
    }
    assert journal_mismatches(journal, ledger) == 6


def test_no_drill_reference_reads_as_a_card_number(tmp_path: Path) -> None:
    """A drill's references and keys are drill-<tag>-<index>, and the API refuses card data in
    them. A hex tag made card numbers with the index ('f4661919' and payment 13 are a
    Luhn-valid 14 digits): one run in about 350 saw exactly 4 of its 40 payments refused, the
    CI's 36-of-40 flake. The tag has letters only, so only the index's digits are left."""
    redactor = Redactor(())
    assert redactor.finding("drill-f4661919-000013") is Finding.CARD_NUMBER  # the old tag's failure
    setups = [RunSetup.new("baseline", DrillOptions(log_dir=tmp_path, seed=SEED)) for _ in range(500)]
    for setup in setups:
        for payment in plan_payments(get_scenario("baseline"), 200, setup.run_id, SEED):
            assert redactor.finding(payment.merchant_reference) is None, payment.merchant_reference
            assert redactor.finding(payment.idempotency_key) is None, payment.idempotency_key
