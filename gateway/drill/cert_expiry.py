"""The cert-expiry drill: the primary's mTLS client certificate expires mid-run.

The gateway runs in this process (as in `run_drill`) so the drill can drive its certificate
watcher (`CERT_WATCHER`) the way its timer would, without waiting a real interval. Payments flow
at concurrency C through four phases, each payment tagged with the phase it *started* in:

* `before`: the dev pair, valid for a year; the primary carries the payments.
* `expiring`: a pair that expires about EXPIRES_IN_S from now, issued by the dev CA
  (`issue_dev_pair`) and installed over the primary's client certificate files as `gateway certs
  issue-dev` does (unvalidated, the old pair kept as `.prev`); the watcher loads it (it is valid
  now). This phase's payments are spread over the time the pair has left; once its not-after
  has passed, a watcher pass marks the provider (`certificate_problem`), and a fresh handshake
  with the pair in service is shown to be refused by the provider.
* `during`: the router skips the primary before any call; the backups carry everything.
* `after`: a fresh pair rotated in with `gateway.certs.rotate` (validated, swapped, previous kept),
  a watcher pass loads it and clears the mark, without a restart; the primary carries the
  payments again.

The summary adds `phases` (per phase: sent, answers and `charges_by_provider`) and
`certificate` (what the watcher reported at each step) to the usual fields.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app_keys import POOL
from gateway.certs.devca import DevCertLayout, generate_dev_certs, issue_dev_pair
from gateway.certs.rotate import install_pair, provider_target, rotate
from gateway.app_keys import CERT_WATCHER
from gateway.certs.watcher import CertificateWatcher
from gateway.config import GatewayConfig
from gateway.drill.report import SendResult, charges_of, summarize
from gateway.drill.runner import (
    DrillOptions,
    DrillReport,
    PlannedPayment,
    ProgressHook,
    RunSetup,
    client_session,
    ledger_view,
    plan_payments,
    read_journal,
    send_one,
    start_emulators,
    start_gateway_in_process,
)
from gateway.drill.scenarios import CERT_EXPIRY
from gateway.provider_pool import ProviderHandle

PHASES = ("before", "expiring", "during", "after")
SHARES = {"before": 0.2, "expiring": 0.2, "during": 0.3, "after": 0.3}  # of --payments
EXPIRES_IN_S = 2.5  # validity of the staged pair (x509 keeps whole seconds: its real end, 1.5-2.5 s, is read back)
EXPIRY_MARGIN_S = 0.1  # past not-after before the watcher pass, so it sees the pair expired
EXPIRING_PACE_MIN_S = 0.002  # `expiring` payments are spread over the time the staged pair has left
PRIMARY_USABLE_WAIT_S = 5.0  # after rotation: at most this for the primary's breaker to admit calls
PROBE_TIMEOUT_S = 3.0
PROBE_PATH = "/"


@dataclass(frozen=True, slots=True)
class _Tagged:
    phase: str
    result: SendResult


class _PhasedLoad:
    """C workers sending whatever is queued; the drill queues payments phase by phase."""

    def __init__(self, session: aiohttp.ClientSession, plan: Iterator[PlannedPayment], concurrency: int,
                 total: int, on_progress: ProgressHook | None) -> None:
        self._session = session
        self._plan = plan
        self._queue: asyncio.Queue[tuple[PlannedPayment, str]] = asyncio.Queue(maxsize=concurrency * 2)
        self._workers = [asyncio.create_task(self._work(), name=f"drill-sender-{i}") for i in range(concurrency)]
        self._total = total
        self._on_progress = on_progress
        self.results: list[_Tagged] = []

    async def _work(self) -> None:
        while True:
            payment, phase = await self._queue.get()
            try:
                self.results.append(_Tagged(phase, await send_one(self._session, payment)))
                if self._on_progress is not None:
                    self._on_progress(len(self.results), self._total)
            finally:
                self._queue.task_done()

    async def queue(self, phase: str, count: int = 1) -> None:
        for _ in range(count):
            await self._queue.put((next(self._plan), phase))

    async def drain(self) -> None:
        await self._queue.join()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


async def _handshake_accepted(ctx: ssl.SSLContext, url: str) -> bool:
    """Whether the provider accepts a fresh mTLS session made from `ctx` (the gateway's live
    context for it): any HTTP answer means yes; a refused handshake or session means no."""
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as s:
        try:
            async with s.get(url + PROBE_PATH) as response:
                await response.read()
                return True
        except (aiohttp.ClientError, ssl.SSLError, ConnectionError, TimeoutError):
            return False


def _stage_expiring_pair(layout: DevCertLayout, config: GatewayConfig, provider: str) -> datetime:
    """Install a pair that runs out in EXPIRES_IN_S over the provider's live files; its not-after."""
    cert_pem, key_pem = issue_dev_pair(layout, usage="client", common_name=f"gateway-client-{provider}",
                                       days_valid=EXPIRES_IN_S / 86_400)
    result = install_pair(provider_target(config, provider), cert_pem, key_pem, now=datetime.now(UTC))
    assert result.installed.not_after is not None
    return result.installed.not_after


def _rotate_fresh_pair(layout: DevCertLayout, config: GatewayConfig, provider: str) -> str:
    """What `gateway certs rotate PROVIDER --cert … --key …` does with a new year-long pair."""
    cert_pem, key_pem = issue_dev_pair(layout, usage="client", common_name=f"gateway-client-{provider}",
                                       days_valid=365)
    return rotate(provider_target(config, provider), cert_pem, key_pem, now=datetime.now(UTC)).installed.serial


def _client_report(reports: Sequence[Any], provider: str) -> dict[str, Any]:
    for r in reports:
        if r.provider == provider and r.kind == "client":
            return {"status": r.status.value, "serial": r.serial, "days_left": round(r.days_left, 6),
                    "error": r.error}
    return {}


async def _primary_usable(handle: ProviderHandle, until: float) -> str | None:
    """Wait (bounded) until the router may send the primary a call; the reason if it may not."""
    while (reason := handle.unusable_reason()) is not None and time.monotonic() < until:
        await asyncio.sleep(0.05)
    return reason


def _phase_summary(tagged: Sequence[_Tagged], charges: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    phases: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        sends = [t.result for t in tagged if t.phase == phase]
        by_provider = Counter(p for s in sends if s.payment_id for p in charges.get(s.payment_id, ()))
        statuses = Counter(s.status or "no_payment" for s in sends)
        phases[phase] = {"sent": len(sends), "answers": dict(sorted(statuses.items())),
                         "charges_by_provider": dict(sorted(by_provider.items()))}
    return phases


def _attempt_counts(journal: Sequence[Mapping[str, Any]], primary: str) -> dict[str, int]:
    skipped = tls = 0
    for doc in journal:
        for a in doc.get("attempts", ()):
            if a.get("provider") != primary:
                continue
            if a.get("outcome") == "skipped" and a.get("raw_code") == "client_certificate_expired":
                skipped += 1
            if str(a.get("raw_code") or "").startswith("tls_"):
                tls += 1
    return {"primary_skipped_for_certificate": skipped, "primary_tls_failures": tls}


async def run_cert_expiry_drill(options: DrillOptions | None = None, *,
                                on_progress: ProgressHook | None = None) -> DrillReport:
    """Run cert-expiry end to end and summarise it; raises only for set-up failures."""
    options = options if options is not None else DrillOptions()
    scenario = CERT_EXPIRY
    primary = scenario.primary
    setup = RunSetup.new(scenario.name, options)
    started = time.monotonic()
    certs = await asyncio.to_thread(generate_dev_certs, setup.log_dir / "certs", list(scenario.route))
    counts = {phase: max(1, round(options.payments * share)) for phase, share in SHARES.items()}
    total = sum(counts.values())
    plan = plan_payments(scenario, total, setup.run_id, setup.seed)
    cert: dict[str, Any] = {"provider": primary}
    extra: dict[str, Any] = {"seed": setup.seed, "run_id": setup.run_id, "certificate": cert}

    async with AsyncExitStack() as stack:
        servers = await start_emulators(stack, scenario.route, certs)
        gateway = await start_gateway_in_process(stack, scenario, setup, servers, certs, options.concurrency)
        watcher: CertificateWatcher = gateway.app[CERT_WATCHER]
        handle = gateway.app[POOL][primary]
        assert handle.ssl_context is not None, "the drill's providers speak mTLS"
        session = await stack.enter_async_context(client_session(gateway.url, setup.client_key, options.concurrency))
        load = _PhasedLoad(session, iter(plan), options.concurrency, total, on_progress)
        stack.push_async_callback(load.close)

        await load.queue("before", counts["before"])
        await load.drain()

        not_after = await asyncio.to_thread(_stage_expiring_pair, certs, gateway.config, primary)
        cert["staged_not_after"] = not_after.isoformat()
        cert["staged"] = _client_report(await watcher.reload_now(), primary)
        cert["problem_while_valid"] = handle.certificate_problem
        left_s = (not_after - datetime.now(UTC)).total_seconds()
        pace_s = max(EXPIRING_PACE_MIN_S, left_s / counts["expiring"])
        for _ in range(counts["expiring"]):  # payments keep flowing while the pair runs out
            await load.queue("expiring")
            await asyncio.sleep(pace_s)
        await asyncio.sleep(max(0.0, (not_after - datetime.now(UTC)).total_seconds() + EXPIRY_MARGIN_S))
        noticed = time.monotonic()
        cert["expired"] = _client_report(await watcher.reload_now(), primary)
        cert["problem_while_expired"] = handle.certificate_problem
        cert["watcher_pass_ms"] = round((time.monotonic() - noticed) * 1000, 1)
        cert["provider_accepts_expired_pair"] = await _handshake_accepted(handle.ssl_context, servers[primary].url)
        await load.drain()

        await load.queue("during", counts["during"])
        await load.drain()

        cert["rotated_serial"] = await asyncio.to_thread(_rotate_fresh_pair, certs, gateway.config, primary)
        cert["rotated"] = _client_report(await watcher.reload_now(), primary)
        cert["problem_after_rotation"] = handle.certificate_problem
        cert["provider_accepts_rotated_pair"] = await _handshake_accepted(handle.ssl_context, servers[primary].url)
        waited = time.monotonic()
        cert["primary_unusable_after_wait"] = await _primary_usable(handle, waited + PRIMARY_USABLE_WAIT_S)
        cert["primary_wait_ms"] = round((time.monotonic() - waited) * 1000, 1)
        await load.queue("after", counts["after"])
        await load.drain()
        ledger = ledger_view(servers)
        charges = charges_of(ledger)

    journal = await asyncio.to_thread(read_journal, Path(gateway.config.storage.sqlite_path), setup.reference_prefix)
    extra["phases"] = _phase_summary(load.results, charges)
    extra.update(_attempt_counts(journal, primary))
    summary = summarize(scenario=scenario, sends=[t.result for t in load.results], journal=journal, ledger=ledger,
                        abandoned=0, seconds=time.monotonic() - started, log_dir=str(setup.log_dir), extra=extra)
    return DrillReport(summary)
