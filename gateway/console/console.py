"""The console's state: the stats window, the sessions, the open streams and the snapshot they
share.

It is handed what it shows at construction (the composition root, `gateway.app`, builds it once
the payment service runs), so it reads no application state of its own and any part of it can
be built in a test from real parts. Under `serve --workers N` it is also handed the worker's
`SeatPeers`: a snapshot then adds up every worker's `seat_report` (`gateway.console.host`), so
the console on any worker shows the whole host's traffic; breakers and holds are already the
host's (shared through the hub or Redis).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.http.auth import Authenticator, Caller
from gateway.http.errors import ApiError
from gateway.console.host import FAILURES_SHOWN, HostFigures
from gateway.console.session import COOKIE, COOKIE_PATH, SessionSigner
from gateway.console.stats import GATEWAY, ConsoleStats

if TYPE_CHECKING:
    from gateway.certs.watcher import CertificateWatcher
    from gateway.journal.store import Store
    from gateway.orchestrator import PaymentService
    from gateway.provider_pool import ProviderPool
    from gateway.workers.peers import SeatPeers

SNAPSHOT_INTERVAL_S = 1.0
MIN_REBUILD_S = 0.2  # streams share a snapshot built less than this long ago (unless a breaker moved)
PENDING_REFRESH_S = 2.0  # how often the unresolved payments are counted in the store
PENDING_LIMIT = 1000  # counted up to this many ("1000+")
MAX_STREAMS = 32


class Console:
    def __init__(self, *, auth: Authenticator, sessions: SessionSigner, service: PaymentService,
                 pool: ProviderPool, store: Store, certificates: CertificateWatcher | None = None,
                 stats: ConsoleStats | None = None, peers: SeatPeers | None = None,
                 interval_s: float = SNAPSHOT_INTERVAL_S, max_streams: int = MAX_STREAMS) -> None:
        self.auth = auth
        self.sessions = sessions
        self.service = service
        self.pool = pool
        self.store = store
        self.certificates = certificates
        self.stats = stats or ConsoleStats()
        self.peers = peers
        self.interval_s = interval_s
        self.max_streams = max_streams
        self.streams: set[asyncio.Event] = set()
        self.breaker_changes: deque[dict[str, Any]] = deque(maxlen=20)
        self.closed = False
        self._snapshot: bytes | None = None
        self._snapshot_at = 0.0
        self._unresolved: tuple[int | None, bool] = (None, False)
        self._unresolved_at = -PENDING_REFRESH_S

    # -- wiring ---------------------------------------------------------------------------------

    def breaker_changed(self, provider: str, old: str, new: str) -> None:
        """A breaker listener: remember the change and push a snapshot now."""
        self.breaker_changes.append({"at": time.time(), "provider": provider, "from": old, "to": new})
        self.poke()

    def poke(self) -> None:
        self._snapshot = None
        for wake in self.streams:
            wake.set()

    def close(self) -> None:
        """End every stream (on shutdown: before the server waits for handlers to finish)."""
        self.closed = True
        self.poke()

    # -- authentication -------------------------------------------------------------------------

    def authenticate(self, request: web.Request) -> tuple[Caller, str]:
        """(caller, "bearer" | "session"); 401 without credentials, 403 for a non-admin key."""
        if "Authorization" in request.headers:
            return self.auth.caller(request, "admin"), "bearer"
        cookie = request.cookies.get(COOKIE)
        if cookie:
            caller = self.sessions.verify(cookie)
            if caller is not None:
                return caller, "session"
        raise ApiError(401, "unauthenticated",
                       "the console needs an admin API key: Authorization: Bearer <key>, or sign in at /console",
                       headers={"WWW-Authenticate": "Bearer"})

    def set_session(self, response: web.StreamResponse, request: web.Request, caller: Caller) -> None:
        response.set_cookie(COOKIE, self.sessions.issue(caller), max_age=self.sessions.ttl_s, path=COOKIE_PATH,
                            httponly=True, samesite="Strict", secure=request.secure)

    # -- the snapshot ---------------------------------------------------------------------------

    async def snapshot(self) -> bytes:
        now = time.monotonic()
        if self._snapshot is not None and now - self._snapshot_at < MIN_REBUILD_S:
            return self._snapshot
        doc = await self.build_snapshot()
        self._snapshot, self._snapshot_at = orjson.dumps(doc), now
        return self._snapshot

    async def unresolved(self, *, fresh: bool = False,
                         in_flight: Collection[str] | None = None) -> tuple[int | None, bool]:
        """Payments awaiting the reconciler (pending, or attempting with no request in flight on
        this host): (count, capped at PENDING_LIMIT). Counted in the store at most every
        PENDING_REFRESH_S."""
        now = time.monotonic()
        if fresh or now - self._unresolved_at >= PENDING_REFRESH_S:
            self._unresolved_at = now
            if in_flight is None:
                in_flight = (await self.host()).in_flight
            try:
                records = await self.store.unresolved_payments(limit=PENDING_LIMIT)
            except Exception:  # noqa: BLE001 - the console shows the store's trouble as "?", it does not add to it
                self._unresolved = (None, False)
            else:
                self._unresolved = (sum(1 for r in records if r.id not in in_flight), len(records) >= PENDING_LIMIT)
        return self._unresolved

    def seat_report(self) -> dict[str, Any]:
        """What this process adds to the host's figures (JSON-ready: it crosses to the other
        workers' consoles). Bounded: one folded window per provider, the last failures, at most
        PENDING_LIMIT in-flight ids."""
        service = self.service
        return {
            "traffic": {key: self.stats.traffic(key).to_wire() for key in (GATEWAY, *(h.name for h in self.pool))},
            "failures": self.stats.failures(FAILURES_SHOWN),
            "in_flight": list(itertools.islice(service.in_flight, PENDING_LIMIT)),
            "in_flight_count": len(service.in_flight),
            "retry_budget_left": service.executor.budget.remaining(),
            "bulkheads": {h.name: {"active": h.bulkhead.active, "waiting": h.bulkhead.waiting,
                                   "max_concurrent": h.bulkhead.max_concurrent, "max_queue": h.bulkhead.max_queue}
                          for h in self.pool},
        }

    async def host(self) -> HostFigures:
        """This host's figures: every other worker's report added to this one's."""
        mine = self.seat_report()
        if self.peers is None:
            return HostFigures.of([mine])
        others = await self.peers.ask()
        return HostFigures.of([mine, *others.reports], workers=self.peers.workers, missing=others.missing)

    async def build_snapshot(self) -> dict[str, Any]:
        host = await self.host()
        unresolved, capped = await self.unresolved(in_flight=host.in_flight)
        rate_window_s = self.stats.rate_window_s
        gateway = host.traffic[GATEWAY].summary(rate_window_s)
        gateway.update(in_flight=host.in_flight_count, unresolved=unresolved, unresolved_capped=capped,
                       retry_budget_left=round(host.retry_budget_left, 1))
        providers = []
        for handle in self.pool:
            breaker = handle.breaker
            reason = handle.unusable_reason()
            providers.append({
                "name": handle.name,
                "kind": handle.config.kind,
                "usable": reason is None,
                "unusable_reason": reason,
                "certificate_problem": handle.certificate_problem,
                "breaker": {"state": breaker.state, "changed_at": breaker.changed_at,
                            "allows_call": breaker.allows_call(), "fail_max": handle.config.breaker.fail_max,
                            "reset_timeout_s": handle.config.breaker.reset_timeout_s},
                "bulkhead": host.bulkheads[handle.name],
                # The router's own view (this worker's): its quota bucket and the p99 it demotes by.
                "quota": None if handle.quota is None else {
                    "rate_limit_per_s": handle.quota.rate, "burst": handle.quota.capacity,
                    "mode": handle.quota.mode, "has_token": handle.quota.has_token()},
                "router_p99_ms": handle.latency.p99_ms(),
                "stats": host.traffic[handle.name].summary(rate_window_s),
            })
        reports = sorted(self.certificates.reports if self.certificates is not None else [],
                         key=lambda r: r.days_left)
        return {
            "ts": time.time(),
            "window_s": self.stats.window_s,
            "rate_window_s": rate_window_s,
            "series_step_s": self.stats.series_step_s,
            "host": host.who(),
            "gateway": gateway,
            "providers": providers,
            "certificates": [_certificate(r.to_dict()) for r in reports],
            "failures": host.failures,
            "breaker_changes": list(reversed(self.breaker_changes)),
        }


def _certificate(doc: dict[str, Any]) -> dict[str, Any]:
    keep = ("provider", "kind", "subject", "location", "days_left", "not_after", "status", "error")
    return {k: doc[k] for k in keep}
