"""The fleet drill: real gateway processes behind a real HAProxy, on one PostgreSQL and one
Redis, with the faults an SRE would try, and the books checked afterwards.

1. Dev certificates and the three emulators in the drill process (mTLS, loopback); a Redis of
   the drill's own on a free port (so it can be stopped and started); a fresh schema in the
   PostgreSQL server (`GATEWAY_DRILL_PG_DSN`, else the test DSN), migrated by `gateway db
   migrate --to` to one step behind this release when its last steps are deferrable (indexes:
   the release serves without them), so the drill can apply a migration live.
2. `--replicas` gateway processes (`gateway serve`, `--workers N` each when asked), each with its
   own configuration file, port and log directory (small rotation size, so files rotate under
   load), `auto_migrate: false` as in production, breaker sync through the drill's Redis; HAProxy
   in the foreground in front of them, health-checking `/readyz`.
3. N payments through HAProxy, paced over at least MIN_LOAD_S so every event lands under load,
   at concurrency C; the client retries each with its Idempotency-Key as a checkout does
   (gateway.drill.crash). Every approved payment is captured and a third refunded: one payment
   in RACE_EVERY has its capture and its refund sent at the same moment to two different
   replicas directly (the refund that finds the capture still running is answered 409 and sent
   again, with a new key, once the capture is answered); the others go through HAProxy.
4. Mid-run, at fixed shares of the planned load time, in order: the primary refuses connections
   (each replica's /readyz is polled, per new connection, until it shows the primary's breaker
   tripped: the spread between the first and the last replica is `breaker_spread_ms`), then
   comes back; one replica is SIGKILLed (supervisor and workers at once) and restarted; Redis is
   stopped and restarted empty; the fleet's PostgreSQL sessions are terminated
   (`pg_terminate_backend` on the sessions its processes hold); `gateway db migrate` runs while
   the fleet serves, then each replica is drained in HAProxy, stopped (SIGTERM), started and put
   back, one at a time.
5. After the load, the reconciler's work is waited for (nothing unresolved in the journal), the
   client settles what it holds, the fleet stops; the journal, every ledger and every replica's
   transaction-log files are compared (gateway.drill.report, gateway.drill.fleet_report). Every
   answer the client got, retries included, is counted by status (`http_500`).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import yaml

from emulators.server import EmulatorServer
from gateway.certs.devca import DevCertLayout, generate_dev_certs
from gateway.drill.crash import (
    charged_at_other_provider,
    Checkout,
    pay_until_answered,
    Progress,
    settle_all,
)
from gateway.drill.fleet_report import (
    read_lines,
    read_postgres_journal,
    schema_version,
    transaction_files,
    txlog_figures,
    unresolved_count,
)
from gateway.drill.fleet_services import (
    HAProxy,
    Backend,
    FleetSetupError,
    RedisServer,
    gone,
    kill_tree,
    postgres_schema,
    process_tree,
    terminate_backends,
)
from gateway.drill.follow_ups import PENDING_STATUSES, FollowUpTally, FollowUpTarget, post_follow_up, await_settled, run_follow_ups
from gateway.drill.process import GatewayProcess, free_port, run_gateway_command
from gateway.drill.report import charges_of, summarize
from gateway.drill.runner import (
    HOST,
    DrillOptions,
    DrillReport,
    PlannedPayment,
    ProgressHook,
    RunSetup,
    client_session,
    drill_config_data,
    inject_faults,
    ledger_view,
    lift_faults,
    plan_payments,
    point_webhooks,
    secret_env,
    start_emulators,
    webhooks_idle,
)
from gateway.drill.scenarios import FLEET, Scenario
from gateway.journal.schema import migrations

DEFAULT_PG_DSN = "postgresql://gateway:gateway@127.0.0.1:5432/gateway_test"
PG_DSN_ENV = "GATEWAY_DRILL_PG_DSN"
REDIS_URL_ENV = "GATEWAY_DRILL_REDIS_URL"
POOL_MAX = 4  # per process: replicas x workers x 4 stays far below a shared server's max_connections
LOG_MAX_BYTES = 64 * 1024  # small (about 50 lines), so every replica's log rotates (and gzips) under load
MIN_LOAD_S = 20.0  # the payments are spread over at least this long ...
PACE_PER_S = 60.0  # ... or N / this, so every event below lands under load
RACE_EVERY = 3  # one approved payment in this many: capture and refund at once, via two replicas
BREAKER_WATCH_S = 10.0
BREAKER_POLL_S = 0.02
DRAIN_MAX_S = 10.0
SETTLE_MAX_S = 60.0  # after the load: how long the reconciler may take to settle what is left
# When each event starts, as a share of the planned load time (an event that runs long delays
# the next; one due after the load ends runs at idle, and its record says so).
OUTAGE_AT, OUTAGE_END_AT = 0.10, 0.22
KILL_AT = 0.30
REDIS_STOP_AT, REDIS_START_AT = 0.42, 0.50
PG_TERMINATE_AT = 0.58
MIGRATE_AT = 0.66


@dataclass(slots=True)
class Replica:
    name: str
    port: int
    log_dir: Path
    config_path: Path
    process: GatewayProcess

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.process.running and self.process.pid else []


class Fleet:
    """The replicas, HAProxy in front, and what the drill does to them."""

    def __init__(self, replicas: list[Replica], haproxy: HAProxy, env: Mapping[str, str], log_dir: Path) -> None:
        self.replicas = replicas
        self.haproxy = haproxy
        self.env = env
        self.log_dir = log_dir

    async def start(self) -> None:
        await asyncio.gather(*(r.process.start() for r in self.replicas))
        await self.haproxy.start()
        for r in self.replicas:
            await self.haproxy.ready(r.name, DRAIN_MAX_S)

    async def stop(self) -> None:
        await self.haproxy.stop()
        await asyncio.gather(*(r.process.stop() for r in self.replicas))

    async def kill(self, replica: Replica) -> None:
        """SIGKILL the replica's supervisor and workers at once, and reap them."""
        pids = replica.pids()
        kill_tree(pids)
        await replica.process.kill()
        await gone(pids)

    async def migrate(self, target: int | None = None) -> int:
        args = ["db", "migrate", "--config", str(self.replicas[0].config_path)]
        if target is not None:
            args += ["--to", str(target)]
        return await run_gateway_command(args, self.env, self.log_dir / "migrate.log")

    def pids(self) -> list[int]:
        return [pid for r in self.replicas for pid in r.pids()]


def _replica_config(scenario: Scenario, setup: RunSetup, servers: Mapping[str, EmulatorServer], certs: DevCertLayout,
                    log_dir: Path, port: int, concurrency: int) -> dict[str, Any]:
    data = drill_config_data(scenario, servers, certs, log_dir, concurrency, port=port)
    data["storage"] = {
        "backend": "postgres", "postgres_dsn_env": PG_DSN_ENV, "auto_migrate": False, "start_wait_s": 30,
        "probe_interval_s": 0.5,
        "postgres_pool": {"min_size": 1, "max_size": POOL_MAX, "acquire_timeout_s": 2, "command_timeout_s": 5,
                          "connect_timeout_s": 2},
    }
    data["breaker_sync"] = {"backend": "redis", "redis_url_env": REDIS_URL_ENV,
                            "channel_prefix": f"gateway:drill:{setup.run_id}"}
    data["log"] = {"dir": str(log_dir), "file": "transactions.jsonl", "max_bytes": LOG_MAX_BYTES}
    return data


def _starting_version() -> tuple[int, int]:
    """(the version the fleet starts on, the latest): one behind when the last step is
    deferrable (this release serves without it), else the latest (the live migration is then
    a no-op, and the record says so)."""
    steps = migrations("postgres")
    latest = len(steps)
    return (latest - 1 if steps[-1].deferrable else latest), latest


class _Answers:
    """Every answer the client got, retries included, by HTTP status (a TraceConfig)."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_end.append(self._ended)

    async def _ended(self, _session: aiohttp.ClientSession, _ctx: SimpleNamespace,
                     params: aiohttp.TraceRequestEndParams) -> None:
        self.statuses[params.response.status] += 1


class _FollowUps:
    """Captures and refunds of approved payments while the load goes on."""

    def __init__(self, via_lb: aiohttp.ClientSession, direct: Sequence[aiohttp.ClientSession], seed: int) -> None:
        self.via_lb = via_lb
        self.direct = direct
        self.tally = FollowUpTally(Counter(), Counter())
        self.racing: list[str] = []
        self.race_refund_409 = 0
        self._rng = random.Random(seed)
        self._seed = seed

    async def one(self, target: FollowUpTarget, index: int) -> None:
        if index % RACE_EVERY == 0:
            await self._race(target, index)
            return
        done = await run_follow_ups(self.via_lb, [target], 1, self._seed + index)
        self.tally.sent.update(done.sent)
        self.tally.answers.update(done.answers)
        self.tally.tries += done.tries

    async def _race(self, target: FollowUpTarget, index: int) -> None:
        """Capture via one replica and refund via another, sent at the same moment."""
        self.racing.append(target.payment_id)
        a, b = self.direct[index % len(self.direct)], self.direct[(index + 1) % len(self.direct)]
        base = f"/v1/payments/{target.payment_id}"
        captured = asyncio.Event()

        async def follow_up(session: aiohttp.ClientSession, op: str, path: str, body: dict[str, object],
                            key: str) -> tuple[int | None, dict[str, object]]:
            self.tally.sent[op] += 1
            status, doc = await post_follow_up(session, path, body, key, self.tally, self._rng)
            self.tally.answers[f"{op}:{status if status is not None else 'no_answer'}"] += 1
            if status == 202 or doc.get("status") in PENDING_STATUSES:
                await await_settled(session, target.payment_id, time.monotonic() + 30.0)
            return status, doc

        async def capture() -> None:
            try:
                await follow_up(a, "capture", f"{base}/capture", {}, f"{target.key_prefix}-capture")
            finally:
                captured.set()

        async def refund() -> None:
            body = {"amount": max(1, target.amount // 3)}
            status, doc = await follow_up(b, "refund", f"{base}/refunds", body, f"{target.key_prefix}-refund")
            if status == 409 and doc.get("code") == "invalid_payment_state":
                # Not captured yet, or the capture holds the payment (whichever replica it reached):
                # as a checkout would, send it again (a new request, a new key) once captured.
                self.race_refund_409 += 1
                await captured.wait()
                await follow_up(b, "refund", f"{base}/refunds", body, f"{target.key_prefix}-refund-again")

        await asyncio.gather(capture(), refund())


async def _watch_breaker(replicas: Sequence[Replica], primary: str, since: float) -> dict[str, float | None]:
    """Per replica: ms from `since` until its /readyz first shows the primary's breaker not
    closed (each poll a new connection, so the workers of a replica are all asked)."""
    seen: dict[str, float | None] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        async def watch(replica: Replica) -> None:
            seen[replica.name] = None
            until = since + BREAKER_WATCH_S
            while time.monotonic() < until:
                try:
                    async with session.get(f"{replica.url}/readyz") as r:
                        doc = await r.json(content_type=None)
                    if doc["providers"][primary]["breaker"] != "closed":
                        seen[replica.name] = round((time.monotonic() - since) * 1000, 1)
                        return
                except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                    pass
                await asyncio.sleep(BREAKER_POLL_S)

        await asyncio.gather(*(watch(r) for r in replicas))
    return seen


class _Chaos:
    """The events, in order, each at its share of the planned load time."""

    def __init__(self, fleet: Fleet, servers: Mapping[str, EmulatorServer], primary: str, redis: RedisServer,
                 dsn: str, load_s: float, progress: Progress) -> None:
        self.fleet, self.servers, self.primary, self.redis, self.dsn = fleet, servers, primary, redis, dsn
        self.load_s = load_s
        self.progress = progress
        self.records: list[dict[str, Any]] = []
        self.breaker: dict[str, float | None] = {}
        self.failed = 0
        self._started = 0.0

    async def run(self) -> None:
        self._started = time.monotonic()
        schedule: list[tuple[float, str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            (OUTAGE_AT, "primary_outage", self._outage),
            (KILL_AT, "replica_sigkill", self._kill),
            (REDIS_STOP_AT, "redis_restart", self._redis),
            (PG_TERMINATE_AT, "postgres_sessions_terminated", self._terminate),
            (MIGRATE_AT, "migration_and_rolling_restart", self._migrate_and_roll),
        ]
        for share, name, event in schedule:
            await self._until(share)
            record: dict[str, Any] = {"event": name, "at_s": round(time.monotonic() - self._started, 2),
                                      "under_load": not self.progress.closed, "answered": self.progress.done}
            try:
                record.update(await event())
            except Exception as exc:  # the drill reports a failed event; it does not stop the load
                self.failed += 1
                record["error"] = f"{type(exc).__name__}: {exc}"
            record["seconds"] = round(time.monotonic() - self._started - record["at_s"], 2)
            self.records.append(record)

    async def _until(self, share: float) -> None:
        delay = self._started + share * self.load_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _outage(self) -> dict[str, Any]:
        server = self.servers[self.primary]
        began = time.monotonic()
        await server.set_outage(True)
        try:
            self.breaker = await _watch_breaker(self.fleet.replicas, self.primary, began)
            await self._until(OUTAGE_END_AT)
        finally:
            await server.set_outage(False)
        return {"provider": self.primary, "breaker_seen_ms": self.breaker}

    async def _kill(self) -> dict[str, Any]:
        replica = self.fleet.replicas[1]
        pids = replica.pids()
        killed = time.monotonic()
        await self.fleet.kill(replica)
        unresolved = await unresolved_count(self.dsn)
        await replica.process.start()
        return {"replica": replica.name, "processes_killed": len(pids), "unresolved_in_journal": unresolved,
                "downtime_ms": round((time.monotonic() - killed) * 1000, 1)}

    async def _redis(self) -> dict[str, Any]:
        await self.redis.stop()
        await self._until(REDIS_START_AT)
        await self.redis.start()
        return {"restarted_empty": True}

    async def _terminate(self) -> dict[str, Any]:
        return {"sessions_terminated": await terminate_backends(self.dsn, self.fleet.pids())}

    async def _migrate_and_roll(self) -> dict[str, Any]:
        before = await schema_version(self.dsn)
        code = await self.fleet.migrate()
        record: dict[str, Any] = {"schema_before": before, "schema_after": await schema_version(self.dsn),
                                  "migrate_exit_code": code, "replicas": []}
        if code != 0:
            raise FleetSetupError(f"gateway db migrate exited with {code} (see migrate.log)")
        for replica in self.fleet.replicas:
            drained = await self.fleet.haproxy.drain(replica.name, DRAIN_MAX_S)
            exit_code = await replica.process.stop()
            started = await replica.process.start()
            back = await self.fleet.haproxy.ready(replica.name, DRAIN_MAX_S)
            record["replicas"].append({"replica": replica.name, "drain_s": round(drained, 2), "exit_code": exit_code,
                                       "start_s": round(started, 2), "back_in_rotation_s": round(back, 2)})
        return record


async def _load(session: aiohttp.ClientSession, checkouts: Sequence[Checkout], concurrency: int, load_s: float,
                max_seconds: float, rng: random.Random, progress: Progress,
                on_approved: Callable[[Checkout], None]) -> None:
    """C workers take payments in order, payment i not before i/N of the planned load time,
    until the plan is done or the time cap passes."""
    pending = iter(checkouts)
    started = time.monotonic()
    cap_at = started + max_seconds
    step = load_s / max(1, len(checkouts))

    async def worker() -> None:
        for checkout in pending:
            delay = started + checkout.payment.index * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= cap_at:
                return
            await pay_until_answered(session, checkout, rng, progress)
            if checkout.result is not None and checkout.result.status == "approved":
                on_approved(checkout)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(checkouts)))))


async def _reconciled(dsn: str) -> dict[str, Any]:
    """Until the journal holds nothing unresolved (the fleet's reconcilers settle what the kills
    and the faults left), bounded."""
    started = time.monotonic()
    left = await unresolved_count(dsn)
    while left and time.monotonic() - started < SETTLE_MAX_S:
        await asyncio.sleep(0.5)
        left = await unresolved_count(dsn)
    return {"unresolved_after_load_settled_in_s": round(time.monotonic() - started, 2), "unresolved_left": left}


def _drill_dsn() -> str:
    return os.environ.get(PG_DSN_ENV) or os.environ.get("GATEWAY_TEST_PG_DSN") or DEFAULT_PG_DSN


async def run_fleet_drill(options: DrillOptions | None = None, *,
                          on_progress: ProgressHook | None = None) -> DrillReport:
    """Run the fleet drill end to end and summarise it; raises only for set-up failures."""
    options = options if options is not None else DrillOptions()
    scenario = FLEET if options.primary is None else FLEET.with_primary(options.primary)
    setup = RunSetup.new(scenario.name, options)
    started = time.monotonic()
    certs = await asyncio.to_thread(generate_dev_certs, setup.log_dir / "certs", list(scenario.route))
    plan: list[PlannedPayment] = plan_payments(scenario, options.payments, setup.run_id, setup.seed)
    checkouts = [Checkout(p) for p in plan]
    load_s = max(MIN_LOAD_S, options.payments / PACE_PER_S)
    begin_at, latest = _starting_version()
    extra: dict[str, Any] = {"seed": setup.seed, "run_id": setup.run_id, "replicas": options.replicas,
                             "workers": options.workers, "planned_load_s": load_s}

    async with AsyncExitStack() as stack:
        servers = await start_emulators(stack, scenario.route, certs)
        redis = RedisServer()
        await redis.start()
        stack.push_async_callback(redis.stop)
        dsn = await stack.enter_async_context(postgres_schema(_drill_dsn()))
        env = {**secret_env(scenario, setup.client_key), PG_DSN_ENV: dsn, REDIS_URL_ENV: redis.url}
        replicas = []
        for i in range(1, options.replicas + 1):
            port, rdir = free_port(HOST), setup.log_dir / f"r{i}"
            rdir.mkdir(exist_ok=True)
            config_path = rdir / "gateway.yaml"
            config_path.write_text(yaml.safe_dump(_replica_config(scenario, setup, servers, certs, rdir, port,
                                                                  options.concurrency), sort_keys=False))
            args = ("--workers", str(options.workers)) if options.workers > 1 else ()
            replicas.append(Replica(f"r{i}", port, rdir, config_path, GatewayProcess(
                config_path, f"http://{HOST}:{port}", env, rdir / "gateway-process.log", args)))
        haproxy = HAProxy(setup.log_dir, [Backend(r.name, r.port) for r in replicas])
        fleet = Fleet(replicas, haproxy, env, setup.log_dir)
        for r in replicas:  # whatever happens, no gateway outlives the drill
            stack.push_async_callback(lambda r=r: fleet.kill(r))
        stack.push_async_callback(haproxy.stop)
        if await fleet.migrate(begin_at) != 0:
            raise FleetSetupError(f"gateway db migrate --to {begin_at} failed (see {setup.log_dir / 'migrate.log'})")
        await fleet.start()
        point_webhooks(servers, haproxy.url)  # through the load balancer, as a provider would reach the fleet

        answers = _Answers()
        progress = Progress(len(checkouts), on_progress)
        client_rng = random.Random(setup.seed + 1)
        chaos = _Chaos(fleet, servers, scenario.primary, redis, dsn, load_s, progress)
        sessions = [client_session(haproxy.url, setup.client_key, options.concurrency, [answers.trace])]
        sessions += [client_session(r.url, setup.client_key, options.concurrency, [answers.trace]) for r in replicas]
        for session in sessions:
            await stack.enter_async_context(session)
        follow_ups = _FollowUps(sessions[0], sessions[1:], setup.seed)
        queue: asyncio.Queue[Checkout | None] = asyncio.Queue()

        async def follow_up_worker() -> None:
            while (checkout := await queue.get()) is not None:
                assert checkout.result is not None and checkout.result.payment_id is not None
                await follow_ups.one(FollowUpTarget(checkout.result.payment_id, checkout.payment.amount,
                                                    f"drill-{setup.run_id}-{checkout.payment.index:06d}"),
                                     checkout.payment.index)

        async def load() -> None:
            load_started = time.monotonic()
            try:
                await _load(sessions[0], checkouts, options.concurrency, load_s, options.max_seconds, client_rng,
                            progress, queue.put_nowait)
            finally:
                for _ in range(options.concurrency):
                    queue.put_nowait(None)
            extra["load_seconds"] = round(time.monotonic() - load_started, 3)

        async def follow_ups_phase() -> None:
            try:
                await asyncio.gather(*(follow_up_worker() for _ in range(options.concurrency)))
            finally:
                await progress.close()

        injections = await inject_faults(scenario, servers, setup.seed)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(load())
                group.create_task(follow_ups_phase())
                group.create_task(chaos.run())
        finally:
            await lift_faults(injections)
        await webhooks_idle(servers)  # the asynchronous follow-ups (Adyen, Checkout.com) settle by notification
        extra.update(await _reconciled(dsn))
        extra.update(await settle_all(sessions[0], checkouts, options.concurrency))
        await fleet.stop()
        extra["gateway_exit_codes"] = {r.name: r.process.exit_codes for r in replicas}
        ledger = ledger_view(servers)
        journal = await read_postgres_journal(dsn, setup.reference_prefix)

    files = transaction_files(r.log_dir for r in replicas)
    lines = await asyncio.to_thread(lambda: list(read_lines(files)))
    by_id = {d["id"]: d for d in journal}
    seen = [ms for ms in chaos.breaker.values() if ms is not None]
    extra.update({
        "events": chaos.records,
        "events_failed": chaos.failed,
        "events_under_load": sum(1 for r in chaos.records if r["under_load"]),
        "restarts": sum(r.process.starts - 1 for r in replicas),
        "http_500": answers.statuses[500],
        "http_statuses": {str(k): v for k, v in sorted(answers.statuses.items())},
        "breaker_seen_ms": chaos.breaker,
        "breaker_spread_ms": (round(max(seen) - min(seen), 1)
                              if seen and len(seen) == len(chaos.breaker) else None),
        "schema": {"start": begin_at, "after": _final_version(chaos), "latest": latest},
        "racing": {"payments": len(follow_ups.racing), "refunds_first_409": follow_ups.race_refund_409,
                   "refunds_made": sum(1 for pid in follow_ups.racing if by_id.get(pid, {}).get("refunded_amount"))},
        "charged_at_other_provider": charged_at_other_provider(charges_of(ledger), by_id),
        "txlog_files": len(files),
        "txlog_files_rotated": sum(1 for f in files if f.suffix == ".gz"),
        **follow_ups.tally.as_summary(),
        **txlog_figures(lines, journal),
    })
    sends = [c.result for c in checkouts if c.result is not None]
    summary = summarize(scenario=scenario, sends=sends, journal=journal, ledger=ledger,
                        abandoned=len(plan) - len(sends), seconds=time.monotonic() - started,
                        log_dir=str(setup.log_dir), extra=extra)
    return DrillReport(summary)


def _final_version(chaos: _Chaos) -> int | None:
    """The schema version the live migration left (None when that event did not run)."""
    for record in chaos.records:
        if record["event"] == "migration_and_rolling_restart":
            return record.get("schema_after")
    return None
