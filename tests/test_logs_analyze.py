"""`gateway logs analyze|query` over logs the real gateway wrote while a real emulator had an
outage, plus the view's edge cases on hand-written lines of the same shape."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from typer.testing import CliRunner

from gateway.cli.logs import logs_app
from gateway.analysis.report import analyze, format_window, parse_bucket, parse_time
from gateway.analysis.view import LogFilesNotFound, TimeRange, open_log, resolve_paths
from gateway.config import parse_config
from tests.conftest import AUTH, card_payment, gateway_config_data

SCHEMA = orjson.loads((Path(__file__).resolve().parents[1] / "docs" / "transaction-log.schema.json").read_bytes())


def cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(logs_app, name="logs")
    return root


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli(), list(args))


# -- a small validator for the JSON Schema subset docs/transaction-log.schema.json uses ----------

_TYPES = {"string": str, "integer": int, "number": (int, float), "object": dict, "array": list, "null": type(None),
          "boolean": bool}


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    if "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in {schema['enum']}"]
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, _TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                 for k in kinds)
        if not ok:
            return [f"{path}: {value!r} is not {kinds}"]
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing {key}" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in schema.get("properties", {}):
                errors += schema_errors(item, schema["properties"][key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(item, schema["additionalProperties"], f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


# -- the real gateway, a real emulator, a real outage -------------------------------------------


def floor_s(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc).replace(tzinfo=None)


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None)


@pytest.mark.parametrize("with_backup", [True, False], ids=["failover", "single-provider"])
async def test_analysis_finds_the_injected_outage(tmp_path, dev_certs, emulators, start_gateway,
                                                  with_backup) -> None:
    backup = next((k for k in ("adyen", "checkout") if k in emulators), None) if with_backup else None
    order = ("stripe", backup) if backup else ("stripe",)
    data = gateway_config_data(tmp_path, dev_certs, emulators, order=order)
    # A short reset: half-open trials keep failing during the outage, and the breaker closes
    # again right after it, so every failure lies between switching the outage on and off.
    data["providers"]["stripe"]["breaker"] = {"fail_max": 3, "reset_timeout_s": 0.4}
    config = parse_config(data)
    client = await start_gateway(config)
    sent: list[str] = []

    async def pay(number: str = "4242424242424242") -> dict[str, Any]:
        resp = await client.post("/v1/payments", json=card_payment(number),
                                 headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())})
        doc = await resp.json()
        sent.append(doc["id"])
        return doc

    for _ in range(4):
        assert (await pay())["status"] == "approved"
    await pay("4000000000009995")  # a hard decline: insufficient_funds
    await asyncio.sleep(1.05)  # the outage starts in a later one-second bucket
    on = time.time()
    await emulators["stripe"].set_outage(True)
    during = []
    for _ in range(10):
        during.append(await pay())
        await asyncio.sleep(0.12)
    await emulators["stripe"].set_outage(False)
    off = time.time()
    # Past the breaker's reset (the next call is a trial, and it succeeds) and into the next
    # one-second bucket, so that no bucket mixes the outage with the recovery.
    await asyncio.sleep(max(0.5, math.ceil(off) - off + 0.05))
    for _ in range(4):
        assert (await pay())["status"] == "approved"
    await client.close()  # flushes the transaction log

    expected_status = {"approved"} if backup else {"failed"}
    assert {d["status"] for d in during} == expected_status

    # Rotate by hand: everything up to the end of the outage goes into a gzipped rotated file.
    log = Path(config.log.dir) / config.log.file
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(sent)
    for raw in lines:
        assert schema_errors(orjson.loads(raw), SCHEMA) == []
    cut = len(sent) - 4
    rotated = log.with_name("transactions-20200101T000000000000.jsonl.gz")
    with gzip.open(rotated, "wb") as gz:
        gz.writelines(lines[:cut])
    log.write_bytes(b"".join(lines[cut:]))

    log_dir = str(config.log.dir)
    report = analyze([log_dir], bucket_s=1)
    assert sorted(report.meta["files"]) == sorted([str(rotated.resolve()), str(log.resolve())])
    assert report.summary["payments"] == len(sent)
    assert report.summary["unreadable_lines"] == 0

    head = report.headline
    assert head is not None, report.headline_text
    assert (head.provider, head.error_class, head.raw_code) == ("stripe", "unavailable", "connect_failed")
    assert floor_s(on) <= head.start < head.end <= floor_s(off) + dt.timedelta(seconds=1)
    assert utc(on) <= head.first_failure <= head.last_failure <= utc(off)
    assert head.failure_rate == 1.0
    window = format_window(head.start, head.end, 1)
    assert re.fullmatch(r"\d\d:\d\d:\d\d–\d\d:\d\d:\d\d", window)
    assert f"stripe: unavailable/connect_failed {window}" in report.headline_text
    if backup:
        assert head.payments["approved_elsewhere"] == 10
        assert report.failovers["saved_by_failover"] >= 1
        assert report.failovers["saved_by_failover"] + report.failovers["saved_by_reroute"] == 10
    else:
        assert head.payments["failed"] == 10
        assert {e["error_code"].split(":")[0] for e in report.errors} <= {"all_providers_unavailable",
                                                                          "no_provider_available"}

    failures = {(r["provider"], r["class"], r["raw_code"]): r for r in report.failures}
    assert failures[("stripe", "unavailable", "connect_failed")]["attempts"] >= 3
    assert [r for r in report.breaker_open if r["provider"] == "stripe"]
    for period in report.breaker_open:
        assert utc(on) <= period["first_seen"] <= period["last_seen"] <= utc(off)
    stripe_rates = {p["bucket"]: p["rate"] for p in report.approval["series"]["stripe"]}
    assert any(rate == 0.0 and head.start <= bucket < head.end for bucket, rate in stripe_rates.items())
    assert any(rate >= 0.5 and bucket < head.start for bucket, rate in stripe_rates.items())  # 4 of 5 approved
    assert report.declines[0]["code"] == "insufficient_funds"
    assert {r["provider"] for r in report.latency["attempts"]} == set(order)
    assert all(r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in report.latency["attempts"])

    # --json parses and says the same
    result = invoke("logs", "analyze", log_dir, "--bucket", "1s", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["headline"]["provider"] == "stripe"
    assert doc["headline"]["raw_code"] == "connect_failed"
    assert doc["headline_text"] == report.headline_text
    assert doc["summary"]["payments"] == len(sent)

    # --from after the outage: nothing failed there
    after = utc(off + 0.3).isoformat() + "Z"
    result = invoke("logs", "analyze", log_dir, "--bucket", "1s", "--json", "--from", after)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["headline"] is None

    # --html: self-contained, with the charts' data embedded as JSON
    page_path = tmp_path / "report.html"
    result = invoke("logs", "analyze", log_dir, "--bucket", "1s", "--html", str(page_path))
    assert result.exit_code == 0, result.output
    assert "stripe: unavailable/connect_failed" in result.stdout
    page = page_path.read_text()
    assert "http://" not in page and "https://" not in page
    assert "<script src" not in page and "<link" not in page
    assert page.count("<svg") >= 3
    embedded = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert embedded is not None
    data = json.loads(embedded.group(1))
    assert data["report"]["headline"]["provider"] == "stripe"
    assert data["charts"]["worst_window"]["raw_code"] == "connect_failed"
    window_start = data["charts"]["worst_window"]["start"]
    assert window_start == head.start.isoformat(timespec="microseconds") + "Z"
    approval = data["charts"]["chart-approval"]["series"]
    assert set(order) <= set(approval)
    start_epoch = head.start.replace(tzinfo=dt.timezone.utc).timestamp()
    end_epoch = head.end.replace(tzinfo=dt.timezone.utc).timestamp()
    assert any(rate == 0.0 and start_epoch <= t < end_epoch for t, rate in approval["stripe"])
    failure = data["charts"]["chart-failure"]["series"]["stripe"]
    assert any(rate == 1.0 and start_epoch <= t < end_epoch for t, rate in failure)
    assert data["charts"]["chart-breaker"]["periods"]

    # terminal tables
    result = invoke("logs", "analyze", log_dir, "--bucket", "1s")
    assert result.exit_code == 0, result.output
    assert "stripe: unavailable/connect_failed" in result.stdout
    assert "Breaker open periods" in result.stdout

    # ad-hoc SQL over the same views, gz file included
    sql = ("SELECT provider, count(*) AS n FROM attempts WHERE outcome = 'unavailable' "
           "AND raw_code = 'connect_failed' GROUP BY provider")
    result = invoke("logs", "query", sql, log_dir, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows == [{"provider": "stripe", "n": failures[("stripe", "unavailable", "connect_failed")]["attempts"]}]
    result = invoke("logs", "query", "SELECT count(*) AS n, count(DISTINCT file) AS files FROM transactions",
                    log_dir, "--json")
    assert json.loads(result.stdout) == [{"n": len(sent), "files": 2}]
    result = invoke("logs", "query", "SELECT event, count(*) FROM transactions GROUP BY 1", log_dir)
    assert result.exit_code == 0 and "payment" in result.stdout


# -- edge cases on hand-written lines in the real shape -----------------------------------------

T0 = 1764360000.0  # 2025-11-28 20:00:00 UTC


def attempt(provider: str, at: float, outcome: str, raw: str, *, op: str = "authorize", try_no: int = 1,
            state: str = "closed", reason: str | None = None, latency: float | None = 100.0) -> dict[str, Any]:
    return {"provider": provider, "try": try_no, "operation": op, "outcome": outcome, "raw_code": raw,
            "http_status": 200 if outcome == "approved" else None, "latency_ms": latency, "breaker_state": state,
            "failover_reason": reason, "started_at": at}


def line(event: str, pid: str, at: float, status: str, attempts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc = {
        "payment_id": pid, "client": "checkout", "merchant_reference": "order-1", "amount": 1299, "currency": "EUR",
        "country": None, "card_brand": "visa", "card_bin": "424242", "card_last4": "4242", "route": "default",
        "status": status, "provider": attempts[-1]["provider"] if attempts else None, "provider_reference": None,
        "outcome": None, "decline_code": None, "error_code": None, "attempts": attempts,
        "failovers": sum(1 for a in attempts if a["failover_reason"]),
        "retries": sum(1 for a in attempts if a["try"] > 1 and a["operation"] != "status"),
        "metadata": {}, "created_at": T0, "latency_ms": 12.5, "event": event,
        "ts": utc(at).isoformat(timespec="microseconds") + "Z",
    }
    doc.update(extra)
    return doc


@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    a1 = attempt("stripe", T0 + 1, "approved", "succeeded")
    cap = attempt("stripe", T0 + 30, "approved", "succeeded", op="capture")
    ref = attempt("stripe", T0 + 90, "approved", "succeeded", op="refund")
    unk = [attempt("stripe", T0 + 2, "unknown", "read_timeout"),
           attempt("stripe", T0 + 3, "unknown", "read_timeout", op="status")]
    settle = attempt("stripe", T0 + 20, "approved", "succeeded", op="status", try_no=0)
    crash = attempt("adyen", T0 + 4, "approved", "Authorised", op="status", try_no=0)
    lines = [
        line("payment", "pay_01", T0 + 1.1, "approved", [a1]),
        line("payment", "pay_02", T0 + 3.5, "pending", unk, error_code="read_timeout"),
        line("payment", "pay_03", T0 + 5, "pending", [dict(u) for u in unk], error_code="read_timeout"),
        line("payment", "pay_05", T0 + 6, "declined", [attempt("stripe", T0 + 6, "hard_decline", "stolen_card")],
             decline_code="stolen_card"),
        line("reconciliation", "pay_04", T0 + 8, "approved", [crash]),
        line("reconciliation", "pay_02", T0 + 21, "approved", [*unk, settle]),
        line("capture", "pay_01", T0 + 30.5, "captured", [a1, cap],
             follow_up={"operation": "capture", "amount": None, "outcome": "approved", "raw_code": "succeeded"}),
        line("refund", "pay_01", T0 + 90.5, "refunded", [a1, cap, ref],
             follow_up={"operation": "refund", "amount": 500, "outcome": "approved", "raw_code": "succeeded"}),
    ]
    for doc in lines:
        assert schema_errors(doc, SCHEMA) == []
    logs = tmp_path / "logs"
    logs.mkdir()
    rotated = b"".join(orjson.dumps(d) + b"\n" for d in lines[:4]) + b'{"payment_id": "pay_06", "amo\n'
    (logs / "transactions-20251128T200010000000.jsonl.gz").write_bytes(gzip.compress(rotated))
    (logs / "transactions.jsonl").write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in lines[4:]))
    (logs / "transactions-20251128T200020000000.jsonl.gz.tmp").write_bytes(b"half a gzip")
    (logs / "notes.txt").write_text("not a log")
    return logs


def test_attempts_are_counted_once_and_pending_payments_resolve(handmade: Path) -> None:
    con, files = open_log([handmade])
    assert [f.name for f in files] == ["transactions-20251128T200010000000.jsonl.gz", "transactions.jsonl"]
    per_payment = dict(con.execute("SELECT payment_id, count(*) FROM attempts GROUP BY 1").fetchall())
    assert per_payment == {"pay_01": 3, "pay_02": 3, "pay_03": 2, "pay_04": 1, "pay_05": 1}
    ops = con.execute("SELECT operation, logged_in FROM attempts WHERE payment_id = 'pay_01' "
                      "ORDER BY attempt_no").fetchall()
    assert ops == [("authorize", "payment"), ("capture", "capture"), ("refund", "refund")]
    final = dict(con.execute("SELECT payment_id, final_status FROM payments").fetchall())
    assert final == {"pay_01": "refunded", "pay_02": "approved", "pay_03": "pending", "pay_04": "approved",
                     "pay_05": "declined"}

    report = analyze([handmade], bucket_s=60)
    assert report.summary["unreadable_lines"] == 1
    assert report.summary["lines"] == 8
    assert report.summary["payments"] == 5
    pending = report.pending
    assert pending["payments"] == 3
    assert pending["unresolved"] == 1
    assert pending["recovered_after_crash"] == 1
    assert pending["by_resolution"] == {"approved": 2, "unresolved": 1}
    settled = next(r for r in pending["list"] if r["payment_id"] == "pay_02")
    assert settled["resolved_after_s"] == pytest.approx(17.5)
    assert report.declines == [{"code": "stolen_card", "class": "hard_decline", "attempts": 1, "payments": 1,
                                "by_provider": {"stripe": 1}}]
    # unknown answers are failures of the provider: the headline names them
    assert report.headline is not None
    assert (report.headline.provider, report.headline.error_class, report.headline.raw_code) == \
        ("stripe", "unknown", "read_timeout")
    assert "stripe: unknown/read_timeout 20:00–20:01" in report.headline_text


def test_time_range_limits_every_view(handmade: Path) -> None:
    rng = TimeRange(utc(T0 + 10), utc(T0 + 60))
    con, _ = open_log([handmade], time_range=rng)
    assert con.execute("SELECT count(*) FROM transactions").fetchone() == (2,)
    assert con.execute("SELECT count(*) FROM attempts").fetchone() == (2,)  # settle + capture
    report = analyze([handmade], time_range=rng)
    assert report.summary["lines"] == 2
    assert report.headline is None


def test_headline_ignores_breaker_refusals_when_a_cause_is_known(tmp_path: Path) -> None:
    docs = []
    for i in range(40):
        at = T0 + i
        if i < 3:
            tries = [attempt("stripe", at, "unavailable", "tls_handshake_failed")]
        else:
            tries = [attempt("stripe", at, "skipped", "breaker_open", try_no=0, state="open", latency=None)]
        tries.append(attempt("adyen", at + 0.1, "approved", "Authorised", reason="unavailable:tls_handshake_failed"
                             if i < 3 else None))
        docs.append(line("payment", f"pay_{i:04x}", at + 0.2, "approved", tries))
    path = tmp_path / "transactions.jsonl"
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    report = analyze([path])
    assert report.headline is not None
    assert (report.headline.error_class, report.headline.raw_code) == ("unavailable", "tls_handshake_failed")
    assert report.failovers["saved_by_failover"] == 3
    assert report.failovers["saved_by_reroute"] == 37
    assert report.breaker_open[0]["refused"] == 37


def test_paths_and_errors(tmp_path: Path, handmade: Path) -> None:
    assert len(resolve_paths([str(handmade / "transactions*.jsonl*")])) == 2
    assert len(resolve_paths([handmade / "transactions.jsonl", handmade])) == 2
    with pytest.raises(LogFilesNotFound):
        resolve_paths([tmp_path / "nope"])
    with pytest.raises(LogFilesNotFound):
        resolve_paths([str(tmp_path / "nothing*.jsonl")])

    result = invoke("logs", "analyze", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "error:" in result.output
    result = invoke("logs", "analyze", str(handmade), "--from", "yesterday")
    assert result.exit_code == 2
    result = invoke("logs", "analyze", str(handmade), "--bucket", "7w")
    assert result.exit_code == 2
    result = invoke("logs", "query", "SELECT nope FROM attempts", str(handmade))
    assert result.exit_code == 1
    assert "query failed" in result.output


def test_parse_time_and_bucket() -> None:
    now = dt.datetime(2025, 11, 28, 23, 0, tzinfo=dt.timezone.utc)
    assert parse_time("20:00", now=now) == dt.datetime(2025, 11, 28, 20, 0)
    assert parse_time("20:05:30", now=now) == dt.datetime(2025, 11, 28, 20, 5, 30)
    assert parse_time("2025-11-28T20:00Z") == dt.datetime(2025, 11, 28, 20, 0)
    assert parse_time("2025-11-28T21:00:00+01:00") == dt.datetime(2025, 11, 28, 20, 0)
    assert parse_time("2025-11-28 20:00") == dt.datetime(2025, 11, 28, 20, 0)
    for bad in ("yesterday", "25:00", "2025-13-01"):
        with pytest.raises(ValueError):
            parse_time(bad, now=now)
    assert [parse_bucket(b) for b in ("1m", "30s", "5m", "1h", "90", "1d")] == [60, 30, 300, 3600, 90, 86400]
    for bad in ("0s", "2d", "1w", "m"):
        with pytest.raises(ValueError):
            parse_bucket(bad)
    assert format_window(dt.datetime(2025, 11, 28, 20, 0), dt.datetime(2025, 11, 28, 20, 5), 60) == "20:00–20:05"
