"""Liveness, readiness and metrics."""

from __future__ import annotations

from aiohttp import web

from gateway.api.errors import json_response
from gateway.app_keys import BREAKER_SYNC, JOURNAL_PROBE, LOG_WRITER, METRICS, POOL, TRANSACTION_LOG


async def healthz(_request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the journal takes writes (its periodic probe), the transaction log can be
    written and is keeping up, and at least one provider could take a call now. Shared breaker
    state is an optimisation: Redis being unreachable shows as `breaker_sync` degraded, never as
    not ready."""
    providers = {h.name: {"usable": h.unusable_reason() is None, "reason": h.unusable_reason(),
                          "breaker": h.breaker.state, "bulkhead_active": h.bulkhead.active}
                 for h in request.app[POOL]}
    usable = any(p["usable"] for p in providers.values())
    writer, txlog = request.app[LOG_WRITER], request.app[TRANSACTION_LOG]
    if not writer.healthy:
        log_status, log_reason = "failing", writer.problem
    elif txlog.backlogged():
        log_status, log_reason = "backlogged", f"{txlog.backlog} lines wait for the disk"
    elif not writer.has_capacity():
        log_status, log_reason = "backed_up", "the writer's queue is full"
    else:
        log_status, log_reason = "ok", None
    probe = request.app[JOURNAL_PROBE]
    ready = usable and log_status == "ok" and probe.ready
    sync = request.app.get(BREAKER_SYNC)
    return json_response(200 if ready else 503, {
        "ready": ready, "providers": providers,
        "journal": {"status": "ok" if probe.ready else "unavailable", "reason": probe.reason},
        "transaction_log": {"status": log_status, "reason": log_reason, "backlog": txlog.backlog,
                            "write_errors": writer.write_errors},
        "breaker_sync": sync.health() if sync is not None else {"status": "off"},
    })


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
