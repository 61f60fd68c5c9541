"""`make run`: the whole stack on loopback in one process, stopped cleanly by Ctrl-C. Each
emulator stands in for its provider's account, with the quota the configuration gives it
(`providers.<name>.rate_limit_per_s`): the gateway's bucket and the account's are the same."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

from gateway.app import build_app
from gateway.certs.devca import generate_dev_certs
from gateway.certs.tls import server_context
from gateway.config import ConfigError, GatewayConfig
from gateway.emulator_launch import account_quota, start_emulator
from emulators.server import EmulatorServer
from emulators.webhooks import WebhookTarget
from providers.registry import KINDS


async def run_dev_stack(cfg: GatewayConfig, certs_dir: Path) -> None:
    layout = generate_dev_certs(certs_dir, sorted(KINDS))
    emulators: list[EmulatorServer] = []
    runner: web.AppRunner | None = None
    try:
        for name, provider in cfg.providers.items():
            url = urlparse(provider.base_url)
            if url.hostname not in ("127.0.0.1", "localhost"):
                raise ConfigError(f"providers.{name}.base_url: the dev stack only runs emulators on loopback")
            tls = url.scheme == "https"
            emulators.append(await start_emulator(
                provider.kind, port=url.port or 0, admin_port=(url.port or 0) + 100, certs=layout if tls else None,
                require_client_cert=provider.tls.client_cert is not None, quota=account_quota(provider)))
        app = build_app(cfg)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.server.shutdown_grace_s)
        await runner.setup()
        tls = cfg.server.tls
        ssl_ctx = server_context(tls.cert, tls.key) if tls else None
        await web.TCPSite(runner, cfg.server.host, cfg.server.port, ssl_context=ssl_ctx).start()
        _point_webhooks(cfg, emulators)
        _print_banner(cfg, emulators)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("\nstopping: draining in-flight requests…", flush=True)
    finally:
        if runner is not None:
            await runner.cleanup()
        for emulator in emulators:
            await emulator.stop()


def _point_webhooks(cfg: GatewayConfig, emulators: list[EmulatorServer]) -> None:
    """Each emulator posts its signed notifications to the gateway, as ops set up at each real
    provider (README, "Provider webhooks in"): Adyen's pending payments and every asynchronous
    capture, refund or void settle by them."""
    base = f"{'https' if cfg.server.tls else 'http'}://{cfg.server.host}:{cfg.server.port}"
    for (name, provider), server in zip(cfg.providers.items(), emulators, strict=True):
        if provider.webhook_keys:
            server.emulator.webhooks.set_target(WebhookTarget(url=f"{base}/v1/webhooks/{name}",
                                                              secret=provider.webhook_keys[0]))


def _print_banner(cfg: GatewayConfig, emulators: list[EmulatorServer]) -> None:
    scheme = "https" if cfg.server.tls else "http"
    base = f"{scheme}://{cfg.server.host}:{cfg.server.port}"
    client = cfg.auth.clients[0]
    cacert = f" --cacert {cfg.server.tls.cert}" if cfg.server.tls else ""
    print(f"\ngateway on {base}  (metrics {base}/metrics, API spec {base}/openapi.json)")
    admins = [c for c in cfg.auth.clients if "admin" in c.permissions]
    if admins:  # the dev stack's own key from config/dev.env, like the curl's below
        print(f"live console {base}/console  (sign in with {admins[0].key.get_secret_value()}, "
              f"from {admins[0].key_env})")
    for e in emulators:
        print(f"  {e.emulator.name:9} emulator {e.url}   ledger: curl {e.admin_url}/_emulator/ledger")
    key_ref = client.key.get_secret_value()  # the dev stack's own key from config/dev.env
    print(f"""
Send a payment (paste this):

  curl -s{cacert} {base}/v1/payments \\
    -H "Authorization: Bearer {key_ref}" \\
    -H "Idempotency-Key: $(date +%s%N)" \\
    -H "Content-Type: application/json" \\
    -d '{{"amount": 1299, "currency": "EUR", "merchant_reference": "order-1",
         "payment_method": {{"type": "card", "number": "4242424242424242", "exp_month": 12,
                             "exp_year": 2030, "cvc": "123"}}}}'

Ctrl-C stops everything.
""", flush=True)
