"""The production configuration, pointed at loopback: what the rehearsal's gateway runs with.

Kept as it is (that is the point of a rehearsal): the engine (deadline, retry budget, demotion),
every provider's timeouts, breaker, retry, bulkhead and connection settings, the routes, the auth
clients, the log's queue and backlog limits. Replaced, because a rehearsal must touch nothing
real: every `base_url` (the provider's emulator on 127.0.0.1), the TLS files (dev certificates
of the run: a CA, each provider's client pair), storage (SQLite in the run directory: never the
production journal), the transaction log's directory, the server (127.0.0.1, a free port, plain
HTTP), and what reaches out (merchant notifications off, tracing off, breaker sync local).
Secrets keep their variable names; the child gateway gets dev values for them in its own
environment.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.certs.devca import DevCertLayout
from gateway.drill.runner import PROVIDER_DEV_KEYS, WEBHOOK_DEV_SECRETS

HOST = "127.0.0.1"


def rehearsal_config(prod: Mapping[str, Any], *, run_dir: Path, port: int, certs: DevCertLayout,
                     emulator_urls: Mapping[str, str]) -> dict[str, Any]:
    """`prod` (the YAML as read) with the replacements of the module doc."""
    data = {k: v for k, v in prod.items() if k not in ("notifications", "breaker_sync")}
    server = {k: v for k, v in dict(prod.get("server") or {}).items() if k != "tls"}
    data["server"] = {**server, "host": HOST, "port": port}
    storage = dict(prod.get("storage") or {})
    data["storage"] = {"backend": "sqlite", "sqlite_path": str(run_dir / "gateway.db"),
                       **({"idempotency_retention_h": storage["idempotency_retention_h"]}
                          if "idempotency_retention_h" in storage else {})}
    data["log"] = {**dict(prod.get("log") or {}), "dir": str(run_dir), "file": "transactions.jsonl"}
    data["observability"] = {"tracing": {"enabled": False}}
    providers: dict[str, Any] = {}
    for name, provider in dict(prod.get("providers") or {}).items():
        tls = dict(provider.get("tls") or {})
        new_tls = {"ca": str(certs.provider_ca(name))} if emulator_urls[name].startswith("https") else {}
        if tls.get("client_cert") and new_tls:
            new_tls.update(client_cert=str(certs.client_cert(name)), client_key=str(certs.client_key(name)))
        providers[name] = {**provider, "base_url": emulator_urls[name], "tls": new_tls}
    data["providers"] = providers
    return data


def uses_tls(provider: Mapping[str, Any]) -> bool:
    return str(provider.get("base_url", "")).startswith("https")


def uses_mtls(provider: Mapping[str, Any]) -> bool:
    return uses_tls(provider) and bool((provider.get("tls") or {}).get("client_cert"))


def gateway_quotas(data: dict[str, Any], quotas: Mapping[str, tuple[float, int]]) -> dict[str, Any]:
    """THE place the rehearsal sets `providers.<name>.rate_limit_per_s` and `rate_limit_burst`
    (name -> (rate, burst)) where production sets none, so the gateway spills over before the
    provider's 429s start, as the verdict then suggests for production. Returns what it set."""
    applied: dict[str, Any] = {}
    for name, (rate, burst) in quotas.items():
        provider = data["providers"][name]
        if provider.get("rate_limit_per_s") is not None:  # production already sets one: keep it
            applied[name] = {"rate_limit_per_s": provider["rate_limit_per_s"], "from": "config"}
            continue
        provider["rate_limit_per_s"] = rate
        provider["rate_limit_burst"] = burst
        applied[name] = {"rate_limit_per_s": rate, "rate_limit_burst": burst, "from": "rehearsal"}
    return applied


def secret_env(data: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Dev values for every secret variable the configuration names, and the key of the client
    the load uses (the first that may write payments)."""
    env: dict[str, str] = {}
    load_key = ""
    for client in data["auth"]["clients"]:
        key = f"rehearse_{secrets.token_urlsafe(24)}"
        env[client["key_env"]] = key
        if not load_key and "payments:write" in client.get("permissions", ("payments:write",)):
            load_key = key
    for provider in data["providers"].values():
        env[provider["api_key_env"]] = PROVIDER_DEV_KEYS[provider["kind"]]
        for var in provider.get("webhook_key_envs") or ():
            env[var] = WEBHOOK_DEV_SECRETS[provider["kind"]]
    if not load_key:
        raise ValueError("auth.clients: no client with payments:write to send the rehearsal's payments")
    return env, load_key
