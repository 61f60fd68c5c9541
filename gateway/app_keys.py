"""Every piece of typed application state (aiohttp `AppKey`), in one place beside `app.py`, the
composition root that fills them.

Handlers, the console and the drills read what they need through these keys and nothing
global. The types are imported for the type checker only, so any module may import this one
without pulling in (or looping back to) the modules whose objects it names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import structlog

    from gateway.api.auth import Authenticator
    from gateway.breaker_sync import BreakerSync
    from gateway.certs.watcher import CertificateWatcher
    from gateway.config import GatewayConfig
    from gateway.console.assets import ConsoleAssets
    from gateway.console.console import Console
    from gateway.journal.probe import JournalProbe
    from gateway.journal.store import Store
    from gateway.metrics import Metrics
    from gateway.notifications.sender import NotificationSender
    from gateway.orchestrator import PaymentService
    from gateway.provider_pool import ProviderPool
    from gateway.reconciler import Reconciler
    from gateway.tracing.spans import Tracing
    from gateway.txlog.outbox import TransactionLog
    from gateway.txlog.redaction import Redactor
    from gateway.txlog.writer import JsonLinesWriter
    from gateway.webhooks.routes import Webhooks

CONFIG: web.AppKey[GatewayConfig] = web.AppKey("config")
OPS_LOG: web.AppKey[structlog.typing.FilteringBoundLogger] = web.AppKey("ops_log")
# The one detector: the log's redaction (with the configuration's secret values) and the API's
# refusal of card data in free text.
REDACTOR: web.AppKey[Redactor] = web.AppKey("redactor")
TRACING: web.AppKey[Tracing] = web.AppKey("tracing")  # gateway.tracing.spans.NO_TRACING when off
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
AUTH: web.AppKey[Authenticator] = web.AppKey("authenticator")
LOG_WRITER: web.AppKey[JsonLinesWriter] = web.AppKey("log_writer")
STORE: web.AppKey[Store] = web.AppKey("store")
JOURNAL_PROBE: web.AppKey[JournalProbe] = web.AppKey("journal_probe")
TRANSACTION_LOG: web.AppKey[TransactionLog] = web.AppKey("transaction_log")
POOL: web.AppKey[ProviderPool] = web.AppKey("pool")
BREAKER_SYNC: web.AppKey[BreakerSync] = web.AppKey("breaker_sync")
CERT_WATCHER: web.AppKey[CertificateWatcher] = web.AppKey("certificate_watcher")
SERVICE: web.AppKey[PaymentService] = web.AppKey("service")
RECONCILER: web.AppKey[Reconciler] = web.AppKey("reconciler")
WEBHOOKS: web.AppKey[Webhooks] = web.AppKey("webhooks")
# Present only with notifications.url set.
NOTIFICATION_SENDER: web.AppKey[NotificationSender] = web.AppKey("notification_sender")
CONSOLE: web.AppKey[Console] = web.AppKey("console")
CONSOLE_ASSETS: web.AppKey[ConsoleAssets] = web.AppKey("console_assets")
