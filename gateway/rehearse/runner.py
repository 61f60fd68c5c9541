"""Run one rehearsal: the I/O around the pure profile, scenario and verdict modules.

1. A run directory (default `logs/rehearsals/<profile>-<UTC time>`): dev certificates, one
   emulator per configured provider on a free loopback port (TLS and mTLS as the configuration
   asks), and the production configuration rewritten for loopback (`config_gen`) as
   `gateway.yaml` there.
2. The gateway as its own process, `gateway serve --config <run>/gateway.yaml [--workers N]`,
   with dev secrets in its environment only, so its CPU is measured apart from the load's.
3. The scenario's quota set on the primary's emulator (admin API, `PUT /_emulator/quota`), the
   from-log latency replayed on each emulator (`PUT /_emulator/faults`), then the open-loop load
   (`load`) while a timeline task applies the scenario's faults at their times.
4. Faults lifted, pending payments given a bounded time to settle (the gateway's reconciler and
   the providers' webhooks), the gateway stopped (SIGTERM: it drains and closes its journal),
   every ledger read, the journal read back, the drills' summary (duplicates, lost, journal
   against ledgers) computed, and the verdict built from the answers, the gateway's own
   transaction log in the run directory and the CPU samples.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from emulators.faults import FaultRule
from emulators.server import EmulatorServer
from emulators.registry import EMULATORS
from emulators.webhooks import WebhookTarget
from domain.cards import digitless_tag
from gateway.certs.devca import DevCertLayout, generate_dev_certs
from gateway.config import parse_config
from gateway.drill.process import GatewayProcess, free_port
from gateway.drill.report import percentile, summarize
from gateway.drill.runner import (
    WEBHOOK_DEV_SECRETS,
    WEBHOOK_TIME_FACTOR,
    environment,
    ledger_view,
    read_journal,
)
from gateway.drill.scenarios import Scenario as DrillScenario
from gateway.emulator_launch import start_emulator
from gateway.rehearse import verdict as V
from gateway.rehearse.config_gen import (
    HOST,
    gateway_quotas,
    rehearsal_config,
    secret_env,
    uses_mtls,
    uses_tls,
)
from gateway.rehearse.cpu import CpuMeter
from gateway.rehearse.from_log import latency_plans, log_profile, read_day
from gateway.rehearse.load import LoadState, Sent, ask_again, client_session, plan, run_load
from gateway.rehearse.profile import Mix, RateProfile, peak_sale, sale_mix
from gateway.rehearse.scenario import no_fault_scenario, peak_scenario
from gateway.rehearse.timeline import (
    Emulators,
    expire_client_certificate,
    fault_marks,
    roles_of,
    run_timeline,
)

SAMPLE_S = 0.5  # CPU samples and the live view
SETTLE_POLL_S = 0.25
ADMIN_TIMEOUT_S = 5.0
HARNESS_BUSY = 0.85  # cores: the rehearsal's own process this busy may slow what it measures


@dataclass(frozen=True, slots=True)
class RehearsalOptions:
    config: Path
    profile: str = "peak-sale"  # or "from-log"
    seconds: float = 180.0  # peak-sale: the run's length
    target_rate: float = 100.0  # peak-sale: the hold's rate (the spike is 1.5x)
    from_log: tuple[Path, ...] = ()
    speedup: float = 10.0
    scale: float = 1.0
    scenario: str = "peak"  # or "none"
    quota_share_of_peak: float = 0.6
    p99_target_ms: float = 1000.0
    max_failed_share: float = 0.01
    workers: int = 1
    max_in_flight: int = 2000
    settle_s: float = 20.0
    run_dir: Path | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.profile not in ("peak-sale", "from-log"):
            raise ValueError(f"unknown profile {self.profile!r}: peak-sale or from-log")
        if self.profile == "from-log" and not self.from_log:
            raise ValueError("--from-log needs at least one log file or directory")
        if self.scenario not in ("peak", "none"):
            raise ValueError(f"unknown scenario {self.scenario!r}: peak or none")
        if not 1 <= self.workers <= 8:
            raise ValueError("workers must be 1..8")
        if not 0 < self.settle_s <= 300:
            raise ValueError("settle_s must be in (0, 300]")


@dataclass(slots=True)
class Progress:
    """What the live view reads while the run goes on."""

    profile: RateProfile
    load: LoadState = field(default_factory=LoadState)
    cpu: CpuMeter | None = None
    harness_cpu: CpuMeter = field(default_factory=lambda: CpuMeter(os.getpid(), tree=False))
    happened: list[str] = field(default_factory=list)


ProgressHook = Callable[[Progress], Awaitable[None]]


def default_run_dir(profile: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("logs") / "rehearsals" / f"{profile}-{stamp}-{secrets.token_hex(2)}"


def traffic(options: RehearsalOptions, seed: int) -> tuple[RateProfile, Mix, dict[str, tuple[FaultRule, ...]]]:
    """The profile, its mix, and per provider the latency rules its emulator replays."""
    if options.profile == "peak-sale":
        return peak_sale(options.target_rate, options.seconds), sale_mix(seed), {}
    day = read_day(list(options.from_log))
    return log_profile(day, speedup=options.speedup, scale=options.scale), Mix(day.mix, seed), latency_plans(day)


async def _sample(meter: CpuMeter, started_at: float, stop: asyncio.Event, progress: Progress,
                  on_progress: ProgressHook | None) -> None:
    while not stop.is_set():
        t = time.monotonic() - started_at
        await asyncio.to_thread(meter.sample, t)
        await asyncio.to_thread(progress.harness_cpu.sample, t)
        if on_progress is not None:
            await on_progress(progress)
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
        except TimeoutError:
            pass


async def _settle(session: aiohttp.ClientSession, sends: Sequence[Sent], until: float) -> int:
    """Poll the payments answered `pending` until none is, or `until`; how many are left."""
    pending = {s.result.payment_id for s in sends if s.result.status == "pending" and s.result.payment_id}
    while pending and time.monotonic() < until:
        for pid in list(pending):
            try:
                async with session.get(f"/v1/payments/{pid}") as response:
                    doc = orjson.loads(await response.read()) if response.status == 200 else {}
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
                continue
            if isinstance(doc, dict) and doc.get("status") not in (None, "pending", "attempting", "received"):
                pending.discard(pid)
        if pending:
            await asyncio.sleep(SETTLE_POLL_S)
    return len(pending)


def read_txlog(run_dir: Path, reference_prefix: str) -> list[dict[str, Any]]:
    """This run's payment lines from the gateway's own transaction log in the run directory."""
    lines = []
    for path in sorted(run_dir.glob("transactions*.jsonl")):
        with path.open("rb") as fh:
            for raw in fh:
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue  # a line cut short: `gateway logs analyze` counts those
                if doc.get("event") == "payment" and str(doc.get("merchant_reference", "")).startswith(
                        reference_prefix):
                    lines.append(doc)
    return lines


def _prepare(options: RehearsalOptions, seed: int) -> tuple[Path, RateProfile, Mix, dict[str, tuple[FaultRule, ...]],
                                                           dict[str, Any], DevCertLayout]:
    """The blocking part of the set-up (files, the log read, certificates), run in a thread."""
    run_dir = (options.run_dir or default_run_dir(options.profile)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    profile, mix, base_rules = traffic(options, seed)
    prod = yaml.safe_load(options.config.read_text())
    providers = dict(prod["providers"])
    names = sorted({*providers, *(p["kind"] for p in providers.values())})
    return run_dir, profile, mix, base_rules, prod, generate_dev_certs(run_dir / "certs", names)


async def rehearse(options: RehearsalOptions, on_progress: ProgressHook | None = None) -> dict[str, Any]:
    """Run the rehearsal end to end; the report (verdict and all it rests on)."""
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    run_id = digitless_tag()
    prefix = f"rehearse-{run_id}-"
    run_dir, profile, mix, base_rules, prod, certs = await asyncio.to_thread(_prepare, options, seed)
    prod_providers: dict[str, Any] = dict(prod["providers"])
    scenario = peak_scenario(profile.peak, quota_share_of_peak=options.quota_share_of_peak) \
        if options.scenario == "peak" else no_fault_scenario()
    started = time.monotonic()
    report: dict[str, Any] = {"profile": profile.name, "seed": seed, "run_dir": str(run_dir),
                              "config": str(options.config), "scenario": scenario.name}

    async with AsyncExitStack() as stack:
        servers: dict[str, EmulatorServer] = {}
        for name, p in prod_providers.items():
            server = await start_emulator(p["kind"], certs=certs if uses_tls(p) else None,
                                          require_client_cert=uses_mtls(p))
            stack.push_async_callback(server.stop)
            servers[name] = server
        port = free_port(HOST)
        data = rehearsal_config(prod, run_dir=run_dir, port=port, certs=certs,
                                emulator_urls={n: s.url for n, s in servers.items()})
        roles = roles_of(data)
        quotas: dict[str, float] = {}
        applied: dict[str, Any] = {}
        if scenario.quota is not None:
            q = scenario.quota
            quotas[roles[q.role]] = q.rate(profile.peak_rate)
            if scenario.gateway_quota_share is not None:
                share = scenario.gateway_quota_share
                applied = gateway_quotas(data, {roles[q.role]: (q.rate(profile.peak_rate) * share,
                                                                max(1, round(q.burst(profile.peak_rate) * share)))})
        config_path = run_dir / "gateway.yaml"
        await asyncio.to_thread(config_path.write_text, yaml.safe_dump(data, sort_keys=False))
        env, client_key = secret_env(data)
        with environment(env):  # read into SecretStr at parse time; nothing lingers
            config = parse_config(data)
        gw_args = ("--workers", str(options.workers)) if options.workers > 1 else ()
        gateway = GatewayProcess(config_path, f"http://{HOST}:{port}", env, run_dir / "gateway.log", args=gw_args)
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        for name, p in data["providers"].items():
            if p.get("webhook_key_envs"):
                servers[name].emulator.webhooks.set_target(WebhookTarget(
                    url=f"{gateway.url}/v1/webhooks/{name}", secret=WEBHOOK_DEV_SECRETS[p["kind"]],
                    time_factor=WEBHOOK_TIME_FACTOR))
        admin = await stack.enter_async_context(aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)))
        emulators = Emulators(servers, admin, base_rules)
        for name in sorted(base_rules.keys() & servers.keys()):  # the day's latency, where the log knew the provider
            await emulators.faults(name, seed=seed)
        if scenario.quota is not None:
            q = scenario.quota
            await emulators.quota(roles[q.role], q.rate(profile.peak_rate), q.burst(profile.peak_rate))
        decline_card = EMULATORS[data["providers"][roles["primary"]]["kind"]].scenario_cards()["insufficient_funds"]
        arrivals = profile.arrivals()
        planned = plan(arrivals, mix.draws(len(arrivals)), run_id, decline_card, seed)

        assert gateway.pid is not None
        progress = Progress(profile, cpu=CpuMeter(gateway.pid))
        timeout_s = config.engine.deadline_ms / 1000 + 5
        session = await stack.enter_async_context(
            client_session(gateway.url, client_key, options.max_in_flight, timeout_s))
        run_epoch = time.time()
        load_at = time.monotonic()
        stop = asyncio.Event()
        assert progress.cpu is not None
        sampler = asyncio.create_task(_sample(progress.cpu, load_at, stop, progress, on_progress))
        timeline = asyncio.create_task(run_timeline(
            scenario, profile.duration_s, roles, emulators,
            lambda name: expire_client_certificate(certs, config, name), load_at, progress.happened, seed))
        try:
            await run_load(session, planned, progress.load, max_in_flight=options.max_in_flight)
            load_s = time.monotonic() - load_at
            happened = await timeline
        finally:
            stop.set()
            timeline.cancel()
            await sampler
        for name in servers:  # the sale is over: every provider healthy again
            await emulators.outage(name, False)
            await emulators.faults(name)
        report["client_retries"] = await ask_again(session, planned, progress.load)
        sends = progress.load.sent
        report["still_pending_after_settle"] = await _settle(session, sends, time.monotonic() + options.settle_s)
        await gateway.stop()
        ledger = ledger_view(servers)

    journal = await asyncio.to_thread(read_journal, Path(config.storage.sqlite_path), prefix)
    lines = await asyncio.to_thread(read_txlog, run_dir, prefix)
    drill_scenario = DrillScenario(f"rehearse-{profile.name}", "a rehearsal", route=tuple(roles.values()))
    summary = summarize(scenario=drill_scenario, sends=[s.result for s in sends], journal=journal, ledger=ledger,
                        abandoned=progress.load.client_cap, seconds=time.monotonic() - started,
                        log_dir=str(run_dir))
    cpu_capacity = float(min(options.workers, os.cpu_count() or 1))
    windows = V.split_windows(profile.windows(), fault_marks(scenario, profile.duration_s, roles))
    stats = V.window_stats(windows, sends, journal, lines, run_epoch, progress.cpu.samples, progress.load.capped,
                           p99_target_ms=options.p99_target_ms, max_failed_share=options.max_failed_share)
    decision = V.decide(stats, cpu_capacity)
    totals = V.evidence(lines)
    latencies = [s.result.latency_ms for s in sends if s.result.http_status is not None]
    harness_max = round(max((c.cores for c in progress.harness_cpu.samples), default=0.0), 2)
    report.update({
        "max_sustained_rate": round(decision.max_sustained_rate, 2),
        "p99_ms_at_max_sustained": round(decision.p99_ms_at_max, 1) if decision.p99_ms_at_max is not None else None,
        "p99_target_ms": options.p99_target_ms,
        "limited_by": decision.limited_by,
        "limited_by_detail": decision.limited_by_detail,
        "limiting_window": decision.limiting_window,
        "peak_rate": round(profile.peak_rate, 2),
        "duplicates": summary["duplicates"],
        "lost": summary["lost"],
        "journal_mismatches": summary["journal_mismatches"],
        "failed_by_429": totals.failed_by_429 + sum(1 for s in sends if s.result.http_status == 429),
        "spilled_over": sum(totals.spilled_over.values()),
        "spilled_over_by_reason": dict(totals.spilled_over),
        "provider_429s": dict(totals.provider_429s),
        "failover_cost": V.failover_cost_ms(lines),
        "suggestions": V.suggestions(stats, data, peak_rate=profile.peak_rate, quotas=quotas,
                                     gateway_quotas=applied, workers=options.workers, cpu_capacity=cpu_capacity,
                                     p99_target_ms=options.p99_target_ms),
        "sent": summary["sent"], "approved": summary["approved"], "declined": summary["declined"],
        "pending": summary["pending"], "failed": summary["failed"],
        "shed": sum(1 for s in sends if s.result.error == "overloaded"),
        "client_cap": progress.load.client_cap,
        "failovers": summary["failovers"],
        "approval_rate": summary["approval_rate"],
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "gateway_cpu_max_cores": round(max((c.cores for c in progress.cpu.samples), default=0.0), 2),
        "harness_cpu_max_cores": harness_max,
        "caveats": [f"the rehearsal's own process (load generator and emulators) reached {harness_max} cores: "
                    "part of the latency may be the harness's, not the gateway's"] if harness_max >= HARNESS_BUSY
        else [],
        "provider_quotas": {n: round(r, 2) for n, r in quotas.items()},
        "gateway_quotas": applied,
        "timeline": happened,
        "windows": [s.as_dict() for s in stats],
        "txlog": str(run_dir / "transactions.jsonl"),
        "txlog_payments": len(lines),
        "load_seconds": round(load_s, 2),
        "seconds": round(time.monotonic() - started, 2),
        "checks": summary["checks"],
        "ok": summary["ok"],
    })
    await asyncio.to_thread((run_dir / "verdict.json").write_bytes, orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report
