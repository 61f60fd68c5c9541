"""Shared fixtures: real dev certificates, real emulators over mTLS, the real gateway app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.certs.devca import DevCertLayout, generate_dev_certs
from gateway.config import GatewayConfig, parse_config
from gateway.emulator_launch import start_emulator
from emulators.server import EmulatorServer
from providers.registry import KINDS

CHECKOUT_KEY = "test-checkout-key"
READER_KEY = "test-reporting-key"
PROVIDER_KEYS = {"stripe": "sk_test_gateway", "adyen": "adyen_test_key", "checkout": "sk_sbox_gateway"}
AUTH = {"Authorization": f"Bearer {CHECKOUT_KEY}"}
# Soft declines that may cascade, in each provider's own codes (Stripe, Adyen, Checkout.com).
CASCADE_ON = ["do_not_honor", "issuer_not_available", "2:05", "9", "20005", "20068", "20091"]


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertLayout:
    return generate_dev_certs(tmp_path_factory.mktemp("certs"), sorted(KINDS))


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KEY_CHECKOUT", CHECKOUT_KEY)
    monkeypatch.setenv("GATEWAY_KEY_REPORTING", READER_KEY)
    for kind, key in PROVIDER_KEYS.items():
        monkeypatch.setenv(f"{kind.upper()}_API_KEY", key)


@pytest.fixture
async def emulators(dev_certs: DevCertLayout) -> AsyncIterator[dict[str, EmulatorServer]]:
    servers: dict[str, EmulatorServer] = {}
    try:
        for kind in sorted(KINDS):
            servers[kind] = await start_emulator(kind, certs=dev_certs)
        yield servers
    finally:
        for server in servers.values():
            await server.stop()


def gateway_config_data(tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer],
                        order: tuple[str, ...] = ("stripe", "adyen", "checkout"), **overrides: Any) -> dict[str, Any]:
    providers = {}
    for name in order:
        server = emulators[name]
        providers[name] = {
            "kind": name,
            "base_url": server.url,
            "api_key_env": f"{name.upper()}_API_KEY",
            "merchant_account": "GatewayTestECOM",
            "connect_timeout_ms": 300,
            "timeout_ms": 1000,
            "tls": {"ca": str(certs.provider_ca(name)), "client_cert": str(certs.client_cert(name)),
                    "client_key": str(certs.client_key(name))},
            "breaker": {"fail_max": 3, "reset_timeout_s": 30},
            "retry": {"max_attempts": 2, "base_delay_ms": 5, "max_delay_ms": 20},
        }
    data: dict[str, Any] = {
        "auth": {"clients": [
            {"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"},
            {"name": "reporting", "key_env": "GATEWAY_KEY_REPORTING", "permissions": ["payments:read"]},
        ]},
        "storage": {"sqlite_path": str(tmp_path / "data" / "gateway.db")},
        "log": {"dir": str(tmp_path / "logs")},
        "engine": {"deadline_ms": 5000},
        "providers": providers,
        "routes": [{"name": "default", "providers": list(order),
                    "cascade_on": CASCADE_ON}],
    }
    for key, value in overrides.items():
        data[key] = value
    return data


@pytest.fixture
def make_config(tmp_path: Path, dev_certs: DevCertLayout,
                emulators: dict[str, EmulatorServer]) -> Callable[..., GatewayConfig]:
    def make(**kwargs: Any) -> GatewayConfig:
        return parse_config(gateway_config_data(tmp_path, dev_certs, emulators, **kwargs))

    return make


@pytest.fixture
def start_gateway(aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    """`start(config, **build_app_kwargs)`: the gateway on a test server (no reconciler pass
    during the test unless asked for)."""
    async def start(config: GatewayConfig, **kwargs: Any) -> TestClient:
        app: web.Application = build_app(config, **{"reconcile_interval_s": 3600, **kwargs})
        return await aiohttp_client(app)

    return start


def card_payment(number: str = "4242424242424242", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": 1299, "currency": "EUR", "merchant_reference": "order-1",
        "payment_method": {"type": "card", "number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"},
    }
    body.update(extra)
    return body
