"""The crash-restart drill: the gateway as its own process, killed with SIGKILL under load.

1. Dev certificates and the three emulators in the drill process (mTLS, loopback), with the
   scenario's faults: slow authorisations at the primary and the first backup, so many payments
   are mid-call when the process dies, some that charge and then hang, some 503s that fail over.
2. The gateway runs as `python -m gateway.cli serve --config <log_dir>/gateway.yaml` on a fixed
   loopback port; its secrets are in the child's environment only.
3. N payments at concurrency C. The client behaves like a checkout: while the gateway is down
   (connection refused or cut) or answers 409 (the key is still being processed) or 503, it
   retries with the SAME Idempotency-Key and body, with full-jitter backoff or the answer's
   Retry-After, for at most PAYMENT_MAX_TRIES tries and PAYMENT_MAX_S seconds per payment.
4. K times, at seeded random points of the run (when a random share of payments in
   KILL_WINDOW has been answered, plus a random delay under KILL_JITTER_S), the process is
   SIGKILLed; the journal is read to count what the crash left unresolved; the gateway is
   started again on the same port, database and log directory. Its start-up pass reconciles
   before it serves; the periodic reconciler runs after.
5. After the load the client settles what it holds: GET /v1/payments/{id} for a pending
   answer, the same POST again for a key that got no payment answer, until nothing is open or
   SETTLE_MAX_S passes. The gateway is stopped (SIGTERM), every ledger is read and compared
   with the journal.

Besides the invariants every drill checks (no duplicate charge per checkout payment, nothing
lost, no charge without an approved or pending journal record), this one checks that every
kill was followed by a restart, that no final answer the client got contradicts the journal, and
that every charge is at the provider the journal names. Latencies are per checkout payment,
first try to first payment answer, retries and downtime included.
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from gateway.certs.devca import generate_dev_certs
from gateway.drill.process import GatewayProcess, free_port
from gateway.drill.report import FINAL_OR_PENDING, SendResult, charges_of, summarize
from gateway.drill.runner import (
    HOST,
    DrillOptions,
    DrillReport,
    PlannedPayment,
    ProgressHook,
    RunSetup,
    answer_result,
    client_session,
    drill_config_data,
    inject_faults,
    ledger_view,
    lift_faults,
    plan_payments,
    point_webhooks,
    post_payment,
    read_journal,
    secret_env,
    start_emulators,
)
from gateway.drill.follow_ups import FollowUpTarget, run_follow_ups
from gateway.drill.scenarios import CRASH_RESTART, Scenario

KILL_WINDOW = (0.1, 0.75)  # a kill lands once this share of the payments has been answered ...
KILL_JITTER_S = 0.15  # ... plus a random delay up to this, so it falls mid-call, not between answers
PAYMENT_MAX_TRIES = 200
PAYMENT_MAX_S = 60.0  # one checkout payment: same key, at most this long
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0
RETRY_AFTER_MAX_S = 2.0
SETTLE_MAX_S = 45.0  # after the load: how long the client keeps asking about open payments
SETTLE_PAUSE_S = 0.5
FINAL = frozenset({"approved", "declined", "failed"})
UNRESOLVED = ("received", "attempting", "pending", "capture_pending", "void_pending", "refund_pending")
RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})  # without a payment in the answer


def _worth_retrying(result: SendResult) -> bool:
    """No payment answer yet, for a reason that can pass: the gateway was down or cut the
    connection, still holds the key in flight (409), or sheds load (503)."""
    if result.payment_id is not None:
        return False
    return result.http_status is None or result.http_status in RETRY_STATUSES


@dataclass(slots=True)
class Checkout:
    """What the checkout client knows about one payment (one Idempotency-Key)."""

    payment: PlannedPayment
    result: SendResult | None = None
    first_status: str | None = None  # the first payment answer: approved / declined / pending / failed
    tries: int = 0
    connection_errors: int = 0
    in_use: int = 0  # 409 idempotency_key_in_use answers
    shed: int = 0  # other 5xx answers without a payment

    def note(self, result: SendResult) -> None:
        self.tries += 1
        if result.http_status is None:
            self.connection_errors += 1
        elif result.payment_id is None and result.http_status == 409:
            self.in_use += 1
        elif result.payment_id is None and result.http_status >= 500:
            self.shed += 1
        if result.payment_id is not None and self.first_status is None:
            self.first_status = result.status

    @property
    def open(self) -> bool:
        r = self.result
        return r is not None and (r.status == "pending" or _worth_retrying(r))


class Progress:
    """Answered payments (however they ended) and client requests in flight."""

    def __init__(self, total: int, hook: ProgressHook | None) -> None:
        self.total = total
        self.done = 0
        self.in_flight = 0
        self.closed = False
        self._hook = hook
        self._changed = asyncio.Condition()

    async def finished_one(self) -> None:
        self.done += 1
        if self._hook is not None:
            self._hook(self.done, self.total)
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        self.closed = True
        async with self._changed:
            self._changed.notify_all()

    async def reached(self, count: int) -> None:
        """Until `count` payments were answered, or the load is over."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.done >= count or self.closed)


async def pay_until_answered(session: aiohttp.ClientSession, checkout: Checkout, rng: random.Random, progress: Progress) -> None:
    started = time.perf_counter()
    give_up = time.monotonic() + PAYMENT_MAX_S
    backoff = BACKOFF_MIN_S
    while True:
        progress.in_flight += 1
        try:
            result, retry_after = await post_payment(session, checkout.payment)
        finally:
            progress.in_flight -= 1
        checkout.note(result)
        if not _worth_retrying(result):
            break
        if retry_after is not None:
            delay = min(retry_after, RETRY_AFTER_MAX_S)
        else:
            delay = rng.uniform(0, backoff)  # full jitter: the restarted gateway is not stampeded
            backoff = min(BACKOFF_MAX_S, backoff * 2)
        if checkout.tries >= PAYMENT_MAX_TRIES or time.monotonic() + delay > give_up:
            break
        await asyncio.sleep(delay)
    checkout.result = replace(result, latency_ms=(time.perf_counter() - started) * 1000)
    await progress.finished_one()


async def _load(session: aiohttp.ClientSession, checkouts: Sequence[Checkout], concurrency: int,
                max_seconds: float, rng: random.Random, progress: Progress) -> None:
    """C workers take payments in order until the plan is done or the time cap passes."""
    pending = iter(checkouts)
    cap_at = time.monotonic() + max_seconds

    async def worker() -> None:
        for checkout in pending:
            if time.monotonic() >= cap_at:
                return
            await pay_until_answered(session, checkout, rng, progress)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(checkouts)))))


def _unresolved_in_journal(db: Path) -> int | None:
    """Payments the dead process left received, attempting or pending (read-only; None when
    the file cannot be read that way)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
        try:
            row = conn.execute(f"SELECT count(*) FROM payments WHERE status IN {UNRESOLVED!r}").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return int(row[0])


async def _kill_loop(gateway: GatewayProcess, kills: int, rng: random.Random, progress: Progress,
                     db: Path) -> list[dict[str, Any]]:
    """Kill and restart the gateway `kills` times at seeded points; one record per kill."""
    points = sorted(rng.uniform(*KILL_WINDOW) for _ in range(kills))
    records: list[dict[str, Any]] = []
    for point in points:
        target = max(1, math.ceil(point * progress.total))
        await progress.reached(target)
        delay = rng.uniform(0, KILL_JITTER_S)
        await asyncio.sleep(delay)
        record: dict[str, Any] = {"at_answered": progress.done, "target_answered": target,
                                  "delay_ms": round(delay * 1000, 1), "client_requests_in_flight": progress.in_flight,
                                  "under_load": not progress.closed}
        killed = time.monotonic()
        await gateway.kill()
        record["unresolved_in_journal"] = await asyncio.to_thread(_unresolved_in_journal, db)
        await gateway.start()
        record["downtime_ms"] = round((time.monotonic() - killed) * 1000, 1)
        records.append(record)
    return records


async def _under_kills(gateway: GatewayProcess, kills: int, rng: random.Random, progress: Progress, db: Path,
                       work: Awaitable[None]) -> list[dict[str, Any]]:
    """Run `work` while the kill loop kills and restarts the gateway; a restart that fails ends
    the work too."""
    try:
        async with asyncio.TaskGroup() as group:
            killer = group.create_task(_kill_loop(gateway, kills, rng, progress, db))
            group.create_task(work)
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return killer.result()


async def _follow_ups_under_kills(session: aiohttp.ClientSession, gateway: GatewayProcess,
                                  checkouts: Sequence[Checkout], options: DrillOptions, rng: random.Random, db: Path,
                                  run_id: str, seed: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """followup-crash: capture and partly refund every approved payment while the gateway is
    killed at seeded points of this phase."""
    targets = [FollowUpTarget(c.result.payment_id, c.payment.amount, f"drill-{run_id}-{c.payment.index:06d}")
               for c in checkouts if c.result is not None and c.result.payment_id is not None
               and c.result.status == "approved"]
    progress = Progress(len(targets), None)

    async def follow_ups() -> None:
        try:
            tally = await run_follow_ups(session, targets, options.concurrency, seed, on_done=progress.finished_one)
        finally:
            await progress.close()
        extra.update(tally.as_summary())

    return await _under_kills(gateway, options.kills, rng, progress, db, follow_ups())


async def _recheck(session: aiohttp.ClientSession, checkout: Checkout) -> None:
    """Ask again about an open payment: its document when we know its id, else the same POST."""
    assert checkout.result is not None
    current = checkout.result
    if current.payment_id is None:
        result, _retry_after = await post_payment(session, checkout.payment)
        checkout.note(result)
        if result.payment_id is not None or not _worth_retrying(result):
            checkout.result = replace(result, latency_ms=current.latency_ms)
        return
    try:
        async with session.get(f"/v1/payments/{current.payment_id}") as response:
            raw, status = await response.read(), response.status
    except (aiohttp.ClientError, TimeoutError):
        return
    result = answer_result(checkout.payment, current.latency_ms, status, raw)
    if status == 200 and result.status in FINAL:
        checkout.result = replace(result, http_status=current.http_status)


async def settle_all(session: aiohttp.ClientSession, checkouts: Sequence[Checkout], concurrency: int) -> dict[str, int]:
    """Until no payment is open or SETTLE_MAX_S passes; what it took."""
    until = time.monotonic() + SETTLE_MAX_S
    open_at_start = sum(1 for c in checkouts if c.open)
    gate = asyncio.Semaphore(concurrency)
    rounds = 0

    async def one(checkout: Checkout) -> None:
        async with gate:
            await _recheck(session, checkout)

    while time.monotonic() < until:
        still_open = [c for c in checkouts if c.open]
        if not still_open:
            break
        rounds += 1
        await asyncio.gather(*(one(c) for c in still_open))
        if any(c.open for c in still_open):
            await asyncio.sleep(SETTLE_PAUSE_S)
    return {"open_after_load": open_at_start, "settle_rounds": rounds,
            "open_after_settling": sum(1 for c in checkouts if c.open)}


def _answers_contradicting_journal(checkouts: Sequence[Checkout], by_id: Mapping[str, Mapping[str, Any]]) -> int:
    """Final answers the client holds that the journal disagrees with."""
    contradicting = 0
    for c in checkouts:
        r = c.result
        if r is None or r.payment_id is None or r.status not in FINAL:
            continue
        doc = by_id.get(r.payment_id)
        if doc is None or doc.get("status") != r.status:
            contradicting += 1
    return contradicting


def charged_at_other_provider(charges: Mapping[str, Sequence[str]], by_id: Mapping[str, Mapping[str, Any]]) -> int:
    """Charges at a provider other than the one the journal says holds the payment."""
    return sum(1 for pid, providers in charges.items()
               if pid in by_id and any(p != by_id[pid].get("provider") for p in providers))


def _transaction_log_gaps(path: Path, journal: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Journalled payments with no transaction-log line at all (a crash can cut the writer's
    queue), and payments with more than one `payment` line."""
    payment_lines: dict[str, int] = {}
    seen: set[str] = set()
    try:
        with path.open("rb") as lines:
            for line in lines:
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                pid = doc.get("payment_id")
                if isinstance(pid, str):
                    seen.add(pid)
                    if doc.get("event") == "payment":
                        payment_lines[pid] = payment_lines.get(pid, 0) + 1
    except FileNotFoundError:
        pass
    return {
        "txlog_missing": sum(1 for d in journal if d["id"] not in seen and d.get("status") in FINAL_OR_PENDING),
        "txlog_payment_lines_repeated": sum(1 for n in payment_lines.values() if n > 1),
    }


async def run_crash_drill(options: DrillOptions | None = None, *, scenario: Scenario = CRASH_RESTART,
                          on_progress: ProgressHook | None = None) -> DrillReport:
    """Run crash-restart (or followup-crash: the kills land in the follow-up phase) end to end
    and summarise it; raises only for set-up failures."""
    options = options if options is not None else DrillOptions()
    setup = RunSetup.new(scenario.name, options)
    started = time.monotonic()
    certs = await asyncio.to_thread(generate_dev_certs, setup.log_dir / "certs", list(scenario.route))
    plan = plan_payments(scenario, options.payments, setup.run_id, setup.seed)
    checkouts = [Checkout(p) for p in plan]
    kill_rng, client_rng = random.Random(setup.seed), random.Random(setup.seed + 1)
    db = setup.log_dir / "gateway.db"
    extra: dict[str, Any] = {"seed": setup.seed, "run_id": setup.run_id, "kills_requested": options.kills}

    async with AsyncExitStack() as stack:
        servers = await start_emulators(stack, scenario.route, certs)
        port = free_port(HOST)
        data = drill_config_data(scenario, servers, certs, setup.log_dir, options.concurrency, port=port)
        config_path = setup.log_dir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        gateway = GatewayProcess(config_path, f"http://{HOST}:{port}", secret_env(scenario, setup.client_key),
                                 setup.log_dir / "gateway-process.log")
        stack.push_async_callback(gateway.kill)  # whatever happens, no gateway outlives the drill
        point_webhooks(servers, gateway.url)  # a delivery refused while it is down is retried later
        await gateway.start()
        progress = Progress(len(checkouts), on_progress)
        async with client_session(gateway.url, setup.client_key, options.concurrency) as session:
            injections = await inject_faults(scenario, servers, setup.seed)

            async def load() -> None:
                load_started = time.monotonic()
                try:
                    await _load(session, checkouts, options.concurrency, options.max_seconds, client_rng, progress)
                finally:
                    await progress.close()  # kills still due happen now, at idle, and say so
                extra["load_seconds"] = round(time.monotonic() - load_started, 3)

            try:
                if scenario.follow_ups:
                    await load()
                    extra.update(await settle_all(session, checkouts, options.concurrency))
                    kill_records = await _follow_ups_under_kills(
                        session, gateway, checkouts, options, kill_rng, db, setup.run_id, setup.seed, extra)
                else:
                    kill_records = await _under_kills(gateway, options.kills, kill_rng, progress, db, load())
            finally:
                await lift_faults(injections)
            extra.update(await settle_all(session, checkouts, options.concurrency))
        extra["gateway_exit_code"] = await gateway.stop()
        ledger = ledger_view(servers)
        charges = charges_of(ledger)

    journal = await asyncio.to_thread(read_journal, db, setup.reference_prefix)
    by_id = {d["id"]: d for d in journal}
    sends = [c.result for c in checkouts if c.result is not None]
    answered = [c for c in checkouts if c.result is not None]
    extra.update({
        "kills": len(kill_records),
        "kills_under_load": sum(1 for k in kill_records if k["under_load"]),
        "restarts": gateway.starts - 1,
        "kill_points": kill_records,
        "unresolved_at_kills": sum(k["unresolved_in_journal"] or 0 for k in kill_records),
        "client_tries": sum(c.tries for c in answered),
        "client_retries": sum(max(0, c.tries - 1) for c in answered),
        "keys_retried": sum(1 for c in answered if c.tries > 1),
        "connection_errors": sum(c.connection_errors for c in answered),
        "answers_409": sum(c.in_use for c in answered),
        "answers_5xx_without_payment": sum(c.shed for c in answered),
        "pending_answers": sum(1 for c in answered if c.first_status == "pending"),
        "answers_contradicting_journal": _answers_contradicting_journal(answered, by_id),
        "charged_at_other_provider": charged_at_other_provider(charges, by_id),
        **_transaction_log_gaps(setup.log_dir / "transactions.jsonl", journal),
    })
    summary = summarize(scenario=scenario, sends=sends, journal=journal, ledger=ledger,
                        abandoned=len(plan) - len(sends), seconds=time.monotonic() - started,
                        log_dir=str(setup.log_dir), extra=extra)
    return DrillReport(summary)

