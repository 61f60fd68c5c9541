"""Configuration is validated once at start, and every error names the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config, parse_config


def base(**provider: Any) -> dict[str, Any]:
    return {
        "auth": {"clients": [{"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"}]},
        "providers": {"stripe": {"kind": "stripe", "base_url": "https://127.0.0.1:9101",
                                 "api_key_env": "STRIPE_API_KEY", **provider}},
        "routes": [{"name": "default", "providers": ["stripe"]}],
    }


def test_the_shipped_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in Path("config/dev.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            monkeypatch.setenv(key, value)
    config = load_config(Path("config/gateway.yaml"))
    assert set(config.providers) == {"stripe", "adyen", "checkout"}
    assert config.providers["stripe"].api_key.get_secret_value() == "sk_test_dev_gateway"
    assert "sk_test_dev_gateway" not in repr(config)


@pytest.mark.parametrize(("change", "message"), [
    ({"timeout_ms": 0}, "providers.stripe.timeout_ms: Input should be greater than 0"),
    ({"base_url": "ftp://x"}, "providers.stripe.base_url"),
    ({"retry": {"base_delay_ms": 500, "max_delay_ms": 100}}, "providers.stripe.retry: max_delay_ms must be at least"),
    ({"api_key_env": "NOT_SET_ANYWHERE"}, "NOT_SET_ANYWHERE"),
    ({"kind": "adyen"}, "merchant_account is required"),
    ({"surprise": 1}, "providers.stripe.surprise: Extra inputs are not permitted"),
])
def test_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(base(**change))
    assert message in str(err.value)


def test_route_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    data = base()
    data["routes"] = [{"name": "r", "providers": ["stripe", "nope"]}]
    with pytest.raises(ConfigError, match="unknown providers"):
        parse_config(data)
    data["routes"] = [{"name": "r", "providers": ["stripe"], "weights": [-1]}]
    with pytest.raises(ConfigError, match="routes.0: weights must be >= 0"):
        parse_config(data)


def test_a_bad_field_of_a_route_is_the_only_thing_said() -> None:
    """pydantic adds an echo on the list (`routes: Tuple should have at least 1 item after
    validation, not 0`) that sent readers looking for a missing route."""
    data = base()
    data["routes"] = [{"name": "r", "providers": ["stripe"], "demote_above_p99_ms": -5}]
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value) == "routes.0.demote_above_p99_ms: Input should be greater than 0"
    data["routes"] = []
    with pytest.raises(ConfigError, match="routes: Tuple should have at least 1 item"):
        parse_config(data)


def test_secrets_never_come_from_the_yaml() -> None:
    with pytest.raises(ConfigError, match="api_key: Extra inputs"):
        parse_config(base(api_key="sk_live_in_yaml"))


def test_an_unreadable_file_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_serve_with_a_bad_config_prints_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from gateway.cli import app

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base(timeout_ms=-5)))
    result = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "providers.stripe.timeout_ms" in lines[0]


def test_secret_values_lists_every_secret_the_config_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PG_DSN", "postgresql://gateway:pg-password@127.0.0.1/gateway")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://:redis-password@127.0.0.1:6379/0")
    data = {**base(), "storage": {"backend": "postgres"}, "breaker_sync": {"backend": "redis"}}

    secrets = parse_config(data).secret_values()

    assert set(secrets) == {"test-checkout-key", "sk_test_gateway", "postgresql://gateway:pg-password@127.0.0.1/gateway",
                            "redis://:redis-password@127.0.0.1:6379/0"}
