"""The composition root: the aiohttp application and the lifetime of everything it owns.

One `cleanup_ctx` generator per resource, in dependency order: the transaction log writer, the
store, the transaction log's outbox (start-up re-emit of lines a crash kept from the file), the
provider pool (one ClientSession each), breaker sync, the certificate watcher, the payment
service, the reconciler, the console. aiohttp tears down in reverse and only what started. Every
piece of state they share is an `AppKey` of `gateway.app_keys`; nothing below this module wires
another module's objects together.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from gateway.api import health, openapi, payments
from gateway.api.auth import Authenticator
from gateway.api.errors import error_middleware
from gateway.api.idempotency import FrontDoor
from gateway.app_keys import (
    AUTH,
    BREAKER_SYNC,
    CERT_WATCHER,
    CONFIG,
    FRONT_DOOR,
    LOG_WRITER,
    METRICS,
    OPS_LOG,
    POOL,
    RECONCILER,
    REDACTOR,
    SERVICE,
    STORE,
    TRANSACTION_LOG,
)
from gateway.breaker_sync import RedisBreakerSync
from gateway.certs.watcher import CertificateWatcher
from gateway.config import GatewayConfig
from gateway.console import setup_console
from gateway.executor import AttemptExecutor
from gateway.journal.postgres import PostgresStore
from gateway.journal.sqlite import SqliteStore
from gateway.journal.store import Store
from gateway.metrics import Metrics
from gateway.orchestrator import PaymentService
from gateway.provider_pool import ProviderPool
from gateway.reconciler import Reconciler
from gateway.retry_policy import RetryBudget
from gateway.router import Router
from gateway.tasks import stop_task
from gateway.txlog import JsonLinesWriter, build_ops_logger
from gateway.txlog.outbox import TransactionLog
from gateway.txlog.redaction import Redactor

ABANDON_MARGIN_S = 5.0  # past its deadline plus this, an unanswered payment has lost its process


def make_store(config: GatewayConfig) -> Store:
    if config.storage.backend == "sqlite":
        return SqliteStore(Path(config.storage.sqlite_path))
    return PostgresStore(config.storage.postgres_dsn.get_secret_value())  # read from postgres_dsn_env at load


def build_app(config: GatewayConfig, *, ops_log: structlog.typing.FilteringBoundLogger | None = None,
              reconcile_interval_s: float = 5.0, server_ssl_context: ssl.SSLContext | None = None,
              certificate_check_interval_s: float = 60.0, exclusive_store: bool | None = None) -> web.Application:
    """`exclusive_store`: no other process uses this journal (default: true for SQLite; `serve
    --workers N` passes false)."""
    exclusive = config.storage.backend == "sqlite" if exclusive_store is None else exclusive_store
    redactor = Redactor(secrets=config.secret_values())  # hides every secret value the config loaded
    ops = ops_log or build_ops_logger(redactor=redactor)
    app = web.Application(middlewares=[error_middleware(ops)], client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[OPS_LOG] = ops
    app[REDACTOR] = redactor
    app[METRICS] = Metrics()
    app[AUTH] = Authenticator(config.auth)

    async def log_writer(app: web.Application) -> AsyncIterator[None]:
        writer = JsonLinesWriter(Path(config.log.dir) / config.log.file, queue_size=config.log.queue_size,
                                 max_bytes=config.log.max_bytes)
        writer.start()
        app[LOG_WRITER] = writer
        yield
        await writer.aclose()

    async def store(app: web.Application) -> AsyncIterator[None]:
        s = make_store(config)
        await s.open()
        app[STORE] = s
        app[FRONT_DOOR] = FrontDoor(s, config.storage.idempotency_retention_h * 3600)
        yield
        await s.close()

    async def transaction_log(app: web.Application) -> AsyncIterator[None]:
        txlog = TransactionLog(app[LOG_WRITER], app[STORE], redactor=redactor, ops_log=ops)
        await txlog.start()
        try:
            # Before serving: lines whose journal commit a crash outran, unless the file has them.
            await txlog.recover(exclusive=exclusive)
        except BaseException:
            await txlog.close()
            raise
        app[TRANSACTION_LOG] = txlog
        sweeper = asyncio.create_task(txlog.run_forever(exclusive=exclusive), name="txlog-outbox-sweep")
        yield
        await stop_task(sweeper)
        await txlog.close()  # after every producer stopped, before the store closes

    async def providers(app: web.Application) -> AsyncIterator[None]:
        pool = ProviderPool(config)
        metrics = app[METRICS]
        for handle in pool:
            handle.breaker.listeners.append(metrics.breaker_changed)
            handle.breaker.listeners.append(
                lambda provider, old, new: ops.warning("breaker_state_change", provider=provider, old=old, new=new))
            metrics.breaker_state.labels(handle.name).set(0)
        await pool.start()
        app[POOL] = pool
        yield
        await pool.close()

    async def breaker_sync(app: web.Application) -> AsyncIterator[None]:
        if config.breaker_sync.backend == "none":
            yield
            return
        sync = RedisBreakerSync(config.breaker_sync.redis_url.get_secret_value(),
                                config.breaker_sync.channel_prefix, log=ops)
        await sync.start(handle.breaker for handle in app[POOL])
        app[BREAKER_SYNC] = sync
        yield
        await sync.close()

    async def service(app: web.Application) -> AsyncIterator[None]:
        pool = app[POOL]
        engine = config.engine
        budget = RetryBudget(ratio=engine.retry_budget_ratio, min_per_s=engine.retry_budget_min_per_s,
                             window_s=engine.retry_budget_window_s)
        app[SERVICE] = PaymentService(
            store=app[STORE], pool=pool, router=Router(config.routes, pool.health, success_rate=pool.success_rate,
                                                        capabilities=config.providers),
            executor=AttemptExecutor(budget, app[METRICS]), metrics=app[METRICS],
            txlog=app[TRANSACTION_LOG],
        )
        yield

    async def reconciler(app: web.Application) -> AsyncIterator[None]:
        rec = Reconciler(app[SERVICE], interval_s=reconcile_interval_s, log=ops,
                         abandoned_after_s=config.engine.deadline_ms / 1000 + ABANDON_MARGIN_S)
        app[RECONCILER] = rec
        # Whatever a crash left behind. A process that owns its store alone knows every
        # unanswered row is an orphan; on a shared store another replica may still own it.
        await rec.run_once(min_age_s=0, abandoned_after_s=0 if exclusive else None)
        task = asyncio.create_task(rec.run_forever(), name="reconciler")
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

    app.cleanup_ctx.extend([log_writer, store, transaction_log, providers, breaker_sync, certificates, service,
                            reconciler])
    payments.add_routes(app)
    health.add_routes(app)
    openapi.add_routes(app)
    setup_console(app)  # GET /console (admin key); its context runs last
    return app
