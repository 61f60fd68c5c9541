"""The cert-expiry drill, small: the primary's client certificate runs out mid-run, the backups
carry the payments, a rotated pair brings the primary back without a restart."""

from __future__ import annotations

from pathlib import Path

import orjson
from typer.testing import CliRunner

from gateway.cli import app
from gateway.drill import DrillOptions, run_cert_expiry_drill

SEED = 20240608


async def test_backups_carry_the_expiry_and_the_primary_returns_after_rotation(tmp_path: Path) -> None:
    report = await run_cert_expiry_drill(DrillOptions(payments=60, concurrency=8, log_dir=tmp_path, seed=SEED))
    s = report.summary
    assert s["duplicates"] == 0 and s["lost"] == 0 and s["charged_without_approval"] == 0
    before, expiring, during, after = (s["phases"][p] for p in ("before", "expiring", "during", "after"))
    cert = s["certificate"]

    assert before["sent"] > 0 and before["charges_by_provider"] == {"stripe": before["sent"]}

    assert cert["staged"]["status"] == "critical" and cert["problem_while_valid"] is None
    assert expiring["sent"] > 0, "payments kept flowing while the certificate ran out"
    assert cert["expired"]["status"] == "expired"
    assert cert["problem_while_expired"] == "client_certificate_expired"
    assert cert["provider_accepts_expired_pair"] is False, "the provider really refuses the pair in service"

    assert during["sent"] > 0
    assert during["answers"] == {"approved": during["sent"]}
    assert "stripe" not in during["charges_by_provider"]
    assert sum(during["charges_by_provider"].values()) == during["sent"], "the backups carried every payment"
    assert s["primary_skipped_for_certificate"] == during["sent"], "routed around before any call failed"

    assert cert["rotated"]["status"] == "ok" and cert["rotated_serial"] != cert["staged"]["serial"]
    assert cert["problem_after_rotation"] is None and cert["provider_accepts_rotated_pair"] is True
    assert after["sent"] > 0 and after["charges_by_provider"] == {"stripe": after["sent"]}, "back at the primary"

    assert report.ok and report.exit_code == 0, s["checks"]
    client = tmp_path / "certs" / "providers" / "stripe" / "client.pem"
    assert client.with_name("client.pem.prev").exists(), "rotation kept the expired pair for rollback"


def test_cert_expiry_command_reports_the_phases(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["drill", "cert-expiry", "--payments", "20", "--json", "--log-dir",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["phases"]) == {"before", "expiring", "during", "after"}
    assert summary["phases"]["during"]["charges_by_provider"].get("stripe", 0) == 0
    assert summary["duplicates"] == 0 and summary["lost"] == 0
