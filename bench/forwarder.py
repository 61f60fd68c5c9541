"""The baseline of the performance budget: a bare aiohttp forwarder with one keep-alive session.

It does what the gateway must do at minimum (parse JSON, build the provider request, one
upstream call, answer) and nothing it must not skip (journal, idempotency, log), so the ratio
of the gateway's CPU per payment to this one's is the cost of resilience.
"""

from __future__ import annotations

import sys
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web


def main(port: int, upstream: str) -> None:
    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(upstream)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        card = body["payment_method"]
        form = urlencode({"amount": body["amount"], "currency": body["currency"].lower(), "confirm": "true",
                          "payment_method_data[card][number]": card["number"],
                          "metadata[gateway_payment_id]": request.headers["Idempotency-Key"]})
        async with request.app["session"].post(
            "/v1/payment_intents", data=form,
            headers={"Authorization": "Bearer sk_test_bench", "Idempotency-Key": request.headers["Idempotency-Key"],
                     "Content-Type": "application/x-www-form-urlencoded"}) as resp:
            answer = orjson.loads(await resp.read())
        return web.Response(body=orjson.dumps({"id": answer.get("id"), "status": answer.get("status")}),
                            content_type="application/json", status=201)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/payments", forward)
    import uvloop

    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
