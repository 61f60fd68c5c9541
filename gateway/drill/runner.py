"""Run one drill, self-contained, on loopback.

1. Dev certificates into `<log_dir>/certs`; one emulator per provider of the scenario's route,
   each on a free loopback port behind mTLS.
2. A gateway configuration for the drill (SQLite journal and JSON-lines log in the log dir,
   short per-try timeout and deadline, small retry delays); its secrets come from environment
   variables set in-process only while the configuration is read, then restored.
3. The gateway in-process (aiohttp AppRunner on 127.0.0.1, a free port), the scenario's faults
   injected, and N payments sent over real HTTP at concurrency C, each with its own
   Idempotency-Key. Bounded: N <= 100 000 and a wall-clock cap after which the remaining
   sends are abandoned and reported.
4. Faults lifted, the reconciler settles what was left pending, every ledger is read, the
   gateway stops, and the journal is read back from disk for the summary.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from domain.cards import digitless_tag
from gateway.app import build_app
from gateway.app_keys import RECONCILER
from gateway.certs.devca import DevCertLayout, generate_dev_certs
from gateway.config import GatewayConfig, parse_config
from gateway.drill.follow_ups import FollowUpTarget, run_follow_ups
from gateway.drill.report import LedgerView, SendResult, summarize
from gateway.drill.webhook_chaos import NotificationReceiver, feed_measures, final_states, notification_measures
from gateway.drill.scenarios import DEADLINE_MS, PER_TRY_TIMEOUT_MS, Injection, Quota, Scenario, get_scenario
from gateway.txlog import build_ops_logger
from gateway.emulator_launch import start_emulator
from emulators.server import EmulatorServer
from emulators.registry import EMULATORS
from emulators.webhooks import WebhookTarget

MAX_PAYMENTS = 100_000
MAX_CONCURRENCY = 1_000
MAX_KILLS = 20
MAX_REPLICAS = 8
MAX_WORKERS = 4
DEFAULT_MAX_SECONDS = 300.0
SETTLE_MAX_S = 10.0  # after the load: how long the reconciler may take to settle what is pending
SETTLE_PAUSE_S = 0.2
CLIENT_SLACK_S = 5.0  # the drill client waits this much past the gateway's deadline
# The emulators finish a request within their longest injected delay (under 2 s), so the drill's
# reconciler may trust an empty lookup sooner than production's minute.
PROVIDER_IN_FLIGHT_S = 5.0
EMULATOR_LOOKUP_LAG_S = 10.0  # the emulators' searches have no index lag; Stripe's real one does (600 s)
HOST = "127.0.0.1"
CLIENT_NAME = "drill"
CLIENT_KEY_ENV = "GATEWAY_DRILL_CLIENT_KEY"
# Dev values in each provider's key shape (the emulators check the shape, not the value).
PROVIDER_DEV_KEYS = {"stripe": "sk_test_drill_gateway", "adyen": "adyen_drill_api_key",
                     "checkout": "sk_sbox_drill_gateway"}
# Each emulator signs its webhooks to the drill's gateway with these (Adyen's HMAC key is hex).
WEBHOOK_DEV_SECRETS = {"stripe": "whsec_drill_gateway", "adyen": "4452494c4c" * 6 + "00",
                       "checkout": "cko_drill_webhook_secret"}
WEBHOOK_TIME_FACTOR = 0.001  # the providers' retry schedules, compressed (Adyen's 9 s is 9 ms)
NOTIFY_SECRET_ENV = "GATEWAY_DRILL_NOTIFY_KEY"
NOTIFY_DEV_SECRET = "drill_merchant_notifications_0123456789"


def provider_key_env(kind: str) -> str:
    return f"GATEWAY_DRILL_{kind.upper()}_API_KEY"


def webhook_key_env(kind: str) -> str:
    return f"GATEWAY_DRILL_{kind.upper()}_WEBHOOK_KEY"


def point_webhooks(servers: Mapping[str, EmulatorServer], gateway_url: str) -> None:
    """Every emulator posts its signed notifications to the drill's gateway, as the providers
    would once ops set the webhook up (README, providers)."""
    for kind, server in servers.items():
        server.emulator.webhooks.set_target(WebhookTarget(url=f"{gateway_url}/v1/webhooks/{kind}",
                                                          secret=WEBHOOK_DEV_SECRETS[kind],
                                                          time_factor=WEBHOOK_TIME_FACTOR))


async def webhooks_idle(servers: Mapping[str, EmulatorServer]) -> None:
    """Until every emulator has delivered (or given up on) what it notified."""
    await asyncio.gather(*(server.emulator.webhooks.idle() for server in servers.values()))


@dataclass(frozen=True, slots=True)
class DrillOptions:
    payments: int = 200
    concurrency: int = 16
    log_dir: Path | None = None  # default: logs/drills/<scenario>-<UTC time>
    max_seconds: float = DEFAULT_MAX_SECONDS  # wall-clock cap on the load phase
    seed: int | None = None  # fault plans and card mix; random when None (reported)
    kills: int = 3  # crash-restart only: how many times the gateway process is killed under load
    primary: str | None = None  # another provider kind as the scenario's primary
    replicas: int = 3  # fleet only: gateway processes behind HAProxy
    workers: int = 1  # fleet only: `serve --workers N` in each replica

    def __post_init__(self) -> None:
        if not 1 <= self.payments <= MAX_PAYMENTS:
            raise ValueError(f"payments must be 1..{MAX_PAYMENTS}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be 1..{MAX_CONCURRENCY}")
        if not 0 < self.max_seconds <= 3600:
            raise ValueError("max_seconds must be in (0, 3600]")
        if not 0 <= self.kills <= MAX_KILLS:
            raise ValueError(f"kills must be 0..{MAX_KILLS}")
        if not 2 <= self.replicas <= MAX_REPLICAS:  # one is killed while another serves
            raise ValueError(f"replicas must be 2..{MAX_REPLICAS}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}")


@dataclass(frozen=True, slots=True)
class DrillReport:
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.summary["ok"])

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


ProgressHook = Callable[[int, int], None]  # (done, total)


def default_log_dir(scenario: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("logs") / "drills" / f"{scenario}-{stamp}-{secrets.token_hex(2)}"


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set variables for the duration of the block, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def drill_config_data(scenario: Scenario, servers: Mapping[str, EmulatorServer], certs: DevCertLayout,
                      log_dir: Path, concurrency: int, *, port: int = 0,
                      notify_url: str | None = None) -> dict[str, Any]:
    """The drill's gateway configuration, in the shape of config/gateway.yaml (port 0: any free
    one); with `notify_url`, merchant notifications go to the drill's receiver there."""
    width = max(200, concurrency)
    providers = {
        kind: {
            "kind": kind,
            "base_url": servers[kind].url,
            "api_key_env": provider_key_env(kind),
            "merchant_account": "GatewayDrillECOM",
            "connect_timeout_ms": PER_TRY_TIMEOUT_MS,  # mTLS handshakes pile up when traffic fails over
            "timeout_ms": PER_TRY_TIMEOUT_MS,
            "tls": {"ca": str(certs.provider_ca(kind)), "client_cert": str(certs.client_cert(kind)),
                    "client_key": str(certs.client_key(kind))},
            "breaker": {"fail_max": 5, "reset_timeout_s": 1.0},
            "retry": {"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 50},
            "bulkhead": {"max_concurrent": width, "max_queue": width},
            "webhook_key_envs": [webhook_key_env(kind)],
        }
        for kind in scenario.route
    }
    for step in scenario.steps:
        if isinstance(step, Quota) and step.gateway_per_s is not None:
            providers[scenario.route[step.provider]]["rate_limit_per_s"] = step.gateway_per_s
    notifications = {} if notify_url is None else {"notifications": {
        "url": notify_url, "secret_env": [NOTIFY_SECRET_ENV], "retry_base_s": 0.05, "retry_max_s": 0.5,
        "poll_interval_s": 0.05, "timeout_s": 2}}
    return {
        **notifications,
        "server": {"host": HOST, "port": port, "max_in_flight": max(1000, concurrency), "shutdown_grace_s": 5},
        "auth": {"clients": [{"name": CLIENT_NAME, "key_env": CLIENT_KEY_ENV,
                              "permissions": ["payments:write", "payments:read"]}]},
        "storage": {"backend": "sqlite", "sqlite_path": str(log_dir / "gateway.db")},
        "log": {"dir": str(log_dir), "file": "transactions.jsonl"},
        "engine": {"deadline_ms": DEADLINE_MS, "retry_budget_ratio": 0.2, "retry_budget_min_per_s": 10,
                   "retry_budget_window_s": 10, "provider_in_flight_s": PROVIDER_IN_FLIGHT_S,
                   "lookup_lag_s": EMULATOR_LOOKUP_LAG_S},
        "providers": providers,
        "routes": [{"name": "drill", "providers": list(scenario.route),
                    "cascade_on": ["do_not_honor", "issuer_not_available", "try_again_later"]}],
    }


def secret_env(scenario: Scenario, client_key: str) -> dict[str, str]:
    """The environment variables the drill configuration names for its secrets."""
    env = {CLIENT_KEY_ENV: client_key}
    env.update({provider_key_env(kind): PROVIDER_DEV_KEYS[kind] for kind in scenario.route})
    env.update({webhook_key_env(kind): WEBHOOK_DEV_SECRETS[kind] for kind in scenario.route})
    env[NOTIFY_SECRET_ENV] = NOTIFY_DEV_SECRET
    return env


def build_config(data: dict[str, Any], scenario: Scenario, client_key: str) -> GatewayConfig:
    with environment(secret_env(scenario, client_key)):  # read into SecretStr at parse time; nothing lingers
        return parse_config(data)


@dataclass(frozen=True, slots=True)
class PlannedPayment:
    index: int
    merchant_reference: str
    idempotency_key: str
    card: str
    decline_card: bool
    amount: int
    capture: bool = True


def plan_payments(scenario: Scenario, n: int, run_id: str, seed: int) -> list[PlannedPayment]:
    """Decline cards spread evenly (exactly floor(n * share) of them), in a seeded order."""
    cards = EMULATORS[scenario.primary].scenario_cards()
    approve = cards["approve"]
    declines = [cards[name] for name in scenario.decline_cards]
    rng = random.Random(seed)
    plan: list[PlannedPayment] = []
    used = 0
    for i in range(n):
        decline = bool(declines) and int((i + 1) * scenario.decline_share) > int(i * scenario.decline_share)
        card = declines[used % len(declines)] if decline else approve
        used += decline
        plan.append(PlannedPayment(i, f"drill-{run_id}-{i:06d}", f"drill-{run_id}-{i:06d}", card, decline,
                                   rng.randrange(1, 1000) * 100,  # whole units: no amount triggers
                                   capture=not scenario.follow_ups))
    return plan


def payment_body(payment: PlannedPayment) -> bytes:
    """The request body of `payment`: the same bytes on every retry of its key."""
    return orjson.dumps({
        "amount": payment.amount, "currency": "EUR", "merchant_reference": payment.merchant_reference,
        "capture": payment.capture,
        "payment_method": {"type": "card", "number": payment.card, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        "metadata": {"drill": "true"},
    })


async def post_payment(session: aiohttp.ClientSession, payment: PlannedPayment) -> tuple[SendResult, float | None]:
    """One POST /v1/payments with the payment's Idempotency-Key: what came back, and the
    answer's Retry-After in seconds (None without one)."""
    started = time.perf_counter()
    retry_after: float | None = None
    try:
        async with session.post("/v1/payments", data=payment_body(payment),
                                headers={"Idempotency-Key": payment.idempotency_key,
                                         "Content-Type": "application/json"}) as response:
            raw = await response.read()
            status = response.status
            retry_after = _seconds(response.headers.get("Retry-After"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return SendResult(payment.index, payment.merchant_reference, (time.perf_counter() - started) * 1000,
                          error=type(exc).__name__, decline_card=payment.decline_card), None
    latency = (time.perf_counter() - started) * 1000
    return answer_result(payment, latency, status, raw), retry_after


def answer_result(payment: PlannedPayment, latency_ms: float, status: int, raw: bytes) -> SendResult:
    """A gateway answer as a SendResult: a payment document, or an error without a payment."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    return SendResult(payment.index, payment.merchant_reference, latency_ms, http_status=status,
                      payment_id=doc.get("id") if "status" in doc else None, status=doc.get("status"),
                      error=doc.get("code") if "id" not in doc else None, decline_card=payment.decline_card)


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None


async def send_one(session: aiohttp.ClientSession, payment: PlannedPayment) -> SendResult:
    result, _retry_after = await post_payment(session, payment)
    return result


def client_session(base_url: str, client_key: str, concurrency: int,
                   trace_configs: Sequence[aiohttp.TraceConfig] = ()) -> aiohttp.ClientSession:
    """The drill's checkout client: one keep-alive session, at most `concurrency` connections
    (`trace_configs`: to count every answer, retries included)."""
    timeout = aiohttp.ClientTimeout(total=DEADLINE_MS / 1000 + CLIENT_SLACK_S)
    return aiohttp.ClientSession(base_url, connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout,
                                 headers={"Authorization": f"Bearer {client_key}"},
                                 trace_configs=list(trace_configs) or None)


async def _send_all(base_url: str, client_key: str, plan: list[PlannedPayment], concurrency: int, max_seconds: float,
                    on_progress: ProgressHook | None) -> list[SendResult]:
    """C workers pull payments in order until the plan is done or the time cap passes; a send
    already under way finishes (bounded by the client timeout), nothing new starts."""
    results: list[SendResult] = []
    pending = iter(plan)
    cap_at = time.monotonic() + max_seconds
    async with client_session(base_url, client_key, concurrency) as session:
        async def worker() -> None:
            for payment in pending:
                if time.monotonic() >= cap_at:
                    return
                results.append(await send_one(session, payment))
                if on_progress is not None:
                    on_progress(len(results), len(plan))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(plan)))))
    return results


async def _settle(app: web.Application) -> int:
    """One reconciler pass after another until nothing is left unresolved, nothing more settles
    for a while, or SETTLE_MAX_S passes; returns how many payments it settled."""
    reconciler = app[RECONCILER]
    store = reconciler.service.store
    settled = 0
    until = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < until:
        if not await store.unresolved_payments(limit=1):
            break
        settled += await reconciler.run_once(min_age_s=0, ignore_backoff=True)
        await asyncio.sleep(SETTLE_PAUSE_S)  # an emulator may still be "processing" (brownout latency)
    return settled


async def _notified(app: web.Application) -> None:
    """Until no merchant notification waits to be delivered, or SETTLE_MAX_S passes."""
    store = app[RECONCILER].service.store
    until = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < until and await store.count_pending_notifications():
        await asyncio.sleep(SETTLE_PAUSE_S)


def follow_up_targets(sends: Sequence[SendResult], plan: Sequence[PlannedPayment],
                      run_id: str) -> list[FollowUpTarget]:
    """Every payment answered `approved`, for the follow-up phase."""
    return [FollowUpTarget(s.payment_id, plan[s.index].amount, f"drill-{run_id}-{s.index:06d}")
            for s in sends if s.payment_id is not None and s.status == "approved"]


def ledger_view(servers: Mapping[str, EmulatorServer]) -> dict[str, list[LedgerView]]:
    """Gateway payment id -> its payment objects in every provider's ledger."""
    view: dict[str, list[LedgerView]] = {}
    for kind, server in servers.items():
        for entry in server.emulator.ledger.entries():
            view.setdefault(entry.payment_ref, []).append(
                LedgerView(kind, entry.approved, entry.captured, entry.refunded, entry.voided))
    return view


def read_journal(path: Path, reference_prefix: str) -> list[dict[str, Any]]:
    """This run's payment documents, read from disk after the gateway closed the store."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT doc FROM payments").fetchall()
    finally:
        conn.close()
    docs = (orjson.loads(row[0]) for row in rows)
    return [d for d in docs if str(d.get("merchant_reference", "")).startswith(reference_prefix)]


@dataclass(frozen=True, slots=True)
class RunSetup:
    """What every drill run starts from: where it writes, its seed and its identities."""

    log_dir: Path
    seed: int
    run_id: str  # merchant references and Idempotency-Keys start with drill-<run_id>-
    client_key: str

    @classmethod
    def new(cls, name: str, options: DrillOptions) -> RunSetup:
        log_dir = (options.log_dir or default_log_dir(name)).resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        seed = options.seed if options.seed is not None else random.randrange(2**31)
        return cls(log_dir, seed, digitless_tag(), f"drill_{secrets.token_urlsafe(24)}")

    @property
    def reference_prefix(self) -> str:
        return f"drill-{self.run_id}-"


async def start_emulators(stack: AsyncExitStack, route: tuple[str, ...],
                          certs: DevCertLayout) -> dict[str, EmulatorServer]:
    """One emulator per provider of the route, mTLS on a free loopback port; stopped with `stack`."""
    servers: dict[str, EmulatorServer] = {}
    for kind in route:
        server = await start_emulator(kind, certs=certs)
        stack.push_async_callback(server.stop)
        servers[kind] = server
    return servers


async def inject_faults(scenario: Scenario, servers: Mapping[str, EmulatorServer], seed: int) -> list[Injection]:
    injections: list[Injection] = []
    try:
        for step in scenario.steps:
            injections.append(await step.inject(servers[scenario.route[step.provider]], seed))
    except BaseException:
        await lift_faults(injections)
        raise
    return injections


async def lift_faults(injections: list[Injection]) -> None:
    for injection in reversed(injections):
        await injection.lift()


@dataclass(frozen=True, slots=True)
class InProcessGateway:
    config: GatewayConfig
    app: web.Application
    url: str


async def start_gateway_in_process(stack: AsyncExitStack, scenario: Scenario, setup: RunSetup,
                                   servers: Mapping[str, EmulatorServer], certs: DevCertLayout,
                                   concurrency: int, notify_url: str | None = None, *,
                                   sections: Mapping[str, Any] | None = None) -> InProcessGateway:
    """The gateway on an AppRunner in this process (127.0.0.1, a free port); cleaned up first
    when `stack` unwinds, so the journal is on disk before anyone reads it. `sections` replace
    whole top-level sections of the drill's configuration (a drill of its own: `routes`, ...)."""
    data = {**drill_config_data(scenario, servers, certs, setup.log_dir, concurrency, notify_url=notify_url),
            **(sections or {})}
    config = build_config(data, scenario, setup.client_key)
    ops_stream = stack.enter_context((setup.log_dir / "ops.jsonl").open("a", encoding="utf-8"))
    app = build_app(config, ops_log=build_ops_logger(ops_stream), reconcile_interval_s=1.0)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.shutdown_grace_s)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = next(addr[1] for addr in runner.addresses if isinstance(addr, tuple))
    return InProcessGateway(config, app, f"http://{HOST}:{port}")


async def run_drill(scenario: Scenario | str, options: DrillOptions = DrillOptions(), *,
                    on_progress: ProgressHook | None = None) -> DrillReport:
    """Run one drill end to end and summarise it; raises only for set-up failures."""
    if isinstance(scenario, str):
        scenario = get_scenario(scenario)
    if options.primary is not None:
        scenario = scenario.with_primary(options.primary)
    setup = RunSetup.new(scenario.name, options)
    started = time.monotonic()
    certs = await asyncio.to_thread(generate_dev_certs, setup.log_dir / "certs", list(scenario.route))
    plan = plan_payments(scenario, options.payments, setup.run_id, setup.seed)
    extra: dict[str, Any] = {"seed": setup.seed, "run_id": setup.run_id}

    async with AsyncExitStack() as stack:
        servers = await start_emulators(stack, scenario.route, certs)
        receiver = await NotificationReceiver().start()
        stack.push_async_callback(receiver.stop)
        gateway = await start_gateway_in_process(stack, scenario, setup, servers, certs, options.concurrency,
                                                 notify_url=receiver.url)
        point_webhooks(servers, gateway.url)
        injections = await inject_faults(scenario, servers, setup.seed)
        try:
            load_started = time.monotonic()
            sends = await _send_all(gateway.url, setup.client_key, plan, options.concurrency,
                                    options.max_seconds, on_progress)
            extra["load_seconds"] = round(time.monotonic() - load_started, 3)
            if scenario.follow_ups:
                async with client_session(gateway.url, setup.client_key, options.concurrency) as session:
                    tally = await run_follow_ups(session, follow_up_targets(sends, plan, setup.run_id),
                                                 options.concurrency, setup.seed)
                extra.update(tally.as_summary())
        finally:
            await lift_faults(injections)
        extra["quota_429s"] = sum(getattr(i, "quota_429s", 0) for i in injections)
        toggles = sum(getattr(i, "toggles", 0) for i in injections)
        if toggles:
            extra["outage_toggles"] = toggles
        await webhooks_idle(servers)
        extra["reconciled_after_run"] = await _settle(gateway.app)
        await _notified(gateway.app)
        ledger = ledger_view(servers)
        extra.update(feed_measures(servers))
        received = list(receiver.events)

    journal = await asyncio.to_thread(read_journal, Path(gateway.config.storage.sqlite_path), setup.reference_prefix)
    extra.update(final_states(journal, ledger))
    extra.update(notification_measures(received, sends, journal, extra.get("follow_up_answers", {})))
    summary = summarize(scenario=scenario, sends=sends, journal=journal, ledger=ledger,
                        abandoned=len(plan) - len(sends), seconds=time.monotonic() - started,
                        log_dir=str(setup.log_dir), extra=extra)
    return DrillReport(summary)
