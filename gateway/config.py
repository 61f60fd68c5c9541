"""Configuration is data: one YAML file, validated once at start.

Every error names the field path (`providers.stripe.timeout_ms: ...`). Secrets never live in
the YAML: the file names an environment variable and the value is read at load time into a
`SecretStr`, which prints as `**********`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator

PositiveMs = Annotated[int, Field(gt=0, le=600_000)]
Permission = Literal["payments:write", "payments:read", "admin"]


class ConfigError(Exception):
    """Start-up stops with this; its message names each bad field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _secret_from_env(var: str, field: str) -> SecretStr:
    value = os.environ.get(var)
    if not value:
        raise ValueError(f"environment variable {var} (named by {field}) is not set")
    return SecretStr(value)


def _webhook_key(kind: str, var: str) -> SecretStr:
    secret = _secret_from_env(var, "webhook_key_envs")
    if kind == "adyen":
        try:
            bytes.fromhex(secret.get_secret_value())
        except ValueError:
            raise ValueError(f"environment variable {var} (named by webhook_key_envs) is not an Adyen HMAC key: "
                             "Adyen shows it as hexadecimal") from None
    return secret


class TlsServerConfig(_Model):
    cert: Path
    key: Path
    client_ca: Path | None = None


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls: TlsServerConfig | None = None
    max_body_bytes: int = Field(64 * 1024, gt=0, le=10 * 1024 * 1024)
    # A request body still arriving after this is refused (408 body_timeout) and its connection
    # closed: a client trickling a body would otherwise hold a handler and a socket for ever.
    body_timeout_s: float = Field(10.0, gt=0, le=300)
    shutdown_grace_s: float = Field(10.0, ge=0, le=300)
    max_in_flight: int = Field(1000, gt=0)


class ClientKey(_Model):
    name: str
    key_env: str
    permissions: tuple[Permission, ...] = ("payments:write", "payments:read")
    _key: SecretStr = PrivateAttr()

    @model_validator(mode="after")
    def _load(self) -> Self:
        self._key = _secret_from_env(self.key_env, "key_env")
        return self

    @property
    def key(self) -> SecretStr:
        return self._key


class AuthConfig(_Model):
    clients: tuple[ClientKey, ...] = Field(min_length=1)


class PostgresPoolConfig(_Model):
    """Each replica process holds up to `max_size` connections: replicas x workers x max_size
    must stay below the server's max_connections minus its reserve (README, scale-out)."""

    min_size: int = Field(2, ge=0, le=500)
    max_size: int = Field(10, ge=1, le=500)
    acquire_timeout_s: float = Field(2.0, gt=0, le=60)  # no free connection by then: 503 journal_unavailable
    command_timeout_s: float = Field(5.0, gt=0, le=300)
    connect_timeout_s: float = Field(5.0, gt=0, le=60)

    @model_validator(mode="after")
    def _sizes(self) -> Self:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self


class StorageConfig(_Model):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    sqlite_path: Path = Path("data/gateway.db")
    # Operations waiting for the SQLite writer thread; past this, requests are shed with 503.
    sqlite_queue_size: int = Field(10_000, gt=0, le=1_000_000)
    postgres_dsn_env: str = "GATEWAY_PG_DSN"
    postgres_pool: PostgresPoolConfig = PostgresPoolConfig()
    idempotency_retention_h: float = Field(24.0, gt=0)
    # Apply pending schema migrations at start (PostgreSQL: under an advisory lock, the first
    # replica does it). false: refuse to start until `gateway db migrate` has run.
    auto_migrate: bool = True
    # PostgreSQL: how long start-up waits (retrying with backoff) for a database that is down.
    start_wait_s: float = Field(30.0, ge=0, le=3600)
    # How often /readyz's journal probe checks that the journal takes writes.
    probe_interval_s: float = Field(2.0, gt=0, le=60)
    _postgres_dsn: SecretStr | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _load_dsn(self) -> Self:
        if self.backend == "postgres":  # the DSN holds a password: read from the environment, never the YAML
            self._postgres_dsn = _secret_from_env(self.postgres_dsn_env, "storage.postgres_dsn_env")
        return self

    @property
    def postgres_dsn(self) -> SecretStr:
        if self._postgres_dsn is None:
            raise RuntimeError("storage.backend is not postgres")
        return self._postgres_dsn


class BreakerSyncConfig(_Model):
    """Share breaker state across replicas: `none` keeps it per process; `redis` publishes each
    open/close and applies the fleet's (gateway/breaker_sync.py)."""

    backend: Literal["none", "redis"] = "none"
    redis_url_env: str = "GATEWAY_REDIS_URL"
    channel_prefix: str = Field("gateway:breaker", min_length=1, max_length=200)
    _redis_url: SecretStr | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _load_url(self) -> Self:
        if self.backend == "redis":
            self._redis_url = _secret_from_env(self.redis_url_env, "breaker_sync.redis_url_env")
        return self

    @property
    def redis_url(self) -> SecretStr:
        if self._redis_url is None:
            raise RuntimeError("breaker_sync.backend is not redis")
        return self._redis_url


class LogConfig(_Model):
    dir: Path = Path("logs")
    file: str = "transactions.jsonl"
    queue_size: int = Field(10_000, gt=0)
    max_bytes: int = Field(100 * 1024 * 1024, gt=1024)
    # New payments are refused (503 overloaded) while more transaction lines than this wait to
    # be on disk: a log that cannot be written must not let charges pile up unlogged.
    max_outbox_backlog: int = Field(1000, gt=0)
    # /readyz says the log is stalled once a line has waited this long for the disk.
    stall_after_s: float = Field(5.0, gt=0, le=300)


class ProviderTls(_Model):
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self


class BreakerConfig(_Model):
    fail_max: int = Field(5, gt=0)
    reset_timeout_s: float = Field(10.0, gt=0)


class RetryConfig(_Model):
    max_attempts: int = Field(3, ge=1, le=10)
    base_delay_ms: PositiveMs = 50
    max_delay_ms: PositiveMs = 1000

    @model_validator(mode="after")
    def _delays(self) -> Self:
        if self.max_delay_ms < self.base_delay_ms:
            raise ValueError("max_delay_ms must be at least base_delay_ms")
        return self


class BulkheadConfig(_Model):
    max_concurrent: int = Field(200, gt=0)
    max_queue: int = Field(200, ge=0)


class ProviderConfig(_Model):
    kind: Literal["stripe", "adyen", "checkout"]
    base_url: str = Field(pattern=r"^https?://")
    api_key_env: str
    merchant_account: str | None = None
    connect_timeout_ms: PositiveMs = 1000
    timeout_ms: PositiveMs = 5000
    # The connection pool's width; None: the bulkhead's `max_concurrent` (see `connections`).
    max_connections: int | None = Field(None, gt=0)
    tls: ProviderTls = ProviderTls()
    breaker: BreakerConfig = BreakerConfig()
    retry: RetryConfig = RetryConfig()
    bulkhead: BulkheadConfig = BulkheadConfig()
    # What the provider's contract lets it take (ISO 4217 / ISO 3166 codes); None means any.
    # `gateway preflight` checks that every route's backups can take the route's traffic.
    currencies: tuple[str, ...] | None = None
    countries: tuple[str, ...] | None = None
    # The account takes shopper actions (3-D Secure redirects); a route may prefer such providers
    # for payments that bring a return URL (`routes[].prefer_redirects`).
    redirects: bool = True
    # The keys this provider signs its webhooks with, each read from the environment variable
    # named here; several at once while ops rotate one (Stripe `whsec_…`, Adyen's HMAC key in
    # hex, Checkout.com's webhook secret key). None: POST /v1/webhooks/<name> answers 404.
    webhook_key_envs: tuple[str, ...] = Field((), max_length=5)
    # The account's request quota at the provider (Stripe: 100/s live, 25/s test): every request
    # (payment, follow-up, status query) takes a token of a bucket refilled at this rate, holding
    # at most `rate_limit_burst` (default one second's worth). An empty bucket: payments spill
    # over to the next provider, follow-ups wait within their deadline (gateway/quota/).
    # None: no limit kept here.
    # Strict: `true` is no rate (YAML would coerce it to 1.0), and NaN is refused as not finite.
    rate_limit_per_s: float | None = Field(None, gt=0, le=1_000_000, strict=True, allow_inf_nan=False)
    rate_limit_burst: int | None = Field(None, ge=1, le=1_000_000, strict=True)
    _api_key: SecretStr = PrivateAttr()
    _webhook_keys: tuple[SecretStr, ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _load(self) -> Self:
        if self.rate_limit_burst is not None and self.rate_limit_per_s is None:
            raise ValueError("rate_limit_burst needs rate_limit_per_s (a bucket with no refill rate)")
        if self.max_connections is not None and self.max_connections < self.bulkhead.max_concurrent:
            raise ValueError(
                f"max_connections ({self.max_connections}) is below bulkhead.max_concurrent "
                f"({self.bulkhead.max_concurrent}): calls the bulkhead admits would wait for a connection, and the "
                "wait counts against connect_timeout_ms as if the provider failed; raise max_connections or "
                "leave it out (it follows the bulkhead)")
        if self.kind == "adyen" and not self.merchant_account:
            raise ValueError("merchant_account is required for kind adyen (every Adyen request names one)")
        self._api_key = _secret_from_env(self.api_key_env, "api_key_env")
        self._webhook_keys = tuple(_webhook_key(self.kind, var) for var in self.webhook_key_envs)
        return self

    @property
    def connections(self) -> int:
        """The pool's width: never below the bulkhead's, so every call it admits has a connection
        (aiohttp times a wait for one as part of connecting)."""
        return self.max_connections or self.bulkhead.max_concurrent

    @property
    def quota_capacity(self) -> int | None:
        """The most requests the quota lets through back to back, or None without a quota."""
        if self.rate_limit_per_s is None:
            return None
        return self.rate_limit_burst or max(1, math.ceil(self.rate_limit_per_s))

    @property
    def webhook_keys(self) -> tuple[SecretStr, ...]:
        return self._webhook_keys

    @property
    def api_key(self) -> SecretStr:
        return self._api_key


class RouteMatch(_Model):
    currencies: tuple[str, ...] | None = None
    countries: tuple[str, ...] | None = None
    brands: tuple[str, ...] | None = None
    merchants: tuple[str, ...] | None = None
    min_amount: int | None = Field(None, ge=0)
    max_amount: int | None = Field(None, ge=0)


class RouteConfig(_Model):
    name: str
    match: RouteMatch = RouteMatch()
    providers: tuple[str, ...] = Field(min_length=1)
    weights: tuple[float, ...] | None = None
    cascade_on: tuple[str, ...] = ()
    # Move a provider behind the others while its recent success rate is below this share
    # (engine.health_window_s, at least engine.health_min_samples calls); None: never.
    demote_below: float | None = Field(None, ge=0, le=1)
    # Move a provider behind the others while the p99 of its recent calls (the last
    # engine.latency_window calls within engine.health_window_s, at least
    # engine.health_min_samples of them) is above this; None: never.
    demote_above_p99_ms: float | None = Field(None, gt=0, le=600_000)
    # The return-URL policy for shopper actions (3-D Secure): `required` refuses a payment
    # without `return_url` (422 return_url_required); `optional` sends it without asking any
    # provider for a redirect. None: no policy, which `gateway preflight` reports for a route whose
    # providers may redirect.
    return_url: Literal["required", "optional"] | None = None
    # Payments with a return URL try the providers whose accounts take redirects first.
    prefer_redirects: bool = False

    @model_validator(mode="after")
    def _weights(self) -> Self:
        if self.weights is not None:
            if len(self.weights) != len(self.providers):
                raise ValueError("weights must have one entry per provider")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        return self


class EngineConfig(_Model):
    deadline_ms: PositiveMs = 8000
    retry_budget_ratio: float = Field(0.2, ge=0, le=1)
    retry_budget_min_per_s: float = Field(10.0, ge=0)
    retry_budget_window_s: float = Field(10.0, gt=0)
    health_window_s: float = Field(30.0, gt=0)
    health_min_samples: int = Field(20, ge=1)
    # How long after our last call an empty lookup may be trusted (the reconciler): past any
    # request still travelling to or running at a provider, and past a search index's lag.
    provider_in_flight_s: float = Field(60.0, gt=0)
    lookup_lag_s: float = Field(600.0, gt=0)
    # Calls kept per provider for its recent p99 (routes[].demote_above_p99_ms).
    latency_window: int = Field(200, ge=10, le=10_000)
    # Gateway processes (replicas, each with its workers) that run this configuration against
    # the same provider accounts. Where a quota is not shared through Redis (no breaker_sync,
    # or Redis unreachable), each process keeps rate_limit_per_s / (replicas x workers).
    replicas: int = Field(1, ge=1, le=1000)
    # A payment that finds every candidate at its quota waits for the first token if it comes
    # within this (and within a quarter of the time its deadline leaves); else it is answered
    # 503 overloaded with Retry-After, nothing sent and its key free to retry.
    quota_max_wait_ms: int = Field(200, ge=0, le=10_000)


class ThreeDSConfig(_Model):
    """Shopper actions (3-D Secure, redirects)."""

    # A challenge the shopper has not finished this long after the answer is cancelled at the
    # provider by the reconciler and the payment fails `expired` (providers' own challenge
    # windows are 10-15 minutes; Checkout.com's redirect session lives for 15).
    action_expiry_s: float = Field(900.0, gt=0, le=86_400)
    # Accept `http://` return URLs to a loopback host (127.0.0.1, ::1, localhost): dev and tests
    # only. Otherwise a return URL must be https.
    allow_http_loopback_return_url: bool = False


class TracingConfig(_Model):
    """OpenTelemetry traces (gateway/tracing/): off by default; on, spans are batched and sent
    over OTLP/HTTP to `endpoint` (a collector's `/v1/traces`)."""

    enabled: bool = False
    endpoint: str = Field("http://127.0.0.1:4318/v1/traces", pattern=r"^https?://[^/\s]+(/\S*)?$")
    # Share of the traces the gateway starts that are kept; a caller's sampled flag always wins.
    sample_ratio: float = Field(1.0, ge=0, le=1)
    service_name: str = Field("payment-gateway", min_length=1, max_length=100)
    export_timeout_s: float = Field(10.0, gt=0, le=60)
    # Spans waiting for export; past this they are dropped (a collector that is down never slows a payment).
    max_queue_size: int = Field(2048, gt=0, le=1_000_000)


class ObservabilityConfig(_Model):
    tracing: TracingConfig = TracingConfig()


class NotificationsConfig(_Model):
    """Merchant notifications out (gateway/notifications/): off while `url` is absent.

    `secret_env` names one environment variable per active signing secret; every delivery is
    signed with each (one `v1` per secret in `Gateway-Signature`), so a rotation is: add the new
    variable, let the checkout accept the new secret, then remove the old one."""

    url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    secret_env: tuple[str, ...] = Field((), max_length=4, repr=False)  # names only, yet no "secret" in a repr
    timeout_s: float = Field(10.0, gt=0, le=60)  # one delivery attempt, connect to last byte
    connect_timeout_s: float = Field(3.0, gt=0, le=60)
    max_concurrency: int = Field(8, ge=1, le=256)  # deliveries in flight per process
    retry_base_s: float = Field(5.0, gt=0, le=3600)  # first pause after a failed attempt, doubling ...
    retry_max_s: float = Field(3600.0, gt=0, le=86400)  # ... up to this
    give_up_after_s: float = Field(3 * 86400.0, gt=0, le=30 * 86400)  # retry window from the event
    poll_interval_s: float = Field(1.0, gt=0, le=60)  # how often a sender looks for due rows
    retention_days: float = Field(30.0, gt=0, le=3650)  # delivered and given-up rows are kept this long
    _secrets: tuple[SecretStr, ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _load_secrets(self) -> Self:
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("retry_max_s must be at least retry_base_s")
        if self.url is None:
            return self
        if not self.secret_env:
            raise ValueError("secret_env: at least one variable is required when url is set (deliveries are signed)")
        loaded = []
        for i, var in enumerate(self.secret_env):
            secret = _secret_from_env(var, f"notifications.secret_env[{i}]")
            if len(secret.get_secret_value()) < MIN_SIGNING_SECRET:
                raise ValueError(f"secret_env[{i}]: {var} holds fewer than {MIN_SIGNING_SECRET} characters")
            loaded.append(secret)
        self._secrets = tuple(loaded)
        return self

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def secrets(self) -> tuple[SecretStr, ...]:
        return self._secrets


MIN_SIGNING_SECRET = 24  # characters; an HMAC key shorter than this is guessable offline


class GatewayConfig(_Model):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig
    storage: StorageConfig = StorageConfig()
    breaker_sync: BreakerSyncConfig = BreakerSyncConfig()
    log: LogConfig = LogConfig()
    engine: EngineConfig = EngineConfig()
    three_ds: ThreeDSConfig = ThreeDSConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    routes: tuple[RouteConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _routes_name_known_providers(self) -> Self:
        for route in self.routes:
            unknown = [p for p in route.providers if p not in self.providers]
            if unknown:
                raise ValueError(f"route {route.name!r} names unknown providers {unknown}")
        return self

    def secret_values(self) -> tuple[str, ...]:
        """Every secret value this configuration loaded (API keys, DSNs, ...), for the
        `Redactor` to hide wherever it meets one. Found by walking the models, so a secret
        added to any section is covered without being listed here."""
        found: list[str] = []
        _collect_secrets(self, found)
        return tuple(dict.fromkeys(found))


def _collect_secrets(value: Any, found: list[str]) -> None:
    if isinstance(value, SecretStr):
        found.append(value.get_secret_value())
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _collect_secrets(getattr(value, name), found)
        for private in (value.__pydantic_private__ or {}).values():
            _collect_secrets(private, found)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _collect_secrets(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_secrets(item, found)


def _format(exc: ValidationError) -> str:
    """Each error as `path: message`. An error on a field that also has errors inside it is their
    echo, not news (one bad route made pydantic add `routes: Tuple should have at least 1 item
    after validation, not 0`): only the inner ones are said."""
    errors = exc.errors()
    locs = [tuple(err["loc"]) for err in errors]
    lines = []
    for err, loc in zip(errors, locs):
        if any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs):
            continue
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {msg}")
    return "; ".join(lines)


_TOO_DEEP = "nested too deeply (no gateway setting is more than a few levels deep)"


def parse_config(data: Any) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    except RecursionError:
        raise ConfigError(_TOO_DEEP) from None


def load_config(path: Path) -> GatewayConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"not valid YAML: {_TOO_DEEP}") from None
    return parse_config(data)
