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
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from pydantic import StrictBool

from gateway.http.errors import ApiError, json_response
from gateway.http.inputs import json_body
from gateway.http.schemas import Body
from gateway.app_keys import CONFIG, CONSOLE, CONSOLE_ASSETS, OPS_LOG, POOL, RECONCILER, REDACTOR
from gateway.console.assets import ASSETS
from gateway.console.session import COOKIE, COOKIE_PATH

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


# -- handlers ------------------------------------------------------------------------------------


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
    # the front door's rules: one parser for every JSON body
    timeout_s = request.app[CONFIG].server.body_timeout_s
    return (await json_body(request, model, request.app[REDACTOR], timeout_s)).payload


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
    try:
        form = await request.post()
    except (ValueError, LookupError):  # undecodable bytes, an unknown charset, multipart without a boundary
        return _login_page(request, 400, "The form could not be read: send it from the login page.")
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


def add_routes(app: web.Application) -> None:
    """The console's routes. The `Console` and its assets are the composition root's
    (`gateway.app`), created once the payment service runs; the streams end on shutdown, before
    the server waits for its handlers."""

    async def close_streams(app: web.Application) -> None:
        console = app.get(CONSOLE)
        if console is not None:
            console.close()

    app.on_shutdown.append(close_streams)
    app.router.add_get("/console", page)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console/events", events)
    app.router.add_get("/console/static/{name}", asset)
    app.router.add_post("/console/actions/breaker", breaker_action)
    app.router.add_post("/console/actions/reconcile", reconcile_action)
