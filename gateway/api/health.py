"""Liveness, readiness and metrics.

`/livez` (and its older name `/healthz`) says the process answers: it checks nothing outside
the process, so a journal or a provider that is down never gets a live gateway restarted (that
would only add a cold start to the outage). `/readyz` says whether this replica should get
traffic, and why not, for the load balancer and for the operator who reads it:

- the journal takes writes (its periodic probe, `gateway.journal.probe`: never a round trip per
  check);
- the transaction log is written and keeping up: the disk is not failing, the writer's queue has
  room, no more than `log.max_outbox_backlog` lines wait, and the oldest line waiting has
  waited less than `log.stall_after_s` (a writer stuck in the kernel fails nothing, it only
  stops: a hung network mount);
- every route can be served by some provider now (breaker, bulkhead, an expired or broken
  client certificate). Not ready only when no route has one; a route without one is listed as
  degraded (other routes' payments still go through here, and every replica would refuse that
  route alike).

Shared breaker state is an optimisation: Redis being unreachable or not answering shows as
`breaker_sync` degraded, never as not ready (with `read_fleet_holds` false when this replica has
not read the fleet's holds since it started). The body names every reason in `reasons`, one line each.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.http.errors import json_response
from gateway.app_keys import BREAKER_SYNC, CONFIG, JOURNAL_PROBE, LOG_WRITER, METRICS, POOL, TRANSACTION_LOG


async def livez(_request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


def _transaction_log(app: web.Application) -> tuple[str, str | None, dict[str, Any]]:
    writer, txlog = app[LOG_WRITER], app[TRANSACTION_LOG]
    waited = txlog.oldest_wait_s()
    stall_after = app[CONFIG].log.stall_after_s
    if not writer.healthy:
        status, reason = "failing", writer.problem
    elif waited >= stall_after:
        status, reason = "stalled", (f"the oldest of {txlog.backlog} lines has waited {waited:.1f} s for "
                                     f"{writer.path} (log.stall_after_s {stall_after:g})")
    elif txlog.backlogged():
        status, reason = "backlogged", f"{txlog.backlog} lines wait for the disk"
    elif not writer.has_capacity():
        status, reason = "backed_up", "the writer's queue is full"
    else:
        status, reason = "ok", None
    return status, reason, {"status": status, "reason": reason, "backlog": txlog.backlog,
                            "oldest_wait_s": round(waited, 3), "write_errors": writer.write_errors}


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    pool = app[POOL]
    providers = {h.name: {"usable": h.unusable_reason() is None, "reason": h.unusable_reason(),
                          "breaker": h.breaker.state, "bulkhead_active": h.bulkhead.active}
                 for h in pool}
    routes = {route.name: [p for p in route.providers if providers[p]["usable"]] for route in app[CONFIG].routes}
    reasons: list[str] = []
    if not any(routes.values()):
        unusable = ", ".join(f"{name}: {p['reason']}" for name, p in providers.items())
        reasons.append(f"no route has a usable provider ({unusable})")
    probe = app[JOURNAL_PROBE]
    if not probe.ready:
        reasons.append(f"journal: {probe.reason}")
    log_status, log_reason, log_doc = _transaction_log(app)
    if log_reason is not None:
        reasons.append(f"transaction log {log_status}: {log_reason}")
    sync = app.get(BREAKER_SYNC)
    ready = not reasons
    return json_response(200 if ready else 503, {
        "ready": ready, "reasons": reasons,
        "routes": {name: {"usable_providers": usable} for name, usable in routes.items()},
        "degraded_routes": [name for name, usable in routes.items() if not usable],
        "providers": providers,
        "journal": {"status": "ok" if probe.ready else "unavailable", "reason": probe.reason},
        "transaction_log": log_doc,
        "breaker_sync": sync.health() if sync is not None else {"status": "off"},
    })


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/livez", livez)
    app.router.add_get("/healthz", livez)  # the older name, kept for load balancers set up with it
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
