"""The console in a real headless browser: Debian's chromium and chromium-driver, driven by
Selenium, against the real gateway on 127.0.0.1 with the real emulators.

1. During a real `primary-outage` drill (`run_drill`, with an admin client added to the drill's
   configuration): the page loads, shows the three providers, and shows stripe's breaker open
   within two seconds of the breaker opening. A screenshot is taken during the drill; set
   CONSOLE_SCREENSHOT=docs/console.png to keep it (that is how docs/console.png is made).
2. An operator action through the page: the confirmation dialog (cancel does nothing, confirm
   forces the breaker open), the page reflecting it, and the audit line.

`make test` installs the browser where it is missing; run directly without it, these skip.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.app_keys import POOL
from gateway.app import build_app
from gateway.config import GatewayConfig
from gateway.drill import DrillOptions, run_drill
from gateway.drill import runner as drill_runner
from gateway.txlog import build_ops_logger

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (make test installs them)")

ADMIN_KEY = "browser-admin-key-0123456789"
ADMIN_ENV = "GATEWAY_CONSOLE_TEST_ADMIN_KEY"
PROVIDERS = ["stripe", "adyen", "checkout"]
REFLECT_S = 2.0  # the page must show a breaker change within this long
SCREENSHOT = os.environ.get("CONSOLE_SCREENSHOT")  # keep the drill screenshot here (docs/console.png)


class ConsolePage:
    """Blocking Selenium calls: run them in a thread (asyncio.to_thread), never on the loop
    that serves the gateway."""

    def __init__(self, driver: Any, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def sign_in(self, key: str) -> None:
        d = self.driver
        d.get(f"{self.base_url}/console")
        d.find_element(By.ID, "key").send_keys(key)
        d.find_element(By.ID, "sign-in").click()
        WebDriverWait(d, 10, poll_frequency=0.05).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.provider")) == len(PROVIDERS)
            and d.find_element(By.ID, "connection").text == "live")

    def providers(self) -> list[str]:
        cards = self.driver.find_elements(By.CSS_SELECTOR, "article.provider")
        return [e.get_attribute("data-provider") for e in cards]

    def breaker_state(self, provider: str) -> str:
        return self.driver.find_element(
            By.CSS_SELECTOR, f'article[data-provider="{provider}"] [data-field="breaker-state"]').text

    def wait_breaker(self, provider: str, state: str, timeout: float = REFLECT_S) -> float:
        """Seconds until the page shows `state` (TimeoutException past `timeout`)."""
        started = time.monotonic()
        WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _d: self.breaker_state(provider) == state)
        return time.monotonic() - started

    def field(self, provider: str, name: str) -> str:
        return self.driver.find_element(
            By.CSS_SELECTOR, f'article[data-provider="{provider}"] [data-field="{name}"]').text

    def script_errors(self) -> list[str]:
        """Script errors and console.error lines (not network answers such as the sign-in 401)."""
        return [e["message"] for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE" and e.get("source") != "network"]


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    profile = Path(tempfile.mkdtemp(prefix="console-chromium-", dir=tmp_path))
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1440,1080"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


# -- 1. during a real primary-outage drill ------------------------------------------------------


async def test_console_shows_the_primary_outage_drill_live(driver: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_ENV, ADMIN_KEY)
    build_config = drill_runner.build_config
    start_gateway = drill_runner.start_gateway_in_process

    def with_admin(data: dict[str, Any], *args: Any, **kwargs: Any) -> GatewayConfig:
        data["auth"]["clients"].append({"name": "ops", "key_env": ADMIN_ENV, "permissions": ["admin"]})
        return build_config(data, *args, **kwargs)

    seen: dict[str, Any] = {}
    opened = threading.Event()
    watching: list[asyncio.Task[None]] = []

    def on_breaker(provider: str, _old: str, new: str) -> None:
        if new == "open" and not opened.is_set():
            seen["opened_at"] = time.monotonic()
            opened.set()

    def watch(page: ConsolePage) -> None:
        """In the browser's thread while the drill's load runs."""
        if not opened.wait(timeout=30):
            raise AssertionError("stripe's breaker never opened")
        seen["reflected_s"] = page.wait_breaker("stripe", "open")
        seen["adyen_state"] = page.breaker_state("adyen")
        time.sleep(4.0 if SCREENSHOT else 1.0)  # let the window fill with the outage's traffic
        seen["approval_adyen"] = page.field("adyen", "approval-rate")
        WebDriverWait(page.driver, REFLECT_S, poll_frequency=0.05).until(  # not mid half-open trial
            lambda _d: page.field("stripe", "unusable-reason") == "routed around: breaker_open")
        target = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "console.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        assert page.driver.save_screenshot(str(target))
        seen["screenshot"] = target
        seen["errors"] = page.script_errors()

    async def start_with_console(*args: Any, **kwargs: Any) -> Any:
        gateway = await start_gateway(*args, **kwargs)
        page = ConsolePage(driver, gateway.url)
        await asyncio.to_thread(page.sign_in, ADMIN_KEY)  # before any fault is injected
        seen["providers"] = await asyncio.to_thread(page.providers)
        seen["initial"] = [await asyncio.to_thread(page.breaker_state, p) for p in PROVIDERS]
        gateway.app[POOL]["stripe"].breaker.listeners.append(on_breaker)
        watching.append(asyncio.create_task(asyncio.to_thread(watch, page)))
        return gateway

    monkeypatch.setattr(drill_runner, "build_config", with_admin)
    monkeypatch.setattr(drill_runner, "start_gateway_in_process", start_with_console)

    load_s = 9.0 if SCREENSHOT else 5.0  # the load phase (capped by time) outlasts the watch
    report = await run_drill("primary-outage", DrillOptions(payments=100_000, concurrency=4, max_seconds=load_s,
                                                             log_dir=tmp_path / "drill", seed=20240601))
    assert watching, "the drill started its gateway through the hook"
    await watching[0]

    assert seen["providers"] == PROVIDERS
    assert seen["initial"] == ["closed", "closed", "closed"]
    assert seen["reflected_s"] < REFLECT_S
    assert seen["adyen_state"] == "closed"
    assert seen["approval_adyen"] == "100%"
    assert seen["errors"] == [], seen["errors"]
    assert seen["screenshot"].stat().st_size > 20_000
    s = report.summary
    assert s["duplicates"] == 0 and s["lost"] == 0
    assert s["sent"] > 100 and s["approved"] == s["sent"] and s["failovers"] > 0


# -- 2. an operator action through the page ------------------------------------------------------


def _confirm_dialog(driver: Any, provider: str, button: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'article[data-provider="{provider}"] button[data-action="open"]').click()
    WebDriverWait(driver, 2, poll_frequency=0.05).until(
        lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
    assert provider in driver.find_element(By.ID, "confirm-text").text
    driver.find_element(By.ID, button).click()
    WebDriverWait(driver, 2, poll_frequency=0.05).until(
        lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is None)


async def test_force_open_from_the_page_needs_confirmation_and_is_audited(
        driver: Any, make_config: Callable[..., GatewayConfig], aiohttp_server: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_ENV, ADMIN_KEY)
    config = make_config(auth={"clients": [{"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"},
                                           {"name": "ops", "key_env": ADMIN_ENV, "permissions": ["admin"]}]})
    ops = io.StringIO()
    app: web.Application = build_app(config, ops_log=build_ops_logger(ops), reconcile_interval_s=3600)
    server = await aiohttp_server(app, host="127.0.0.1")
    page = ConsolePage(driver, f"http://127.0.0.1:{server.port}")
    await asyncio.to_thread(page.sign_in, ADMIN_KEY)
    breaker = app[POOL]["checkout"].breaker

    await asyncio.to_thread(_confirm_dialog, driver, "checkout", "confirm-cancel")
    await asyncio.sleep(0.3)
    assert breaker.state == "closed", "cancel does nothing"

    await asyncio.to_thread(_confirm_dialog, driver, "checkout", "confirm-ok")
    elapsed = await asyncio.to_thread(page.wait_breaker, "checkout", "open")
    assert breaker.state == "open" and elapsed < REFLECT_S
    audit = [orjson.loads(line) for line in ops.getvalue().splitlines() if '"console_action"' in line]
    assert [(a["actor"], a["action"], a["provider"], a["auth"]) for a in audit] == [
        ("ops", "breaker_force_open", "checkout", "session")]
    with pytest.raises(TimeoutException):  # the others are untouched
        await asyncio.to_thread(page.wait_breaker, "stripe", "open", 0.3)
    assert await asyncio.to_thread(page.script_errors) == []
