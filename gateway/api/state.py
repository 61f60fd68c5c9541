"""Typed application state (aiohttp AppKeys): what handlers may reach, and nothing global."""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.journal.store import Store
from gateway.metrics import Metrics
from gateway.orchestrator import PaymentService
from gateway.provider_pool import ProviderPool
from gateway.txlog.writer import JsonLinesWriter

CONFIG = web.AppKey("config", GatewayConfig)
STORE = web.AppKey("store", Store)
POOL = web.AppKey("pool", ProviderPool)
SERVICE = web.AppKey("service", PaymentService)
METRICS = web.AppKey("metrics", Metrics)
LOG_WRITER = web.AppKey("log_writer", JsonLinesWriter)
OPS_LOG = web.AppKey("ops_log", structlog.typing.FilteringBoundLogger)
