"""`gateway drill threeds`, small: challenged, frictionless and plain cards with shoppers who
complete, fail or abandon, faults at the primary; its own numbers and every drill's invariants."""

from __future__ import annotations

from pathlib import Path

from gateway.drill.catalog import DRILL_NAMES, run_named_drill
from gateway.drill.runner import DrillOptions


async def test_the_threeds_drill_never_fails_over_after_an_action(tmp_path: Path) -> None:
    assert "threeds" in DRILL_NAMES
    report = await run_named_drill("threeds", DrillOptions(payments=40, concurrency=4, log_dir=tmp_path, seed=11))
    s = report.summary
    assert report.ok and report.exit_code == 0, {k: v for k, v in s["checks"].items() if not v}
    assert s["action_required"] > 0 and s["failed_over_after_action"] == 0
    assert s["shoppers_completed"] > 0 and s["shoppers_failed"] > 0 and s["shoppers_abandoned"] > 0
    assert s["abandoned_expired"] == s["shoppers_abandoned"]
    assert (s["duplicates"], s["lost"], s["journal_mismatches"], s["still_waiting"]) == (0, 0, 0, 0)
    assert s["sent"] == 40 and s["approved"] + s["declined"] + s["pending"] + s["failed"] == 40
    assert set(s["charges_by_provider"]) <= {"stripe"}  # nothing bound to the primary was charged elsewhere
    assert s["completions"] == {"200": s["shoppers_completed"] + s["shoppers_failed"]}
