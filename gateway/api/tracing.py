"""The server span: one per front-door request, named by its route template
(`POST /v1/payments/{payment_id}/capture`), never by its path, which is the caller's text (a
path can carry anything, a card number included). Installed only when tracing is on (it reads the app's `TRACING`).

Health checks and scrapes are not traced: a load balancer polls `/readyz` every second and
its spans would bury the payments'.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.app_keys import TRACING

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNTRACED_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
# Any other method is the caller's token: `_OTHER`, as the HTTP semantic conventions say.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in UNTRACED_PATHS:
        return await handler(request)
    tracing = request.app[TRACING]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "_OTHER"
    with tracing.server_span(f"{method} {route}", request.headers) as span:
        span.set({"http.request.method": method, "http.route": route})
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # what the error middleware passes on (a redirect)
            span.http_status(exc.status)
            raise
        span.http_status(response.status)
        return response

