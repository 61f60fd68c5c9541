"""The crash-restart drill, small: the gateway as its own process, SIGKILLed under load and
restarted on the same port and journal, the client retrying with the same Idempotency-Key."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.drill import DrillOptions, SendResult, run_crash_drill, summarize
from gateway.drill.report import LedgerView
from gateway.drill.scenarios import CRASH_RESTART

CONTRACT_KEYS = {"sent", "approved", "declined", "pending", "failed", "duplicates", "lost", "failovers", "retries",
                 "p50_ms", "p99_ms", "seconds", "log_dir", "kills", "restarts", "seed"}
SEED = 20240607


async def test_killed_twice_under_load_charges_once_and_loses_nothing(tmp_path: Path) -> None:
    report = await run_crash_drill(DrillOptions(payments=60, concurrency=8, kills=2, log_dir=tmp_path, seed=SEED))
    s = report.summary
    assert CONTRACT_KEYS <= s.keys()
    assert s["sent"] == 60 and s["abandoned"] == 0 and s["seed"] == SEED
    assert s["duplicates"] == 0
    assert s["lost"] == 0
    assert s["charged_without_approval"] == 0
    assert s["kills"] == 2 and s["restarts"] == s["kills"]
    assert s["kills_under_load"] == 2
    assert s["unresolved_at_kills"] > 0, "the kills landed while payments were between journal and answer"
    assert s["client_retries"] > 0, "the client retried with the same keys while the gateway was down"
    assert s["answers_contradicting_journal"] == 0
    assert s["charged_at_other_provider"] == 0
    # A payment whose request died around its Stripe call may stay pending (Stripe's search
    # lags, so "not found" proves nothing for minutes): open only as pending, owned by the reconciler.
    assert s["open_after_settling"] <= s["journal_status"].get("pending", 0)
    assert report.ok and report.exit_code == 0, s["checks"]
    # One journal across every process: each of this run's payments is in it once.
    assert s["references_with_several_payments"] == 0
    assert sum(s["journal_status"].values()) == 60
    assert (tmp_path / "gateway-process.log").read_text().count("--- start ") == 3


def test_a_key_that_became_two_charged_payments_is_a_duplicate() -> None:
    """Two gateway payments for one checkout payment (one Idempotency-Key), each charged once,
    is still a double charge."""
    sends = [SendResult(0, "r0", 10.0, 201, "p0", "approved")]
    journal = [
        {"id": "p0", "merchant_reference": "r0", "status": "approved", "provider": "stripe", "attempts": []},
        {"id": "p0b", "merchant_reference": "r0", "status": "approved", "provider": "adyen", "attempts": []},
    ]
    s = summarize(scenario=CRASH_RESTART, sends=sends, journal=journal, ledger={"p0": [LedgerView("stripe", True, 0, 0, False)], "p0b": [LedgerView("adyen", True, 0, 0, False)]},
                  abandoned=0, seconds=1.0, log_dir="x",
                  extra={"kills": 0, "restarts": 0, "answers_contradicting_journal": 0, "charged_at_other_provider": 0})
    assert s["duplicates"] == 1
    assert s["references_with_several_payments"] == 1
    assert s["ok"] is False


@pytest.mark.parametrize("kills", [-1, 21])
def test_kills_are_bounded(kills: int) -> None:
    with pytest.raises(ValueError):
        DrillOptions(kills=kills)


def test_crash_restart_command_prints_kills_restarts_and_seed(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["drill", "crash-restart", "--payments", "16", "--concurrency", "4", "--kills",
                                      "1", "--seed", "7", "--json", "--log-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["kills"], summary["restarts"], summary["seed"]) == (1, 1, 7)
    assert summary["duplicates"] == 0 and summary["lost"] == 0
