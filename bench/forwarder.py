"""The baseline of the performance budget: a bare aiohttp forwarder with one keep-alive session.

It does what the gateway must do at minimum (parse JSON, build the provider request, one
upstream call, answer) and nothing it must not skip (journal, idempotency, log), so the ratio
of the gateway's CPU per payment to this one's is the cost of resilience.

    python bench/forwarder.py PORT UPSTREAM [--ca CA --cert CERT --key KEY]

With `--ca/--cert/--key` it calls the upstream over mTLS with the same client context the
gateway builds (`gateway.certs.tls.client_context`), so the mTLS rows compare like with like.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import orjson
import uvloop
from aiohttp import web

from gateway.certs.tls import client_context


def main(port: int, upstream: str, tls: tuple[Path, Path, Path] | None) -> None:
    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        ssl = client_context(*tls) if tls is not None else None
        app["session"] = aiohttp.ClientSession(upstream, connector=aiohttp.TCPConnector(ssl=ssl) if ssl else None)
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

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/payments", forward)
    app.router.add_get("/healthz", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("upstream")
    ap.add_argument("--ca", type=Path)
    ap.add_argument("--cert", type=Path)
    ap.add_argument("--key", type=Path)
    args = ap.parse_args()
    main(args.port, args.upstream, (args.ca, args.cert, args.key) if args.ca else None)
