"""The composition root: the aiohttp application and the lifetime of everything it owns.

One `cleanup_ctx` generator per resource, in dependency order: the transaction log writer, the
store (waited for at start, its schema checked), the journal's readiness probe, the transaction
log's outbox (start-up re-emit of lines a crash kept from the file), the provider pool (one
ClientSession each), breaker sync, the certificate watcher, the payment service, the merchant
notification sender, the reconciler, the provider-webhook processor, host metrics, the console
(handed the service, pool, store and watcher it shows). aiohttp tears down in reverse and only
what started. Every piece of state they share is an `AppKey` of `gateway.app_keys`; nothing
below this module wires another module's objects together. The tracer (`gateway.tracing`) comes
up first and goes down last, so every other context's spans are exported.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web
from opentelemetry.sdk.trace.export import SpanExporter

from gateway.api import console as console_routes
from gateway.api import health, openapi, payments
from gateway.api import webhooks as webhook_routes
from gateway.http.auth import Authenticator
from gateway.http.errors import ProtocolLog, error_middleware
from gateway.app_keys import (
    AUTH,
    BREAKER_SYNC,
    CERT_WATCHER,
    CONFIG,
    CONSOLE,
    CONSOLE_ASSETS,
    JOURNAL_PROBE,
    LOG_WRITER,
    METRICS,
    NOTIFICATION_SENDER,
    OPS_LOG,
    POOL,
    RECONCILER,
    REDACTOR,
    SERVICE,
    STORE,
    TRACING,
    TRANSACTION_LOG,
    WEBHOOKS,
)
from gateway.breaker_sync import BreakerSync, RedisBreakerSync
from gateway.certs.watcher import CertificateWatcher
from gateway.config import GatewayConfig
from gateway.console import Console, SessionSigner
from gateway.console.assets import ConsoleAssets
from gateway.executor import AttemptExecutor
from gateway.journal.postgres import PostgresStore
from gateway.journal.probe import JournalProbe
from gateway.journal.sqlite import SqliteStore
from gateway.journal.startup import open_store
from gateway.journal.errors import StoreUnavailable
from gateway.journal.store import Store
from gateway.metrics import Metrics
from gateway.notifications.outbox import NotificationOutbox
from gateway.notifications.sender import NotificationSender
from gateway.orchestrator import PaymentService
from gateway.provider_client import ProviderClient
from gateway.provider_pool import ProviderPool
from gateway.quota.provider import SHARED
from gateway.quota.shared import RedisBuckets
from gateway.reconciler import Reconciler
from gateway.retry_policy import RetryBudget
from gateway.router import Router
from gateway.tasks import stop_task
from gateway.api.tracing import tracing_middleware
from gateway.tracing.setup import build_tracing
from gateway.txlog import JsonLinesWriter, build_ops_logger
from gateway.txlog.file_lock import LogFileInUse, LogFileLock
from gateway.txlog.outbox import TransactionLog
from gateway.txlog.writer import LogFileUnavailable, LogWriterStalled
from gateway.redaction import Redactor
from gateway.workers import WorkerSeat
from gateway.workers.link import HostBreakerSync
from gateway.webhooks.metrics import WebhookMetrics
from gateway.webhooks.processor import WebhookProcessor
from gateway.webhooks.receiver import CRASH_ENV, Webhooks
from gateway.webhooks.schemes import endpoints as webhook_endpoints
from gateway.workers.peers import SeatPeers

ABANDON_MARGIN_S = 5.0  # past its deadline plus this, an unanswered payment has lost its process


class StartupError(Exception):
    """The gateway cannot start: one line naming the setting, the file and the problem
    (`storage.sqlite_path /srv/gw/data/gateway.db: file is not a database`). `gateway serve`
    prints it and exits non-zero, without a traceback."""


def make_store(config: GatewayConfig, metrics: Metrics | None = None) -> Store:
    storage = config.storage
    if storage.backend == "sqlite":
        return SqliteStore(Path(storage.sqlite_path), migrate=storage.auto_migrate, queue_size=storage.sqlite_queue_size)
    pool = storage.postgres_pool
    store = PostgresStore(
        storage.postgres_dsn.get_secret_value(),  # read from postgres_dsn_env at load
        min_size=pool.min_size, max_size=pool.max_size, acquire_timeout_s=pool.acquire_timeout_s,
        command_timeout_s=pool.command_timeout_s, connect_timeout_s=pool.connect_timeout_s,
        migrate=storage.auto_migrate,
        on_acquire=metrics.journal_acquire.observe if metrics is not None else None,
        on_error=(lambda kind: metrics.journal_errors.labels(kind).inc()) if metrics is not None else None,
    )
    if metrics is not None:  # read at each scrape
        metrics.observe(metrics.journal_pool_size, lambda: store.pool_stats().size)
        metrics.observe(metrics.journal_pool_in_use, lambda: store.pool_stats().in_use)
        metrics.observe(metrics.journal_pool_max, lambda: store.pool_stats().max_size)
    return store


def build_app(config: GatewayConfig, *, ops_log: structlog.typing.FilteringBoundLogger | None = None,
              reconcile_interval_s: float = 5.0, server_ssl_context: ssl.SSLContext | None = None,
              certificate_check_interval_s: float = 60.0, exclusive_store: bool | None = None,
              worker: WorkerSeat | None = None, span_exporter: SpanExporter | None = None,
              webhook_interval_s: float = 1.0) -> web.Application:
    """`exclusive_store`: no other process uses this journal (default: true for SQLite, false for
    a worker of `serve --workers N`). `worker`: this app is that worker (see `gateway.workers`).
    `span_exporter`: where spans go when `observability.tracing` is on (default: OTLP)."""
    if exclusive_store is None:
        exclusive_store = config.storage.backend == "sqlite" and worker is None
    exclusive = exclusive_store
    log_file = worker.log_file(config.log.file) if worker is not None else config.log.file
    redactor = Redactor(secrets=config.secret_values())  # hides every secret value the config loaded
    ops = ops_log or build_ops_logger(redactor=redactor)
    metrics = Metrics(multiprocess_dir=worker.metrics_dir if worker is not None else None)
    # Bodies are decoded by gateway.http.inputs.read_body, not by the HTTP parser (see there why).
    # A client hanging up never cancels its handler (run_app's default, pinned here because
    # aiohttp's test server turns cancellation on): a payment its caller stopped waiting for
    # still finishes and stores its answer for the caller's retry with the same key.
    # The server span, outermost so it sees the status of every answer, only when tracing is on.
    traced = [tracing_middleware] if config.observability.tracing.enabled else []
    app = web.Application(middlewares=[*traced, error_middleware(ops, metrics, redactor)], client_max_size=config.server.max_body_bytes,
                          handler_args={"auto_decompress": False, "handler_cancellation": False,
                                        "logger": ProtocolLog(metrics)})
    app[CONFIG] = config
    app[OPS_LOG] = ops
    app[REDACTOR] = redactor
    app[METRICS] = metrics
    app[AUTH] = Authenticator(config.auth)

    async def tracing(app: web.Application) -> AsyncIterator[None]:
        """First up, last down: the other contexts' spans are exported before it stops."""
        # Off the loop: the SDK's resource detectors (OTEL_RESOURCE_ATTRIBUTES, host, process) run in threads.
        app[TRACING] = await asyncio.to_thread(build_tracing, config.observability.tracing, redactor,
                                               exporter=span_exporter)
        yield
        await asyncio.to_thread(app[TRACING].shutdown)  # flushes what the exporter still holds

    async def log_writer(app: web.Application) -> AsyncIterator[None]:
        writer = JsonLinesWriter(Path(config.log.dir) / log_file, queue_size=config.log.queue_size,
                                 max_bytes=config.log.max_bytes)
        lock = LogFileLock(writer.path)  # this process is the file's one writer (txlog/file_lock.py)
        try:
            await asyncio.to_thread(writer.open)  # a log that cannot be written stops us here, not later
            await asyncio.to_thread(lock.acquire)
        except LogFileUnavailable as exc:
            raise StartupError(f"log.dir {config.log.dir}: cannot open {log_file}: {exc.problem}") from None
        except (LogFileInUse, OSError) as exc:
            await asyncio.to_thread(writer.close)
            raise StartupError(f"log.dir {config.log.dir}: {exc}") from None
        writer.start()
        app[LOG_WRITER] = writer
        yield
        try:
            await writer.aclose()
        except LogWriterStalled as exc:
            ops.error("transaction_log_abandoned", log=str(exc.path), unwritten=exc.unwritten, reason=exc.problem,
                      detail="their lines stay in the journal's outbox and are written at the next start")
            raise
        finally:
            lock.release()

    async def store(app: web.Application) -> AsyncIterator[None]:
        s = make_store(config, app[METRICS])
        try:
            # A PostgreSQL that is not up yet is waited for; a local SQLite file that cannot open will not come up.
            await open_store(s, wait_s=config.storage.start_wait_s if config.storage.backend == "postgres" else 0,
                             log=ops)
        except StoreUnavailable as exc:
            field = "storage.sqlite_path" if config.storage.backend == "sqlite" else "storage"
            raise StartupError(f"{field} {exc}") from None
        if s.migrated:
            ops.info("journal_migrated", steps=[step.label for step in s.migrated])
        app[STORE] = s
        yield
        await s.close()

    async def journal_probe(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        probe = JournalProbe(app[STORE], interval_s=config.storage.probe_interval_s, log=ops,
                             on_change=lambda ready: metrics.journal_ready.set(int(ready)))
        metrics.journal_ready.set(1)
        app[JOURNAL_PROBE] = probe
        task = asyncio.create_task(probe.run_forever(), name="journal-probe")
        yield
        await stop_task(task)

    async def transaction_log(app: web.Application) -> AsyncIterator[None]:
        writer = app[LOG_WRITER]
        txlog = TransactionLog(writer, app[STORE], redactor=redactor, ops_log=ops, max_backlog=config.log.max_outbox_backlog)
        app[METRICS].track_transaction_log(write_errors=lambda: writer.write_errors, refused=lambda: writer.dropped,
                                           backlog=lambda: txlog.backlog, healthy=lambda: writer.healthy)
        await txlog.start()
        try:
            # Before serving: lines whose journal commit a crash outran, unless the file has them.
            # The file is this process's alone (its lock): what its predecessor left is orphaned now.
            await txlog.recover(exclusive=exclusive, sole_writer=True)
        except BaseException:
            await txlog.close()
            raise
        app[TRANSACTION_LOG] = txlog
        sweeper = asyncio.create_task(txlog.run_forever(exclusive=exclusive), name="txlog-outbox-sweep")
        yield
        await stop_task(sweeper)
        await txlog.close()  # after every producer stopped, before the store closes

    async def providers(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        # Provider quotas: shared by the fleet in Redis where breaker state is; each process's
        # share of them otherwise, and while Redis is away (gateway/quota/).
        shared_quota = None
        if config.breaker_sync.backend == "redis" and any(p.rate_limit_per_s for p in config.providers.values()):
            shared_quota = RedisBuckets(config.breaker_sync.redis_url.get_secret_value(),
                                        config.breaker_sync.channel_prefix, log=ops)
        share = config.engine.replicas * (worker.workers if worker is not None else 1)
        pool = await asyncio.to_thread(ProviderPool, config, quota_share=share,  # reads every TLS file: off the loop
                                       shared_quota=shared_quota)
        for handle in pool:
            handle.breaker.listeners.append(metrics.breaker_changed)
            handle.breaker.listeners.append(
                lambda provider, old, new: ops.warning("breaker_state_change", provider=provider, old=old, new=new))
            metrics.track_provider(handle.name, handle.bulkhead)
            metrics.track_latency(handle.name, handle.latency.p99_ms)
            if (quota := handle.quota) is not None:
                metrics.track_quota(handle.name, lambda quota=quota: quota.mode == SHARED)
        if shared_quota is not None:
            await shared_quota.start()
        try:
            await pool.start()
        except BaseException:
            if shared_quota is not None:
                await shared_quota.close()
            raise
        app[POOL] = pool
        yield
        await pool.close()
        if shared_quota is not None:
            await shared_quota.close()

    async def breaker_sync(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        on_error = lambda kind: metrics.breaker_sync_errors.labels(kind).inc()  # noqa: E731
        sync: BreakerSync
        if config.breaker_sync.backend == "redis":
            sync = RedisBreakerSync(config.breaker_sync.redis_url.get_secret_value(),
                                    config.breaker_sync.channel_prefix, log=ops, on_error=on_error)
        elif worker is not None and worker.breaker_socket is not None:
            sync = HostBreakerSync(worker.breaker_socket, log=ops, on_error=on_error)
        else:
            yield
            return
        metrics.observe(metrics.breaker_sync_connected, lambda: float(sync.connected))
        await sync.start(handle.breaker for handle in app[POOL])
        app[BREAKER_SYNC] = sync
        yield
        await sync.close()

    async def service(app: web.Application) -> AsyncIterator[None]:
        pool, metrics = app[POOL], app[METRICS]
        engine = config.engine
        budget = RetryBudget(ratio=engine.retry_budget_ratio, min_per_s=engine.retry_budget_min_per_s,
                             window_s=engine.retry_budget_window_s)
        metrics.observe(metrics.retry_budget_remaining, budget.remaining)
        app[SERVICE] = PaymentService(
            store=app[STORE], clients={h.name: ProviderClient(h, metrics, app[TRACING]) for h in pool},
            router=Router(config.routes, pool.health, success_rate=pool.success_rate, capabilities=config.providers,
                          without_redirects=[n for n, p in config.providers.items() if not p.redirects],
                          latency_p99=pool.latency_p99_ms, quota_wait=pool.quota_wait_s),
            executor=AttemptExecutor(budget, metrics), metrics=metrics, txlog=app[TRANSACTION_LOG],
            retention_s=config.storage.idempotency_retention_h * 3600, ops_log=ops, tracing=app[TRACING],
            notifications=NotificationOutbox(enabled=config.notifications.enabled),
            action_expiry_s=config.three_ds.action_expiry_s, quota_max_wait_s=engine.quota_max_wait_ms / 1000,
        )
        in_flight = app[SERVICE].in_flight
        metrics.observe(metrics.in_flight, lambda: len(in_flight))
        yield

    async def notifications(app: web.Application) -> AsyncIterator[None]:
        """Merchant notifications out: a sender in every process, on rows it leased."""
        if not config.notifications.enabled:
            yield
            return
        sender = NotificationSender(app[STORE], config.notifications, txlog=app[TRANSACTION_LOG],
                                    metrics=app[METRICS], ops_log=ops, wake=app[SERVICE].notifications.wake)
        await sender.start(exclusive=exclusive)
        app[NOTIFICATION_SENDER] = sender
        task = asyncio.create_task(sender.run_forever(), name="notification-sender")
        yield
        await stop_task(task)
        await sender.close()

    async def reconciler(app: web.Application) -> AsyncIterator[None]:
        rec = Reconciler(app[SERVICE], interval_s=reconcile_interval_s, log=ops,
                         abandoned_after_s=config.engine.deadline_ms / 1000 + ABANDON_MARGIN_S,
                         in_flight_s=config.engine.provider_in_flight_s, lookup_lag_s=config.engine.lookup_lag_s,
                         owner=f"reconciler:{app[TRANSACTION_LOG].owner}")  # a restart in place renews its leases
        app[RECONCILER] = rec
        # Whatever a crash left behind. A process that owns its store alone knows every
        # unanswered row is an orphan; on a shared store another replica may still own it.
        await rec.run_once(min_age_s=0, abandoned_after_s=0 if exclusive else None)
        task = asyncio.create_task(rec.run_forever(), name="reconciler")
        yield
        await stop_task(task)

    async def webhooks(app: web.Application) -> AsyncIterator[None]:
        """Provider webhooks in: the route journals, this processor applies (first what a crash
        left journalled, then whenever the route wakes it or every `webhook_interval_s`)."""
        metrics = WebhookMetrics(app[METRICS].registry)
        processor = WebhookProcessor(app[SERVICE], metrics, log=ops, interval_s=webhook_interval_s)
        app[WEBHOOKS] = Webhooks(webhook_endpoints(config), metrics, processor, os.environ.get(CRASH_ENV))
        await processor.run_once()
        task = asyncio.create_task(processor.run_forever(), name="webhook-processor")
        yield
        await stop_task(task)

    async def certificates(app: web.Application) -> AsyncIterator[None]:
        """Before the app serves, one pass over the files marks providers whose client
        certificate is unusable (no endpoint probes there: a provider that is still starting
        must not delay us); then a pass every `certificate_check_interval_s`."""
        pool = app[POOL]
        watcher = CertificateWatcher(config, pool.client_contexts(), app[METRICS], ops,
                                     on_certificate_problem=pool.set_certificate_problem,
                                     interval_s=certificate_check_interval_s, server_ssl_context=server_ssl_context)
        app[CERT_WATCHER] = watcher
        await watcher.run_once(probe_endpoints=False)
        task = asyncio.create_task(watcher.run_forever(), name="certificate-watcher")
        yield
        await stop_task(task)

    async def host_metrics(app: web.Application) -> AsyncIterator[None]:
        """Across workers, callback readings reach the shared values only by being copied."""
        metrics = app[METRICS]
        task = asyncio.create_task(metrics.refresh_forever(), name="metrics-refresh") \
            if metrics.multiprocess_dir is not None else None
        yield
        if task is not None:
            await stop_task(task)

    async def console(app: web.Application) -> AsyncIterator[None]:
        """GET /console (admin key): fed by the payment service, told of every breaker change; a
        worker's also answers, and asks, the other workers on its seat socket (the host's traffic)."""
        app[CONSOLE_ASSETS] = await asyncio.to_thread(ConsoleAssets)
        service, pool = app[SERVICE], app[POOL]
        peers = SeatPeers(worker, log=ops) if worker is not None and worker.workers > 1 else None
        view = Console(auth=app[AUTH], sessions=SessionSigner(config.auth.clients), service=service, pool=pool,
                       store=app[STORE], certificates=app[CERT_WATCHER], peers=peers)
        if peers is not None:
            await peers.start(view.seat_report)
        service.observers.append(view.stats.observe)
        for handle in pool:
            handle.breaker.listeners.append(view.breaker_changed)
        app[CONSOLE] = view
        yield
        view.close()
        if peers is not None:
            await peers.close()
        service.observers.remove(view.stats.observe)

    app.cleanup_ctx.extend([tracing, log_writer, store, journal_probe, transaction_log, providers, breaker_sync,
                            certificates, service, notifications, reconciler, webhooks, host_metrics, console])
    payments.add_routes(app)
    health.add_routes(app)
    openapi.add_routes(app)
    webhook_routes.add_routes(app)
    console_routes.add_routes(app)
    return app
