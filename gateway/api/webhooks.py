"""`POST /v1/webhooks/{provider}`: verify, journal, answer. Nothing is applied here.

The signature is checked on the raw body before anything is parsed or written: a delivery that
does not verify gets 401 and leaves only a counted ops line (no body, no signature in it). One
that does is journalled (every item, once per provider and event id) before it is answered, so
an answer means "durable"; the processor applies it from the journal. A journal that cannot take
it answers 503 and the provider delivers again later. Bad bodies are 4xx, never 500.
"""

from __future__ import annotations

import os
import signal
import time

import structlog
from aiohttp import web

from domain.webhook import MalformedEvent, SignatureInvalid
from gateway.http.errors import ApiError
from gateway.http.inputs import read_body
from gateway.app_keys import CONFIG, OPS_LOG, STORE, WEBHOOKS
from gateway.journal.webhook_events import WebhookEventRecord

PATH = "/v1/webhooks/{provider}"

# The route's entry in /openapi.json: providers call it, signed with their own scheme (no bearer).
OPENAPI = {PATH: {"post": {
    "operationId": "receiveProviderWebhook",
    "summary": "A provider's signed notifications (Stripe-Signature, Adyen HMAC per item, Cko-Signature)",
    "security": [],
    "parameters": [{"name": "provider", "in": "path", "required": True, "schema": {"type": "string"},
                    "description": "the provider's name in the configuration"}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
    "responses": {
        "200": {"description": "journalled (Adyen: `[accepted]`); applied to its payment from the journal"},
        **{str(code): {"description": what, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Error"}}}}
           for code, what in ((400, "signed, but not an event we can read"),
                              (401, "the signature does not verify: nothing written"),
                              (404, "no webhook secrets configured for this provider"),
                              (413, "body too large"), (503, "the journal cannot take it now: deliver again"))},
    },
}}}


async def receive(request: web.Request) -> web.Response:
    hooks = request.app[WEBHOOKS]
    name = request.match_info["provider"]
    endpoint = hooks.endpoints.get(name)
    if endpoint is None:
        raise ApiError(404, "not_found", "no webhook endpoint is configured for this provider", "provider")
    body = await read_body(request, request.app[CONFIG].server.body_timeout_s)
    ops: structlog.typing.FilteringBoundLogger = request.app[OPS_LOG]
    try:
        endpoint.scheme.verify(body, request.headers, endpoint.secrets, time.time())
    except SignatureInvalid as exc:
        hooks.metrics.rejected.labels(name, "signature").inc()
        ops.warning("webhook_rejected", provider=name, reason=str(exc), body_bytes=len(body))
        raise ApiError(401, "invalid_signature", "the webhook signature does not verify") from None
    try:
        events = endpoint.scheme.parse(body)
    except MalformedEvent as exc:
        hooks.metrics.rejected.labels(name, "malformed").inc()
        ops.warning("webhook_rejected", provider=name, reason=str(exc), body_bytes=len(body))
        raise ApiError(400, "malformed_event", str(exc)) from None
    now = time.time()
    new = await request.app[STORE].journal_webhook_events([WebhookEventRecord(name, e, now) for e in events])
    if hooks.crash_at == "journalled":
        os.kill(os.getpid(), signal.SIGKILL)
    hooks.metrics.received.labels(name, "new").inc(new)
    if len(events) > new:
        hooks.metrics.received.labels(name, "duplicate").inc(len(events) - new)
    if new:
        hooks.processor.wake.set()
    status, answer, content_type = endpoint.scheme.answer
    return web.Response(status=status, body=answer, content_type=content_type)


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, receive)
