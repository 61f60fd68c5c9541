"""deploy/prometheus/: the alert rules are valid, their unit tests pass, and they speak of the
gateway as it is.

`promtool` (Debian's `prometheus` package; `.ci/services` installs it) checks the rules and the
example scrape configuration, and runs `alerts_test.yml`, where every alert has a case in which
it fires (labels and expanded annotations compared) and one in which it does not. Beyond
promtool: every metric a rule or a dashboard panel reads is one the gateway exports and README
lists, and every runbook's commands parse as real `gateway` commands with real options. The
dashboard is checked for the shape Grafana imports: its data source a variable every panel and
query uses, unique ids, panels on the 24-column grid without overlap, core panel types.
`tests/test_prometheus_live.py` runs the rules and the dashboard in a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from gateway.certs.watcher import CertificateGauges
from gateway.cli import app as cli_app
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"

METRIC = re.compile(r"\b(gateway_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_count", "_sum", "_created")
GRID_COLUMNS = 24
CORE_PANELS = {"timeseries", "state-timeline", "bargauge", "stat", "gauge", "table"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run .ci/services as root (it installs Debian's prometheus)")
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def exported_metrics() -> set[str]:
    """Every name a gateway's /metrics can show, from the real registry with everything tracked."""
    metrics = Metrics()
    metrics.track_transaction_log(write_errors=lambda: 0, refused=lambda: 0, backlog=lambda: 0, healthy=lambda: True)
    CertificateGauges.on(metrics.registry)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def base_name(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in doc["panels"] for target in panel.get("targets", [])]


def test_rules_and_scrape_config_pass_promtool_check() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_rule_unit_tests_pass() -> None:
    run = promtool("test", "rules", "alerts_test.yml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [case for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
             for case in test["alert_rule_test"]]
    for rule in rules():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no case where it does not fire"


def test_every_alert_has_a_severity_a_summary_and_a_runbook() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]
        assert "`gateway " in rule["annotations"]["runbook"], f"{rule['alert']}: the runbook names no command"


def test_runbook_commands_parse_as_gateway_commands() -> None:
    """Every backticked `gateway …` in a runbook, as Prometheus renders it (the expanded
    annotations of alerts_test.yml), parses against the real CLI: command, options, arguments."""
    root = typer.main.get_command(cli_app)
    rendered = [alert["exp_annotations"]["runbook"]
                for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
                for case in test["alert_rule_test"] for alert in case["exp_alerts"]]
    commands = {cmd for runbook in rendered for cmd in re.findall(r"`(gateway [^`]+)`", runbook)}
    assert len(commands) > 10
    for command in sorted(commands):
        words = shlex.split(command)[1:]
        node: Any = root
        while hasattr(node, "commands"):  # a group: descend (typer vendors click, so no isinstance)
            assert words and words[0] in node.commands, f"{command}: no such command"
            node, words = node.commands[words[0]], words[1:]
        node.make_context(node.name or "gateway", list(words))  # raises a UsageError on a bad option or argument


def test_rules_and_dashboard_read_only_metrics_the_gateway_exports() -> None:
    exported = exported_metrics()
    used = {base_name(m) for rule in rules() for m in METRIC.findall(rule["expr"])}
    used |= {base_name(m) for expr in dashboard_queries() for m in METRIC.findall(expr)}
    unknown = used - exported
    assert not unknown, f"not exported by the gateway: {sorted(unknown)}"


def test_readme_lists_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(gateway_[a-z0-9_]+)` \|", readme, re.M))
    assert listed == exported_metrics()


def test_dashboard_is_a_grafana_model_with_the_datasource_as_a_variable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in CORE_PANELS, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), panel["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"].strip() for t in targets), panel["title"]
