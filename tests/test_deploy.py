"""deploy/: the fleet's compose file, HAProxy configuration and replica configuration, linted.

The compose file is parsed as YAML (merge keys resolved, as compose does) and checked for what
the fleet's guarantees rest on: the services, their health checks, the start order (schema
migrated once before any replica starts), every secret coming from the environment, and the
PostgreSQL connection arithmetic. HAProxy's own checker (`haproxy -c`, Debian's package;
`.ci/services` installs it) validates haproxy.cfg, and its backend must be exactly the replicas.
The replica configuration is loaded by the gateway's own config loader.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig, load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPLICAS = ("gateway-1", "gateway-2", "gateway-3")
CONFIG_IN_CONTAINER = "/app/deploy/gateway.yaml"
SECRET = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")  # ${VAR:?message}: required from the environment


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture
def replica_config(monkeypatch: pytest.MonkeyPatch, compose: dict[str, Any]) -> GatewayConfig:
    for name in compose["services"]["gateway-1"]["environment"]:
        # Adyen shows its HMAC key in hexadecimal, and the config checks that it is.
        monkeypatch.setenv(name, "0123456789abcdef" * 4 if name == "ADYEN_HMAC_KEY" else f"value-of-{name}-long-enough")
    return load_config(DEPLOY / "gateway.yaml")


def _env_names(config: GatewayConfig) -> set[str]:
    names = {client.key_env for client in config.auth.clients}
    names |= {provider.api_key_env for provider in config.providers.values()}
    names |= {env for provider in config.providers.values() for env in provider.webhook_key_envs}
    names |= set(config.notifications.secret_env)
    names |= {config.storage.postgres_dsn_env, config.breaker_sync.redis_url_env}
    return names


def test_services_are_the_fleet(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"haproxy", *REPLICAS, "migrate", "postgres", "redis"}


def test_replicas_serve_the_fleet_config_health_checked_on_readyz(compose: dict[str, Any],
                                                                  replica_config: GatewayConfig) -> None:
    log_volumes = set()
    for name in REPLICAS:
        service = compose["services"][name]
        assert service["command"][:3] == ["serve", "--config", CONFIG_IN_CONTAINER], name
        assert f"./gateway.yaml:{CONFIG_IN_CONTAINER}:ro" in service["volumes"], name
        check = " ".join(service["healthcheck"]["test"])
        assert "http://127.0.0.1:8080/readyz" in check, name
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > replica_config.server.shutdown_grace_s, f"{name}: SIGKILL before the drain ends"
        [logs] = [v for v in service["volumes"] if v.endswith(":/app/logs")]
        log_volumes.add(logs)
    assert len(log_volumes) == len(REPLICAS), "each replica writes its own transaction log"


def test_every_secret_comes_from_the_environment(compose: dict[str, Any], replica_config: GatewayConfig) -> None:
    for name in (*REPLICAS, "migrate"):
        env = compose["services"][name]["environment"]
        assert _env_names(replica_config) <= set(env), f"{name} lacks a variable the config names"
        for var, value in env.items():
            if var == "GATEWAY_REDIS_URL":
                assert value == "redis://redis:6379/0"
            elif var == "GATEWAY_PG_DSN":
                assert value.startswith("postgresql://gateway:${POSTGRES_PASSWORD:?") and "@postgres:5432/" in value
            else:
                assert SECRET.match(value), f"{name}: {var} must be ${{{var}:?...}}, never a value in the file"
    assert SECRET.match(compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"])


def test_schema_is_migrated_once_before_any_replica_starts(compose: dict[str, Any],
                                                           replica_config: GatewayConfig) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["db", "migrate", "--config", CONFIG_IN_CONTAINER]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no" and migrate["healthcheck"] == {"disable": True}
    assert replica_config.storage.backend == "postgres" and replica_config.storage.auto_migrate is False
    assert replica_config.breaker_sync.backend == "redis"


def test_stores_are_health_checked_and_the_connections_add_up(compose: dict[str, Any],
                                                              replica_config: GatewayConfig) -> None:
    services = compose["services"]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    settings = dict(re.findall(r"(\w+)=(\w+)", " ".join(services["postgres"]["command"])))
    workers = 1  # `serve` without --workers
    needed = len(REPLICAS) * workers * replica_config.storage.postgres_pool.max_size + 1  # + the migrate job
    assert needed <= int(settings["max_connections"]) - int(settings["superuser_reserved_connections"])


def _haproxy() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        pytest.fail("haproxy is not installed: run .ci/services as root (it installs Debian's haproxy)")
    return found


def test_haproxy_config_is_valid_by_haproxy_itself() -> None:
    done = subprocess.run([_haproxy(), "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True,
                          timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    warnings = [line for line in output.splitlines() if "[WARNING]" in line or "[ALERT]" in line]
    # Only the replicas' names, which resolve inside the compose network, not here.
    assert all("could not resolve address 'gateway-" in line for line in warnings), warnings


def test_haproxy_balances_over_exactly_the_replicas_checking_readyz(replica_config: GatewayConfig) -> None:
    lines = [line.split("#", 1)[0].strip() for line in (DEPLOY / "haproxy.cfg").read_text().splitlines()]
    sections: dict[str, list[str]] = {}
    current = ""
    for line in filter(None, lines):
        if re.match(r"^(global|defaults|resolvers|frontend|backend|listen)\b", line):
            current = line
            sections[current] = []
        else:
            sections[current].append(line)
    backend = sections["backend gateways"]
    assert "balance roundrobin" in backend and "option httpchk" in backend
    assert "http-check send meth GET uri /readyz" in backend and "http-check expect status 200" in backend
    servers = [line.split()[1:3] for line in backend if line.startswith("server ")]
    assert servers == [[name, f"{name}:8080"] for name in REPLICAS]
    defaults = sections["defaults"]
    timeouts = {line.split()[1]: line.split()[2] for line in defaults if line.startswith("timeout ")}
    assert {"connect", "client", "server", "check", "http-request", "queue"} <= set(timeouts)
    assert float(timeouts["server"].removesuffix("s")) * 1000 > replica_config.engine.deadline_ms, \
        "HAProxy must not cut a payment the gateway is still deciding"
    assert "retry-on conn-failure" in defaults, "only a request that never reached a replica is retried"
    assert any(line.startswith("default-server") and " check " in f" {line} " for line in defaults)
    assert "bind :8080" in sections["frontend payments"]


def test_haproxy_runtime_api_for_draining_is_published_to_operators_only(compose: dict[str, Any]) -> None:
    """The rolling restart drains a replica through HAProxy's runtime API (`set server
    gateways/gateway-1 state drain`), as the fleet drill does: it must exist, at admin level,
    and be reachable from the host's loopback only."""
    config = (DEPLOY / "haproxy.cfg").read_text()
    [socket_line] = [line.strip() for line in config.splitlines() if line.strip().startswith("stats socket")]
    address = socket_line.split()[2]
    assert socket_line.endswith("level admin")
    port = address.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}:{port}" in compose["services"]["haproxy"]["ports"]
