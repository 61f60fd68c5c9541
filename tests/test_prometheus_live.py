"""The alert rules and the dashboard in a real Prometheus, scraping a real gateway during a real
`primary-outage` drill.

Debian's `prometheus` (`.ci/services` installs it; its own service is not used) runs on a free
loopback port with temporary storage, scraping the drill's gateway every second and evaluating
deploy/prometheus/alerts.yml every second. It is started through the drill's own hook, right
after its gateway is up and before the outage is injected. The drill's load then keeps going, a
few payments at a time, while the test polls Prometheus's `/api/v1/alerts` (bounded) until
`GatewayBreakerOpen` fires for the primary: Prometheus saw stripe's breaker not closed for the
rule's full minute. Still inside the outage, every panel query of deploy/grafana/gateway.json
(its variables substituted as Grafana would) runs against Prometheus and must return data.

With PROMETHEUS_SCREENSHOTS=docs, Debian's headless chromium photographs Prometheus's alerts
page and graphs of the dashboard's breaker, approval and failover queries at that moment
(docs/prometheus-alerts.png, docs/prometheus-graphs.png: that is how README's are made).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml

from gateway.app_keys import POOL
from gateway.drill import DrillOptions, run_drill
from gateway.drill import runner as drill_runner
from gateway.drill.process import free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"
HOST = "127.0.0.1"
PRIMARY = "stripe"
READY_WAIT_S = 60.0  # Prometheus start-up on a loaded machine
ALERT_WAIT_S = 180.0  # the rule's `for: 1m`, plus scrape and evaluation, on a loaded machine
CHUNK = 4  # payments per round of load between two looks at the alerts
LOOK_EVERY_S = 0.5  # between two looks: Prometheus scrapes and evaluates every second
# Grafana's substitutions for the dashboard's variables: every job, a rate window of a minute.
VARIABLES = {"$job": ".+", "$__rate_interval": "1m"}
SCREENSHOTS = os.environ.get("PROMETHEUS_SCREENSHOTS")  # a directory to keep them in (docs)
GRAPHED = ("Breaker state per provider", "Approval rate per provider", "Failovers per second")


@dataclass
class Prometheus:
    url: str
    session: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in (await self.api("alerts"))["alerts"] if a["labels"]["alertname"] == name]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])


async def start_prometheus(stack: AsyncExitStack, workdir: Path, target: str) -> Prometheus:
    """A Prometheus of our own on a free loopback port; stopped (by its pid) when `stack` unwinds."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run .ci/services as root (it installs Debian's prometheus)")
    port = free_port(HOST)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [target]}]}],
    }
    await asyncio.to_thread((workdir / "prometheus.yml").write_text, yaml.safe_dump(config))
    log = await asyncio.to_thread((workdir / "prometheus.log").open, "wb")
    stack.callback(log.close)
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={HOST}:{port}", "--storage.tsdb.retention.time=1h",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    stack.push_async_callback(_stop, proc)
    session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))
    prometheus = Prometheus(f"http://{HOST}:{port}", session)
    until = time.monotonic() + READY_WAIT_S
    while True:  # a bounded poll of its readiness endpoint
        if proc.returncode is not None:
            raise AssertionError(f"prometheus exited: {await _tail(workdir / 'prometheus.log')}")
        try:
            async with session.get(f"{prometheus.url}/-/ready") as response:
                if response.status == 200:
                    return prometheus
        except aiohttp.ClientError:
            pass
        if time.monotonic() > until:
            raise AssertionError(f"prometheus not ready in {READY_WAIT_S} s: {await _tail(workdir / 'prometheus.log')}")
        await asyncio.sleep(0.1)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _tail(path: Path) -> str:
    text = await asyncio.to_thread(path.read_text, errors="replace")
    return "\n".join(text.splitlines()[-20:])


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every target of every panel, variables substituted."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not substitute: {expr}"
            out.append((panel["title"], expr))
    return out


async def screenshot(url: str, path: Path, height: int) -> None:
    chromium = shutil.which("chromium")
    assert chromium is not None, "PROMETHEUS_SCREENSHOTS needs Debian's chromium"
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size=1400,{height}",
        "--virtual-time-budget=5000", f"--screenshot={path}", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await asyncio.wait_for(proc.wait(), 60) == 0


def graphs_url(base: str, queries: list[tuple[str, str]]) -> str:
    params: dict[str, str] = {}
    for n, (_title, expr) in enumerate(q for q in queries if q[0] in GRAPHED):
        params.update({f"g{n}.expr": expr, f"g{n}.tab": "0", f"g{n}.range_input": "2m"})
    return f"{base}/classic/graph?{urlencode(params)}"  # Debian's build serves the classic UI


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


async def test_breaker_alert_fires_in_a_real_prometheus_during_a_primary_outage_drill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queries = panel_queries()  # read before the loop runs (blocking file I/O)
    start_gateway = drill_runner.start_gateway_in_process
    send_all = drill_runner._send_all
    seen: dict[str, Any] = {}

    async with AsyncExitStack() as stack:
        async def with_prometheus(*args: Any, **kwargs: Any) -> Any:
            gateway = await start_gateway(*args, **kwargs)
            seen["app"] = gateway.app
            seen["prometheus"] = await start_prometheus(stack, tmp_path, gateway.url.removeprefix("http://"))
            seen["before_outage"] = await seen["prometheus"].alerts("GatewayBreakerOpen")
            return gateway

        async def load_until_the_alert_fires(base_url: str, client_key: str, plan: list[Any], concurrency: int,
                                             max_seconds: float, on_progress: Any) -> list[Any]:
            prometheus: Prometheus = seen["prometheus"]
            sends: list[Any] = []
            until = time.monotonic() + ALERT_WAIT_S
            while True:  # load a few payments, look at the alerts; bounded in time and count
                chunk = plan[len(sends):len(sends) + CHUNK]
                assert chunk, "the plan ran out before the alert fired"
                sends += await send_all(base_url, client_key, chunk, concurrency, max_seconds, on_progress)
                alerts = await prometheus.alerts("GatewayBreakerOpen")
                firing = [a for a in alerts if a["state"] == "firing"]
                if firing:
                    seen["firing"], seen["fired_at"] = firing, time.time()
                    break
                if time.monotonic() > until:
                    raise AssertionError(f"GatewayBreakerOpen did not fire within {ALERT_WAIT_S} s: {alerts}")
                await asyncio.sleep(LOOK_EVERY_S)
            seen["breaker"] = seen["app"][POOL][PRIMARY].breaker.state
            seen["panels"] = [(title, expr, await prometheus.query(expr)) for title, expr in queries]
            seen["other_breakers"] = await prometheus.query('max by (provider) (gateway_breaker_state{provider!="%s"})'
                                                            % PRIMARY)
            if SCREENSHOTS:
                await screenshot(f"{prometheus.url}/classic/alerts", Path(SCREENSHOTS) / "prometheus-alerts.png", 1350)
                await screenshot(graphs_url(prometheus.url, queries), Path(SCREENSHOTS) / "prometheus-graphs.png", 2200)
            return sends

        monkeypatch.setattr(drill_runner, "start_gateway_in_process", with_prometheus)
        monkeypatch.setattr(drill_runner, "_send_all", load_until_the_alert_fires)
        report = await run_drill("primary-outage", DrillOptions(payments=5_000, concurrency=2, max_seconds=60,
                                                                log_dir=tmp_path / "drill", seed=20241201))

    assert seen["before_outage"] == []
    [alert] = seen["firing"]
    assert alert["labels"] == {"alertname": "GatewayBreakerOpen", "provider": PRIMARY, "severity": "warning"}
    assert "gateway preflight --json" in alert["annotations"]["runbook"]
    active_at = _epoch(alert["activeAt"])
    assert seen["fired_at"] - active_at >= 60, "fired before the breaker had been open for the rule's minute"
    assert seen["breaker"] in {"open", "half-open"}
    assert all(v == 0 for v in values(seen["other_breakers"])) and len(seen["other_breakers"]) == 2

    for title, expr, result in seen["panels"]:
        finite = [v for v in values(result) if math.isfinite(v)]
        assert finite, f"panel {title!r}: no data for {expr}"
    by_title = {title: result for title, _expr, result in seen["panels"]}
    approval = {s["metric"]["provider"]: float(s["value"][1]) for s in by_title["Approval rate per provider"]}
    assert approval["adyen"] == 1.0 and not approval.get(PRIMARY, 0.0) > 0  # 0, or NaN: no call let through
    breakers = {s["metric"]["provider"]: float(s["value"][1]) for s in by_title["Breaker state per provider"]}
    assert breakers[PRIMARY] >= 1 and breakers["adyen"] == 0
    assert min(values(by_title["Certificate days left"])) > 7

    s = report.summary
    assert s["duplicates"] == 0 and s["lost"] == 0 and s["journal_mismatches"] == 0
    assert s["failovers"] > 0 and s["approved"] == s["sent"] and report.ok, s


def _epoch(rfc3339: str) -> float:
    """Prometheus's timestamps carry nanoseconds; Python's parser takes microseconds."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", rfc3339).replace("Z", "+00:00")).timestamp()
