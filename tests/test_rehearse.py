"""`gateway rehearse`, small and end to end: the shipped configuration, the gateway as its own
process, real emulators over mTLS, the peak scenario's faults, then a replay of that run's own
transaction log (`--from-log`). Seconds instead of minutes and a few payments a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from gateway.analysis.report import analyze
from gateway.cli import app
from gateway.rehearse.from_log import read_day
from gateway.rehearse.verdict import LIMITS

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261201


def _run(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["rehearse", "--config", str(ROOT / "config" / "gateway.yaml"), "--json",
                                      "--settle-s", "2", "--seed", str(SEED), *args])
    assert result.exit_code == 0, result.output[-3000:]
    return orjson.loads(result.output.strip().splitlines()[-1])


def test_a_short_peak_sale_then_its_own_day_replayed(tmp_path: Path) -> None:
    run_dir, html = tmp_path / "peak", tmp_path / "report.html"
    r = _run("--seconds", "10", "--target-rate", "16", "--quota-share", "0.4", "--p99-target-ms", "2500",
             "--run-dir", str(run_dir), "--html", str(html))

    assert r["duplicates"] == 0 and r["lost"] == 0 and r["journal_mismatches"] == 0
    assert r["limited_by"] in LIMITS and r["limited_by_detail"]
    assert 0 < r["max_sustained_rate"] <= r["peak_rate"] == 24
    assert r["p99_ms_at_max_sustained"] <= r["p99_target_ms"]
    assert isinstance(r["failed_by_429"], int) and isinstance(r["suggestions"], list)
    assert r["provider_quotas"] == {"stripe": 9.6}
    # The primary's quota is below the peak: the gateway's own bucket (90 % of it) spills the
    # excess over to a backup before the provider's 429s start.
    assert r["gateway_quotas"]["stripe"]["rate_limit_per_s"] == pytest.approx(9.6 * 0.9)
    assert r["spilled_over_by_reason"].get("over_quota", 0) > 0 and r["failed_by_429"] == 0
    assert r["spilled_over"] > 0, "the primary's outage moved payments to a backup"
    assert [e["event"].split(" ", 1)[1] for e in r["timeline"]] == [
        "browns out: +600-1200 ms, 10% 503", "fails: connections refused", "client certificate expires",
        "recovers"]
    assert r["timeline"][2]["provider"] == "checkout" and r["timeline"][2]["serial"]
    assert {"direct", "rerouted", "failed_over"} <= r["failover_cost"].keys()
    windows = r["windows"]
    assert len(windows) >= 8 and sum(w["sent"] for w in windows) == r["sent"] > 100
    assert any("stripe down" in w["faults"] for w in windows)

    report = analyze([str(run_dir)], bucket_s=1)
    buckets = {row["bucket"] for row in report.approval["overall"]}
    assert len(buckets) >= 8, "the run's log is a time series, not one point"
    assert "<svg" in html.read_text()
    assert r["txlog_payments"] == r["sent"] - r["shed"], "one log line per payment the gateway took"

    day = read_day([run_dir])
    assert day.payments == r["txlog_payments"] and day.bucket_s == 1
    assert any(kind.decline for kind in day.mix) and {"stripe", "adyen"} <= day.latency.keys()

    replay = _run("--from-log", str(run_dir), "--speedup", "4", "--scale", "0.5", "--scenario", "none",
                  "--run-dir", str(tmp_path / "replay"))
    assert replay["profile"] == "from-log" and replay["scenario"] == "none"
    assert replay["duplicates"] == 0 and replay["lost"] == 0 and replay["journal_mismatches"] == 0
    assert abs(replay["sent"] - day.payments / 2) <= len(day.counts), "half the day's payments, a quarter the time"
    assert replay["load_seconds"] < 10 / 4 + 3


def test_a_profile_it_does_not_know_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["rehearse", "--profile", "black-friday", "--config",
                                      str(ROOT / "config" / "gateway.yaml"), "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown profile 'black-friday'" in result.output


def test_a_log_duckdb_cannot_read_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A day taken from a log with a NaN time (a hand-edited or corrupted line)."""
    line = {"event": "payment", "payment_id": "pay_x", "log_id": "pay_x:payment:1", "status": "approved",
            "provider": "stripe", "amount": 1000, "currency": "EUR", "route": "default", "latency_ms": 10.0,
            "attempts": [], "ts": "2026-12-01T10:00:00Z"}
    (tmp_path / "transactions.jsonl").write_text(
        '{"created_at": NaN, ' + orjson.dumps(line).decode()[1:] + "\n"
        + orjson.dumps({**line, "payment_id": "pay_y", "created_at": 1796130000.0}).decode() + "\n")
    result = CliRunner().invoke(app, ["rehearse", "--from-log", str(tmp_path), "--config",
                                      str(ROOT / "config" / "gateway.yaml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output.startswith("error: rehearse: reading the logs failed"), \
        result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
