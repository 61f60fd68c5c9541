"""The live console: one page, a server-sent event stream of snapshots, two operator actions.

Routes (all behind an API key with the ``admin`` permission):

* ``GET /console`` - the page (without a session: the sign-in form, status 401);
* ``POST /console/login`` (form field ``key``) and ``POST /console/logout`` - the session cookie
  (`gateway.console.session`);
* ``GET /console/events`` - ``text/event-stream``: a ``hello`` event, then a ``snapshot`` event
  about every second and at once when a breaker changes state;
* ``POST /console/actions/breaker`` ``{provider, state: open|closed, confirm: true}`` and
  ``POST /console/actions/reconcile`` ``{confirm: true}`` - each writes one ``console_action``
  audit line (who, what, from which address; the ops log adds when) to the ops log;
* ``GET /console/static/{console.js,console.css}`` - the assets, served from the package (no
  build step, no CDN); they hold no data, so they need no session.

Requests authenticate with ``Authorization: Bearer <admin key>`` or the session cookie. Cookie
requests that change something must come from the console's own origin (``Origin`` checked
when the browser sends it, on top of ``SameSite=Strict``) and carry JSON, which no cross-site
form can send.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from pydantic import StrictBool

from gateway.api.auth import Caller
from gateway.api.errors import ApiError, json_response
from gateway.api.inputs import json_body
from gateway.api.schemas import Body
from gateway.app_keys import AUTH, CERT_WATCHER, CONFIG, CONSOLE, CONSOLE_ASSETS, OPS_LOG, POOL, RECONCILER, REDACTOR, SERVICE, STORE
from gateway.console.session import COOKIE, COOKIE_PATH, SessionSigner
from gateway.console.stats import GATEWAY, ConsoleStats

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"console.js": "application/javascript", "console.css": "text/css"}
SNAPSHOT_INTERVAL_S = 1.0
MIN_REBUILD_S = 0.2  # streams share a snapshot built less than this long ago (unless a breaker moved)
PENDING_REFRESH_S = 2.0  # how often the unresolved payments are counted in the store
PENDING_LIMIT = 1000  # counted up to this many ("1000+")
MAX_STREAMS = 32
MAX_STREAM_S = 15 * 60  # then the browser reconnects (and the session is checked again)

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make form posts send Origin: null
    "Cache-Control": "no-store",
}


class BreakerAction(Body):
    provider: str
    state: Literal["open", "closed"]
    confirm: StrictBool = False


class ReconcileAction(Body):
    confirm: StrictBool = False


class Console:
    """The console's state: the stats window, the sessions, the open streams and the snapshot
    they share. Created by `setup_console`; wired to the service and breakers at start."""

    def __init__(self, app: web.Application, *, stats: ConsoleStats | None = None,
                 interval_s: float = SNAPSHOT_INTERVAL_S, max_streams: int = MAX_STREAMS) -> None:
        self.app = app
        self.stats = stats or ConsoleStats()
        self.sessions = SessionSigner(app[CONFIG].auth.clients)
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
            return request.app[AUTH].caller(request, "admin"), "bearer"
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
                records = await self.app[STORE].unresolved_payments(limit=PENDING_LIMIT)
            except Exception:  # noqa: BLE001 - the console shows the store's trouble as "?", it does not add to it
                self._unresolved = (None, False)
            else:
                in_flight = self.app[SERVICE].in_flight
                self._unresolved = (sum(1 for r in records if r.id not in in_flight), len(records) >= PENDING_LIMIT)
        return self._unresolved

    async def build_snapshot(self) -> dict[str, Any]:
        app = self.app
        service = app[SERVICE]
        unresolved, capped = await self.unresolved()
        gateway = self.stats.summary(GATEWAY)
        gateway.update(in_flight=len(service.in_flight), unresolved=unresolved, unresolved_capped=capped,
                       retry_budget_left=round(service.executor.budget.remaining(), 1))
        providers = []
        for handle in app[POOL]:
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
        watcher = app.get(CERT_WATCHER)
        reports = sorted(watcher.reports if watcher is not None else [], key=lambda r: r.days_left)
        certificates = [_certificate(r.to_dict()) for r in reports]
        return {
            "ts": time.time(),
            "window_s": self.stats.window_s,
            "rate_window_s": self.stats.rate_window_s,
            "series_step_s": self.stats.series_step_s,
            "gateway": gateway,
            "providers": providers,
            "certificates": certificates,
            "failures": self.stats.failures(),
            "breaker_changes": list(reversed(self.breaker_changes)),
        }


def _certificate(doc: dict[str, Any]) -> dict[str, Any]:
    keep = ("provider", "kind", "subject", "location", "days_left", "not_after", "status", "error")
    return {k: doc[k] for k in keep}


# -- handlers ------------------------------------------------------------------------------------


class ConsoleAssets:
    """The static files, read once at start-up in a thread (never per request, never on the loop)."""

    def __init__(self) -> None:
        self.files = {name: (STATIC_DIR / name).read_bytes() for name in ASSETS}
        self.page = (STATIC_DIR / "console.html").read_text(encoding="utf-8")
        self.login = (STATIC_DIR / "login.html").read_text(encoding="utf-8")




def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)


def _login_page(request: web.Request, status: int, error: str | None = None) -> web.Response:
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return _html(request.app[CONSOLE_ASSETS].login.replace("{{error}}", message), status)


def _check_origin(request: web.Request) -> None:
    """Browsers send Origin on POST: it must be this host (cross-site requests never get here
    with the cookie anyway, SameSite=Strict; this is the second lock)."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise ApiError(403, "cross_origin", "console actions must come from the console's own page")


async def _json(request: web.Request, model: type[BreakerAction | ReconcileAction]) -> Any:
    return (await json_body(request, model, request.app[REDACTOR]))[1]  # the front door's rules: one parser for every JSON body


def _confirmed(action: BreakerAction | ReconcileAction) -> None:
    if action.confirm is not True:
        raise ApiError(400, "confirmation_required", "operator actions need \"confirm\": true", "confirm")


async def page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    try:
        caller, via = console.authenticate(request)
    except ApiError as exc:
        if exc.status == 401 and "Authorization" not in request.headers:
            return _login_page(request, 401)
        raise
    response = _html(request.app[CONSOLE_ASSETS].page)
    if via == "bearer":  # the page's own requests (the event stream) carry the cookie
        console.set_session(response, request, caller)
    return response


async def login(request: web.Request) -> web.Response:
    _check_origin(request)
    console = request.app[CONSOLE]
    ops = request.app[OPS_LOG]
    form = await request.post()
    key = form.get("key")
    caller = console.sessions.admin_for_key(key.strip()) if isinstance(key, str) and key.strip() else None
    if caller is None:
        ops.warning("console_login_refused", remote=request.remote)
        return _login_page(request, 401, "That is not an API key with the admin permission.")
    ops.info("console_login", actor=caller.name, remote=request.remote)
    response = web.Response(status=303, headers={"Location": COOKIE_PATH, **SECURITY_HEADERS})
    console.set_session(response, request, caller)
    return response


async def logout(request: web.Request) -> web.Response:
    _check_origin(request)
    response = web.Response(status=303, headers={"Location": COOKIE_PATH, **SECURITY_HEADERS})
    response.del_cookie(COOKIE, path=COOKIE_PATH)
    return response


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise ApiError(404, "not_found", "no such console asset")
    return web.Response(body=request.app[CONSOLE_ASSETS].files[name], content_type=ASSETS[name], charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


async def events(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    caller, _ = console.authenticate(request)
    if len(console.streams) >= console.max_streams:
        raise ApiError(503, "too_many_streams", "too many console streams are open", headers={"Retry-After": "5"})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"})
    wake = asyncio.Event()
    console.streams.add(wake)
    try:
        await response.prepare(request)
        hello = orjson.dumps({"actor": caller.name, "interval_s": console.interval_s})
        await response.write(b"retry: 2000\nevent: hello\ndata: " + hello + b"\n\n")
        ends_at = time.monotonic() + MAX_STREAM_S
        while not console.closed and time.monotonic() < ends_at:
            wake.clear()  # a change while we build or send wakes the next round at once
            body = await console.snapshot()
            await response.write(b"event: snapshot\ndata: " + body + b"\n\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), console.interval_s)
    except ConnectionResetError:  # the browser went away
        pass
    finally:
        console.streams.discard(wake)
    return response


async def breaker_action(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    caller, via = console.authenticate(request)
    _check_origin(request)
    action: BreakerAction = await _json(request, BreakerAction)
    _confirmed(action)
    pool = request.app[POOL]
    try:
        handle = pool[action.provider]
    except KeyError:
        raise ApiError(422, "unknown_provider", f"no provider named {action.provider!r}", "provider") from None
    before = handle.breaker.state
    if action.state == "open":
        handle.breaker.force_open(hold=True)
    else:
        handle.breaker.force_close()
    after = handle.breaker.state
    request.app[OPS_LOG].warning("console_action", actor=caller.name, action=f"breaker_force_{action.state}",
                                 provider=handle.name, from_state=before, to_state=after, auth=via,
                                 remote=request.remote)
    console.poke()
    return json_response(200, {"provider": handle.name, "state": after, "previous_state": before,
                               "changed_at": handle.breaker.changed_at})


async def reconcile_action(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    caller, via = console.authenticate(request)
    _check_origin(request)
    _confirmed(await _json(request, ReconcileAction))
    reconciler = request.app.get(RECONCILER)
    if reconciler is None:
        raise ApiError(503, "reconciler_not_running", "the reconciler is not running")
    unresolved, capped = await console.unresolved(fresh=True)
    # Wake the reconciler's own loop rather than run a second pass beside it: one pass at a
    # time, so no payment is settled (and logged) twice.
    reconciler.wake.set()
    request.app[OPS_LOG].warning("console_action", actor=caller.name, action="reconcile_now", unresolved=unresolved,
                                 auth=via, remote=request.remote)
    console.poke()
    return json_response(202, {"triggered": True, "unresolved": unresolved, "unresolved_capped": capped})


# -- wiring --------------------------------------------------------------------------------------


def setup_console(app: web.Application, *, stats: ConsoleStats | None = None) -> None:
    """Add the console to an app built by `gateway.app.build_app` (after its service context):
    routes, the static files (read in a thread at start-up), the stats observer on the payment
    service, a listener on every breaker, and the streams closed on shutdown."""
    app[CONSOLE] = Console(app, stats=stats)

    async def console_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CONSOLE_ASSETS] = await asyncio.to_thread(ConsoleAssets)
        console = app[CONSOLE]
        service = app[SERVICE]
        service.observers.append(console.stats.observe)
        for handle in app[POOL]:
            handle.breaker.listeners.append(console.breaker_changed)
        yield
        console.close()
        with contextlib.suppress(ValueError):
            service.observers.remove(console.stats.observe)

    async def close_streams(app: web.Application) -> None:
        app[CONSOLE].close()

    app.cleanup_ctx.append(console_ctx)
    app.on_shutdown.append(close_streams)  # before the server waits for handlers: end the streams
    app.router.add_get("/console", page)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console/events", events)
    app.router.add_get("/console/static/{name}", asset)
    app.router.add_post("/console/actions/breaker", breaker_action)
    app.router.add_post("/console/actions/reconcile", reconcile_action)
