"""The live console over HTTP: admin-only access, the session cookie, the event stream's
snapshots (real gateway, real emulators over mTLS), the operator actions with confirmation and
their audit lines; plus the sliding window and the session signer on their own."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from gateway.http.auth import Caller
from gateway.app_keys import CONSOLE, POOL
from gateway.app import build_app
from gateway.config import AuthConfig, GatewayConfig
from gateway.console import COOKIE, ConsoleStats, SessionSigner
from gateway.console.host import HostFigures
from gateway.console.stats import GATEWAY, latency_bin, percentile
from gateway.journal.records import Attempt, PaymentRecord
from domain.outcome import PaymentStatus
from gateway.txlog import build_ops_logger
from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from tests.conftest import AUTH, CHECKOUT_KEY, READER_KEY, card_payment

ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROVIDERS = {"stripe", "adyen", "checkout"}


def clients_with_admin() -> dict[str, Any]:
    return {"clients": [
        {"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"},
        {"name": "reporting", "key_env": "GATEWAY_KEY_REPORTING", "permissions": ["payments:read"]},
        {"name": "ops", "key_env": "GATEWAY_KEY_ADMIN", "permissions": ["admin"]},
    ]}


@pytest.fixture(autouse=True)
def _admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KEY_ADMIN", ADMIN_KEY)


class Gateway:
    def __init__(self, client: TestClient, ops: io.StringIO) -> None:
        self.client = client
        self.ops = ops

    @property
    def app(self) -> web.Application:
        return self.client.server.app  # type: ignore[return-value]

    def ops_events(self, event: str) -> list[dict[str, Any]]:
        lines = [orjson.loads(line) for line in self.ops.getvalue().splitlines() if line.strip()]
        return [line for line in lines if line.get("event") == event]


@pytest.fixture
async def gateway(make_config: Callable[..., GatewayConfig],
                  aiohttp_client: Callable[..., Any]) -> AsyncIterator[Gateway]:
    ops = io.StringIO()
    app = build_app(make_config(auth=clients_with_admin()), ops_log=build_ops_logger(ops), reconcile_interval_s=3600)
    yield Gateway(await aiohttp_client(app), ops)


async def pay(gw: Gateway, n: int = 1, card: str = "4242424242424242") -> list[dict[str, Any]]:
    answers = []
    for i in range(n):
        async with gw.client.post("/v1/payments", json=card_payment(card, merchant_reference=f"order-{i}"),
                                  headers={**AUTH, "Idempotency-Key": str(uuid.uuid4())}) as r:
            answers.append(await r.json())
    return answers


async def next_event(response: ClientResponse, name: str = "snapshot", timeout: float = 5.0) -> dict[str, Any]:
    """The data of the next `name` event on a text/event-stream response."""

    async def read() -> dict[str, Any]:
        event, data = None, b""
        while True:
            line = await response.content.readline()
            assert line, "the stream ended"
            line = line.rstrip(b"\r\n")
            if not line:
                if event == name:
                    return orjson.loads(data)  # type: ignore[no-any-return]
                event, data = None, b""
            elif line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                data += line[6:]

    return await asyncio.wait_for(read(), timeout)


def by_name(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in snapshot["providers"]}


# -- access ------------------------------------------------------------------------------------


async def test_console_is_closed_without_an_admin_key(gateway: Gateway) -> None:
    c = gateway.client
    async with c.get("/console") as r:  # a browser without a session gets the sign-in form
        assert r.status == 401
        assert r.content_type == "text/html"
        page = await r.text()
        assert 'action="/console/login"' in page and "console.js" not in page
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    for method, path in (("GET", "/console/events"), ("POST", "/console/actions/breaker"),
                         ("POST", "/console/actions/reconcile")):
        async with c.request(method, path, json={"provider": "stripe", "state": "open", "confirm": True}) as r:
            assert r.status == 401, path
            assert (await r.json())["code"] == "unauthenticated"
        for key in (CHECKOUT_KEY, READER_KEY):  # valid API keys without the admin permission
            async with c.request(method, path, headers={"Authorization": f"Bearer {key}"},
                                 json={"provider": "stripe", "state": "open", "confirm": True}) as r:
                assert r.status == 403, (path, key)
                assert (await r.json())["code"] == "forbidden"
        async with c.request(method, path, headers={"Authorization": "Bearer not-a-key"}) as r:
            assert r.status == 401
    async with c.get("/console", headers={"Authorization": f"Bearer {CHECKOUT_KEY}"}) as r:
        assert r.status == 403
    # A forged or tampered cookie is no session.
    signer = gateway.app[CONSOLE].sessions
    good = signer.issue(Caller("ops", frozenset({"admin"})))
    _name, expires, sig = good.split(".")
    for bad in (f"ops.{int(expires) + 3600}.{sig}", f"checkout.{expires}.{sig}", "ops.9999999999.AAAA", "garbage"):
        async with c.get("/console/events", cookies={COOKIE: bad}) as r:
            assert r.status == 401, bad
    assert gateway.app[POOL]["stripe"].breaker.state == "closed"


async def test_sign_in_exchanges_the_key_for_a_strict_httponly_cookie(gateway: Gateway) -> None:
    c = gateway.client
    async with c.post("/console/login", data={"key": CHECKOUT_KEY}, allow_redirects=False) as r:
        assert r.status == 401 and "not an API key with the admin permission" in await r.text()
        assert COOKIE not in r.cookies
    async with c.post("/console/login", data={"key": ADMIN_KEY}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/console"
        morsel = r.cookies[COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/console"
        assert ADMIN_KEY not in morsel.value
    async with c.get("/console", cookies={COOKIE: morsel.value}) as r:
        assert r.status == 200
        page = await r.text()
        assert "/console/static/console.js" in page and "<script>" not in page  # no inline script (CSP)
        assert r.headers["Cache-Control"] == "no-store"
    for asset in ("console.js", "console.css"):
        async with c.get(f"/console/static/{asset}") as r:
            assert r.status == 200 and len(await r.read()) > 1000
    async with c.get("/console/static/..%2Fstats.py") as r:
        assert r.status == 404
    assert [e["actor"] for e in gateway.ops_events("console_login")] == ["ops"]
    assert len(gateway.ops_events("console_login_refused")) == 1
    assert ADMIN_KEY not in gateway.ops.getvalue() and CHECKOUT_KEY not in gateway.ops.getvalue()


def _admin_clients() -> Any:
    return AuthConfig.model_validate({"clients": [
        {"name": "ops", "key_env": "GATEWAY_KEY_ADMIN", "permissions": ["admin"]},
        {"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"},
    ]}).clients


def test_session_cookie_is_bound_to_the_key_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = Caller("ops", frozenset({"admin"}))
    now = [1_000_000.0]
    signer = SessionSigner(_admin_clients(), ttl_s=60, clock=lambda: now[0])
    assert signer.admin_for_key(ADMIN_KEY) == ops
    assert signer.admin_for_key(CHECKOUT_KEY) is None  # a valid key, but not an admin's
    cookie = signer.issue(ops)
    assert signer.verify(cookie) == ops
    now[0] += 61
    assert signer.verify(cookie) is None  # expired
    now[0] -= 61
    monkeypatch.setenv("GATEWAY_KEY_ADMIN", "rotated-admin-key")  # rotating the key ends its sessions
    assert SessionSigner(_admin_clients(), clock=lambda: now[0]).verify(cookie) is None


# -- the stream ----------------------------------------------------------------------------------


async def test_event_stream_yields_snapshots_of_the_three_providers(gateway: Gateway) -> None:
    await pay(gateway, 3)
    async with gateway.client.get("/console/events", headers=ADMIN) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert (await next_event(r, "hello"))["actor"] == "ops"
        snap = await next_event(r)
        started = time.monotonic()
        again = await next_event(r)
        assert 0.5 < time.monotonic() - started < 2.0, "about one snapshot a second"
    providers = by_name(snap)
    assert set(providers) == PROVIDERS
    assert [p["name"] for p in snap["providers"]] == ["stripe", "adyen", "checkout"]  # route order
    stripe = providers["stripe"]
    assert stripe["breaker"]["state"] == "closed" and stripe["usable"]
    assert stripe["stats"]["payments"] == 3 and stripe["stats"]["approval_rate"] == 1.0
    p50, p99 = stripe["stats"]["latency_p50_ms"], stripe["stats"]["latency_p99_ms"]
    assert 0 < p50 <= p99
    assert stripe["bulkhead"]["active"] == 0 and stripe["bulkhead"]["max_concurrent"] > 0
    assert providers["adyen"]["stats"]["payments"] == 0 and providers["adyen"]["stats"]["approval_rate"] is None
    g = snap["gateway"]
    assert g["payments"] == 3 and g["approval_rate"] == 1.0 and g["unresolved"] == 0 and g["in_flight"] == 0
    assert g["retry_budget_left"] > 0
    assert snap["certificates"], "the watcher's reports"
    cert = snap["certificates"][0]
    assert {"provider", "kind", "days_left", "status"} <= cert.keys() and cert["days_left"] > 0
    assert snap["failures"] == [] and again["ts"] > snap["ts"]
    assert snap["host"] == {"workers": 1, "reporting": 1, "missing": []}  # one process: the host is itself


async def test_snapshot_shows_failovers_and_classified_failures(gateway: Gateway,
                                                                 emulators: dict[str, EmulatorServer]) -> None:
    await emulators["stripe"].set_outage(True)
    answers = await pay(gateway, 4)
    assert all(a["status"] == "approved" and a["provider"] == "adyen" for a in answers)
    snap = orjson.loads(await gateway.app[CONSOLE].snapshot())
    providers = by_name(snap)
    stripe, adyen = providers["stripe"]["stats"], providers["adyen"]["stats"]
    assert stripe["approval_rate"] == 0.0 and stripe["payments"] >= 1
    # Each payment either failed over from stripe or, once its breaker opened, routed around it.
    assert stripe["failovers_per_min"] >= 1 and stripe["failovers_per_min"] + stripe["skipped_per_min"] == 4
    assert adyen["approval_rate"] == 1.0 and adyen["payments"] == 4
    assert snap["gateway"]["failovers_per_min"] >= 1
    failure = snap["failures"][0]
    assert failure["provider"] == "stripe" and failure["outcome"] == "unavailable" and failure["code"]
    assert failure["payment_status"] == "approved"  # it failed over and was approved


async def test_breaker_action_needs_confirmation_changes_the_breaker_and_is_audited(gateway: Gateway) -> None:
    c = gateway.client
    breaker = gateway.app[POOL]["stripe"].breaker
    async with c.post("/console/actions/breaker", headers=ADMIN, json={"provider": "stripe", "state": "open"}) as r:
        assert r.status == 400 and (await r.json())["code"] == "confirmation_required"
    async with c.post("/console/actions/breaker", headers=ADMIN,
                      json={"provider": "stripe", "state": "open", "confirm": "yes"}) as r:
        assert r.status == 422  # strictly true, not truthy
    async with c.post("/console/actions/breaker", headers=ADMIN,
                      json={"provider": "paypal", "state": "open", "confirm": True}) as r:
        assert r.status == 422 and (await r.json())["code"] == "unknown_provider"
    async with c.post("/console/actions/breaker", headers=ADMIN, data=b"provider=stripe") as r:
        assert r.status == 415
    assert breaker.state == "closed" and gateway.ops_events("console_action") == []

    async with c.get("/console/events", headers=ADMIN) as stream:
        assert by_name(await next_event(stream))["stripe"]["breaker"]["state"] == "closed"
        pushed_at = time.monotonic()
        async with c.post("/console/actions/breaker", headers=ADMIN,
                          json={"provider": "stripe", "state": "open", "confirm": True}) as r:
            assert r.status == 200
            assert await r.json() == {"provider": "stripe", "state": "open", "previous_state": "closed",
                                      "changed_at": breaker.changed_at}
        snap = await next_event(stream)
        assert time.monotonic() - pushed_at < 0.8, "a breaker change is pushed at once, not on the next tick"
        stripe = by_name(snap)["stripe"]
        assert stripe["breaker"]["state"] == "open" and not stripe["usable"]
        assert stripe["unusable_reason"] == "breaker_open"
        assert snap["breaker_changes"][0]["provider"] == "stripe" and snap["breaker_changes"][0]["to"] == "open"
    assert breaker.state == "open"
    answer = (await pay(gateway))[0]
    assert answer["status"] == "approved" and answer["provider"] == "adyen", "the forced-open provider is drained"

    async with c.post("/console/actions/breaker", headers=ADMIN,
                      json={"provider": "stripe", "state": "closed", "confirm": True}) as r:
        assert r.status == 200 and (await r.json())["state"] == "closed"
    assert breaker.state == "closed"
    audit = gateway.ops_events("console_action")
    assert [(a["actor"], a["action"], a["provider"], a["from_state"], a["to_state"]) for a in audit] == [
        ("ops", "breaker_force_open", "stripe", "closed", "open"),
        ("ops", "breaker_force_closed", "stripe", "open", "closed"),
    ]
    assert all(a["ts"] and a["auth"] == "bearer" and a["level"] == "warning" for a in audit)


async def test_cookie_actions_must_come_from_the_console_origin(gateway: Gateway) -> None:
    c = gateway.client
    cookie = gateway.app[CONSOLE].sessions.issue(Caller("ops", frozenset({"admin"})))
    body = {"provider": "checkout", "state": "open", "confirm": True}
    async with c.post("/console/actions/breaker", json=body, cookies={COOKIE: cookie},
                      headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403 and (await r.json())["code"] == "cross_origin"
    assert gateway.app[POOL]["checkout"].breaker.state == "closed"
    origin = f"http://{c.server.host}:{c.server.port}"
    async with c.post("/console/actions/breaker", json=body, cookies={COOKIE: cookie}, headers={"Origin": origin}) as r:
        assert r.status == 200
    assert gateway.app[POOL]["checkout"].breaker.state == "open"
    assert gateway.ops_events("console_action")[0]["auth"] == "session"


async def test_reconcile_now_settles_pending_payments_and_is_audited(gateway: Gateway,
                                                                      emulators: dict[str, EmulatorServer]) -> None:
    stripe = emulators["stripe"]
    # A 500 after processing is an unknown outcome; the status query fails too: pending.
    stripe.emulator.faults.set(FaultPlan(rules=(
        FaultRule(kind="error", status=500, after_processing=True, operations=("authorize",)),
        FaultRule(kind="error", status=503, operations=("status",)),
    )))
    answer = (await pay(gateway))[0]
    assert answer["status"] == "pending", answer
    stripe.emulator.faults.clear()
    # Those failures opened Stripe's breaker, and the reconciler's status queries go through it
    # like any call: close it, as its reset timeout would.
    gateway.app[POOL]["stripe"].breaker.force_close()
    console = gateway.app[CONSOLE]
    assert (await console.unresolved(fresh=True))[0] == 1
    async with gateway.client.post("/console/actions/reconcile", headers=ADMIN, json={}) as r:
        assert r.status == 400 and (await r.json())["code"] == "confirmation_required"
    await asyncio.sleep(2.1)  # the reconciler leaves payments younger than its min_age_s alone
    async with gateway.client.post("/console/actions/reconcile", headers=ADMIN, json={"confirm": True}) as r:
        assert r.status == 202
        assert await r.json() == {"triggered": True, "unresolved": 1, "unresolved_capped": False}
    for _ in range(50):
        if (await console.unresolved(fresh=True))[0] == 0:
            break
        await asyncio.sleep(0.1)
    assert (await console.unresolved(fresh=True))[0] == 0
    async with gateway.client.get(f"/v1/payments/{answer['id']}", headers=AUTH) as r:
        assert (await r.json())["status"] == "approved"
    audit = gateway.ops_events("console_action")
    assert [(a["actor"], a["action"], a["unresolved"]) for a in audit] == [("ops", "reconcile_now", 1)]


# -- the window on its own -----------------------------------------------------------------------


def _record(pid: str, status: PaymentStatus, attempts: list[Attempt], provider: str | None = None,
            error_code: str | None = None) -> PaymentRecord:
    return PaymentRecord(id=pid, client="c", amount=100, currency="EUR", capture=True, merchant_reference=pid,
                         status=status, provider=provider, attempts=attempts, error_code=error_code)


def _try(provider: str, outcome: str, latency: float, *, n: int = 1, code: str | None = None,
         reason: str | None = None) -> Attempt:
    return Attempt(provider=provider, try_number=n, operation="authorize", idempotency_key="k", started_at=time.time(),
                   outcome=outcome, raw_code=code, latency_ms=latency, failover_reason=reason)


def test_window_counts_rates_percentiles_and_forgets_old_traffic() -> None:
    now = [1000.0]
    stats = ConsoleStats(window_s=120, rate_window_s=60, series_step_s=10, clock=lambda: now[0])
    for i in range(98):
        stats.observe(_record(f"p{i}", PaymentStatus.APPROVED, [_try("stripe", "approved", 10.0 + i % 2)], "stripe"),
                      "payment", {"latency_ms": 12.0})
    stats.observe(_record("slow", PaymentStatus.APPROVED, [_try("stripe", "approved", 900.0)], "stripe"),
                  "payment", {"latency_ms": 901.0})
    stats.observe(_record("fo", PaymentStatus.APPROVED, [
        _try("stripe", "unavailable", 2.0, code="connect_refused"),
        _try("stripe", "unavailable", 2.0, n=2, code="connect_refused"),
        _try("adyen", "approved", 30.0, reason="unavailable:connect_refused")], "adyen"), "payment", {"latency_ms": 40})
    stats.observe(_record("none", PaymentStatus.FAILED, [], error_code="no_provider_available"), "payment", {})
    stats.observe(_record("boom", PaymentStatus.APPROVED, None), "payment", {})  # type: ignore[arg-type]
    assert stats.observer_errors == 1  # a console bug never reaches the payment

    s = stats.summary("stripe")
    assert (s["payments"], s["approved"], s["attempts"]) == (100, 99, 101)
    assert s["approval_rate"] == pytest.approx(0.99)
    assert s["latency_p50_ms"] == pytest.approx(10.5, rel=0.06)
    assert s["latency_p99_ms"] == pytest.approx(11.0, rel=0.06)
    assert s["failovers_per_min"] == 1 and s["retries_per_min"] == 1
    assert s["outcomes"] == {"approved": 99, "unavailable": 2}
    assert stats.summary("adyen")["approval_rate"] == 1.0
    g = stats.summary(GATEWAY)
    # "boom" was half counted before it failed
    assert (g["payments"], g["approved"], g["failed"], g["failovers_per_min"]) == (102, 101, 1, 1)
    assert sum(step[0] for step in s["series"]) == 100 and len(s["series"]) == 12
    failures = stats.failures()
    assert [(f["provider"], f["code"]) for f in failures] == [
        (None, "no_provider_available"), ("stripe", "connect_refused"), ("stripe", "connect_refused")]

    now[0] += 61  # out of the rate window, still in the window
    s = stats.summary("stripe")
    assert s["payments"] == 100 and s["failovers_per_min"] == 0
    now[0] += 60  # out of the window
    assert stats.summary("stripe")["payments"] == 0 and stats.summary("stripe")["approval_rate"] is None


def test_the_windows_of_two_workers_add_up_to_the_window_of_all_their_traffic() -> None:
    now = [1000.0]
    one, two, both = (ConsoleStats(window_s=120, rate_window_s=60, series_step_s=10, clock=lambda: now[0])
                      for _ in range(3))
    for i in range(60):
        if i % 4 == 0:  # a failover now and then
            attempts = [_try("stripe", "unavailable", 2.0, code="connect_refused"),
                        _try("adyen", "approved", 20.0 + i, reason="unavailable:connect_refused")]
        else:
            attempts = [_try("stripe", "approved", 3.0 + i * 7)]
        record = _record(f"p{i}", PaymentStatus.APPROVED, attempts, attempts[-1].provider)
        for stats in (one if i % 3 else two, both):
            stats.observe(record, "payment", {"latency_ms": 4.0 + i * 7})
        if i == 30:
            now[0] += 70  # the first half leaves the rate window, not the window

    def report(stats: ConsoleStats) -> dict[str, Any]:
        return {"traffic": {k: stats.traffic(k).to_wire() for k in (GATEWAY, "stripe", "adyen")},
                "failures": stats.failures(), "in_flight": ["x"] if stats is one else ["x", "y"],
                "in_flight_count": 1 if stats is one else 2, "retry_budget_left": 2.5,
                "bulkheads": {"stripe": {"active": 1, "waiting": 0, "max_concurrent": 8, "max_queue": 4}}}

    host = HostFigures.of(orjson.loads(orjson.dumps([report(one), report(two)])), workers=2)  # as they travel
    for key in (GATEWAY, "stripe", "adyen"):
        assert host.traffic[key].summary(60) == both.summary(key), key
    assert one.summary("stripe")["payments"] < both.summary("stripe")["payments"]
    assert sorted(f["payment_id"] for f in host.failures) == sorted(f["payment_id"] for f in both.failures())
    assert [f["at"] for f in host.failures] == sorted((f["at"] for f in host.failures), reverse=True)
    assert (host.in_flight, host.in_flight_count, host.retry_budget_left) == ({"x", "y"}, 3, 5.0)
    assert host.bulkheads["stripe"] == {"active": 2, "waiting": 0, "max_concurrent": 16, "max_queue": 8}
    assert host.who() == {"workers": 2, "reporting": 2, "missing": []}


def test_percentile_of_a_log_histogram() -> None:
    assert percentile({}, 0.5) is None
    hist: dict[int, int] = {}
    for ms in range(1, 1001):
        b = latency_bin(float(ms))
        hist[b] = hist.get(b, 0) + 1
    assert percentile(hist, 0.5) == pytest.approx(500, rel=0.05)
    assert percentile(hist, 0.99) == pytest.approx(990, rel=0.05)
