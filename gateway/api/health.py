"""Liveness, readiness and metrics."""

from __future__ import annotations

from aiohttp import web

from gateway.api.errors import json_response
from gateway.app_keys import BREAKER_SYNC, JOURNAL_PROBE, LOG_WRITER, METRICS, POOL


async def healthz(_request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the journal takes writes (its periodic probe), the transaction log has room and
    at least one provider could take a call now. Shared breaker state is an optimisation: Redis
    being unreachable shows as `breaker_sync` degraded, never as not ready."""
    providers = {h.name: {"usable": h.unusable_reason() is None, "reason": h.unusable_reason(),
                          "breaker": h.breaker.state, "bulkhead_active": h.bulkhead.active}
                 for h in request.app[POOL]}
    usable = any(p["usable"] for p in providers.values())
    writer_ok = request.app[LOG_WRITER].has_capacity()
    probe = request.app[JOURNAL_PROBE]
    ready = usable and writer_ok and probe.ready
    sync = request.app.get(BREAKER_SYNC)
    return json_response(200 if ready else 503, {
        "ready": ready, "providers": providers,
        "journal": {"status": "ok" if probe.ready else "unavailable", "reason": probe.reason},
        "transaction_log": "ok" if writer_ok else "backed_up",
        "breaker_sync": sync.health() if sync is not None else {"status": "off"},
    })


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    m.log_dropped.set(request.app[LOG_WRITER].dropped)
    return web.Response(body=m.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
