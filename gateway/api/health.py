"""Liveness, readiness and metrics."""

from __future__ import annotations

from aiohttp import web

from gateway.api.errors import json_response
from gateway.app_keys import LOG_WRITER, METRICS, POOL


async def healthz(_request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the stores are open and at least one provider could take a call now."""
    providers = {h.name: {"usable": h.unusable_reason() is None, "reason": h.unusable_reason(),
                          "breaker": h.breaker.state, "bulkhead_active": h.bulkhead.active}
                 for h in request.app[POOL]}
    usable = any(p["usable"] for p in providers.values())
    writer_ok = request.app[LOG_WRITER].has_capacity()
    ready = usable and writer_ok
    return json_response(200 if ready else 503, {"ready": ready, "providers": providers,
                                                 "transaction_log": "ok" if writer_ok else "backed_up"})


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    m.log_dropped.set(request.app[LOG_WRITER].dropped)
    return web.Response(body=m.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
