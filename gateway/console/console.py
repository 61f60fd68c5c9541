"""The console's state: the stats window, the sessions, the open streams and the snapshot they
share.

It is handed what it shows at construction (the composition root, `gateway.app`, builds it once
the payment service runs), so it reads no application state of its own and any part of it can
be built in a test from real parts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.api.auth import Authenticator, Caller
from gateway.api.errors import ApiError
from gateway.console.session import COOKIE, COOKIE_PATH, SessionSigner
from gateway.console.stats import GATEWAY, ConsoleStats

if TYPE_CHECKING:
    from gateway.certs.watcher import CertificateWatcher
    from gateway.journal.store import Store
    from gateway.orchestrator import PaymentService
    from gateway.provider_pool import ProviderPool

SNAPSHOT_INTERVAL_S = 1.0
MIN_REBUILD_S = 0.2  # streams share a snapshot built less than this long ago (unless a breaker moved)
PENDING_REFRESH_S = 2.0  # how often the unresolved payments are counted in the store
PENDING_LIMIT = 1000  # counted up to this many ("1000+")
MAX_STREAMS = 32


class Console:
    def __init__(self, *, auth: Authenticator, sessions: SessionSigner, service: PaymentService,
                 pool: ProviderPool, store: Store, certificates: CertificateWatcher | None = None,
                 stats: ConsoleStats | None = None, interval_s: float = SNAPSHOT_INTERVAL_S,
                 max_streams: int = MAX_STREAMS) -> None:
        self.auth = auth
        self.sessions = sessions
        self.service = service
        self.pool = pool
        self.store = store
        self.certificates = certificates
        self.stats = stats or ConsoleStats()
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

    async def unresolved(self, *, fresh: bool = False) -> tuple[int | None, bool]:
        """Payments awaiting the reconciler (pending, or attempting with no request in flight):
        (count, capped at PENDING_LIMIT). Counted in the store at most every PENDING_REFRESH_S."""
        now = time.monotonic()
        if fresh or now - self._unresolved_at >= PENDING_REFRESH_S:
            self._unresolved_at = now
            try:
                records = await self.store.unresolved_payments(limit=PENDING_LIMIT)
            except Exception:  # noqa: BLE001 - the console shows the store's trouble as "?", it does not add to it
                self._unresolved = (None, False)
            else:
                in_flight = self.service.in_flight
                self._unresolved = (sum(1 for r in records if r.id not in in_flight), len(records) >= PENDING_LIMIT)
        return self._unresolved

    async def build_snapshot(self) -> dict[str, Any]:
        service = self.service
        unresolved, capped = await self.unresolved()
        gateway = self.stats.summary(GATEWAY)
        gateway.update(in_flight=len(service.in_flight), unresolved=unresolved, unresolved_capped=capped,
                       retry_budget_left=round(service.executor.budget.remaining(), 1))
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
                "bulkhead": {"active": handle.bulkhead.active, "max_concurrent": handle.bulkhead.max_concurrent,
                             "waiting": handle.bulkhead.waiting, "max_queue": handle.bulkhead.max_queue},
                "stats": self.stats.summary(handle.name),
            })
        reports = sorted(self.certificates.reports if self.certificates is not None else [],
                         key=lambda r: r.days_left)
        return {
            "ts": time.time(),
            "window_s": self.stats.window_s,
            "rate_window_s": self.stats.rate_window_s,
            "series_step_s": self.stats.series_step_s,
            "gateway": gateway,
            "providers": providers,
            "certificates": [_certificate(r.to_dict()) for r in reports],
            "failures": self.stats.failures(),
            "breaker_changes": list(reversed(self.breaker_changes)),
        }


def _certificate(doc: dict[str, Any]) -> dict[str, Any]:
    keep = ("provider", "kind", "subject", "location", "days_left", "not_after", "status", "error")
    return {k: doc[k] for k in keep}
