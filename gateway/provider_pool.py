"""The runtime side of each configured provider: mapping, transport, breaker, bulkhead, quota,
and the recent success and latency windows the router demotes by.

Built once at start from configuration; the app's cleanup context opens and closes the
transports (one keep-alive ClientSession per provider).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

from domain.outcome import LocalRefusal
from gateway.breaker import ProviderBreaker
from gateway.bulkhead import Bulkhead
from gateway.certs.check import CertificateProblem
from gateway.certs.tls import TlsFileError, client_context, load_pair, untrusting_client_context
from gateway.config import EngineConfig, GatewayConfig, ProviderConfig
from gateway.latency_window import LatencyWindow
from gateway.quota.provider import ProviderQuota
from gateway.quota.shared import RedisBuckets
from gateway.success_window import SuccessWindow
from providers.base import ProviderMapping
from providers.registry import KINDS
from providers.transport import ProviderTransport


HOLD_OFF_S = 1.0  # a 429 without Retry-After: wait this long before the next request
HOLD_OFF_MAX_S = 60.0  # the longest wait a provider's Retry-After can ask for


@dataclass(slots=True)
class ProviderHandle:
    name: str
    config: ProviderConfig
    mapping: ProviderMapping
    transport: ProviderTransport
    breaker: ProviderBreaker
    bulkhead: Bulkhead
    ssl_context: ssl.SSLContext | None
    success: SuccessWindow
    latency: LatencyWindow
    quota: ProviderQuota | None = None  # None: no rate_limit_per_s configured
    certificate_problem: str | None = None  # files that did not load at start; then the watcher's
    held_off_until: float = 0.0  # time.monotonic(): the provider's 429 said to wait until then

    def hold_off(self, retry_after_s: float | None) -> None:
        """The provider answered 429: send it nothing until its Retry-After (HOLD_OFF_S without
        one, at most HOLD_OFF_MAX_S; 0: no wait) has passed. Its account is past its quota, which
        the next request would only meet again; that is no breaker failure, and it ends by itself."""
        wait = HOLD_OFF_S if retry_after_s is None else min(HOLD_OFF_MAX_S, max(0.0, retry_after_s))
        if wait > 0:
            self.held_off_until = max(self.held_off_until, time.monotonic() + wait)

    def held_off_s(self) -> float:
        """Seconds the provider's last 429 still asks us to wait (0.0: none)."""
        return max(0.0, self.held_off_until - time.monotonic()) if self.held_off_until else 0.0

    @property
    def timeout_s(self) -> float:
        return self.config.timeout_ms / 1000

    def unusable_reason(self) -> str | None:
        """Why the router must not send this provider a call right now."""
        if self.certificate_problem is not None:
            return self.certificate_problem
        if not self.breaker.allows_call():
            return "breaker_open"
        if self.bulkhead.full:
            return "bulkhead_full"
        return None

    def routing_reason(self) -> str | None:
        """Why the router must skip this provider for a payment now: unusable, or its quota has
        no token (a passing state of the account, not of this replica: /readyz ignores it)."""
        reason = self.unusable_reason()
        if reason is None and (self.held_off_s() > 0 or (self.quota is not None and not self.quota.has_token())):
            return LocalRefusal.OVER_QUOTA
        return reason


def provider_ssl_context(cfg: ProviderConfig) -> tuple[ssl.SSLContext | None, CertificateProblem | None]:
    """The provider's client TLS context, and why its files make the provider unusable.

    A file that does not load (missing, empty, garbled, a key of another certificate) takes this
    provider out of service, not the gateway: the context is built without it (no client
    certificate, or no trusted CA so that no handshake verifies), the router skips the provider,
    and the certificate watcher names the file and loads the fixed one into this same context.
    """
    if not cfg.base_url.startswith("https://"):
        return None, None
    tls, problem = cfg.tls, None
    try:
        ctx = client_context(tls.ca)
    except TlsFileError:
        ctx, problem = untrusting_client_context(), CertificateProblem.CA_INVALID
    if tls.client_cert is not None:
        try:
            load_pair(ctx, tls.client_cert, tls.client_key)
        except TlsFileError:
            problem = problem or CertificateProblem.CLIENT_INVALID
    return ctx, problem


TlsSetup = tuple[ssl.SSLContext | None, CertificateProblem | None]


def make_handle(name: str, cfg: ProviderConfig, engine: EngineConfig, *, tls: TlsSetup | None = None,
                quota_share: int = 1, shared_quota: RedisBuckets | None = None) -> ProviderHandle:
    """One provider's runtime parts, from its configuration (its transport not yet started).
    `tls`: its `provider_ssl_context` already built (preflight builds it off the event loop).
    `quota_share`: how many processes keep the account's quota when it is not shared
    (`gateway.quota.provider`); `shared_quota`: the fleet's buckets in Redis."""
    ctx, problem = tls if tls is not None else provider_ssl_context(cfg)
    capacity = cfg.quota_capacity
    return ProviderHandle(
        name=name,
        config=cfg,
        mapping=KINDS[cfg.kind].mapping(name, cfg.api_key.get_secret_value(), merchant_account=cfg.merchant_account),
        transport=ProviderTransport(name, cfg.base_url, ssl_context=ctx, connect_timeout_s=cfg.connect_timeout_ms / 1000,
                                    max_connections=cfg.connections),
        breaker=ProviderBreaker(name, fail_max=cfg.breaker.fail_max, reset_timeout_s=cfg.breaker.reset_timeout_s),
        bulkhead=Bulkhead(cfg.bulkhead.max_concurrent, cfg.bulkhead.max_queue),
        ssl_context=ctx,
        success=SuccessWindow(engine.health_window_s, engine.health_min_samples),
        latency=LatencyWindow(engine.latency_window, engine.health_window_s, engine.health_min_samples),
        quota=None if cfg.rate_limit_per_s is None or capacity is None else
        ProviderQuota(name, cfg.rate_limit_per_s, capacity, share=quota_share, shared=shared_quota),
        certificate_problem=problem,
    )


class ProviderPool:
    def __init__(self, config: GatewayConfig, *, quota_share: int = 1,
                 shared_quota: RedisBuckets | None = None) -> None:
        self._handles = {name: make_handle(name, cfg, config.engine, quota_share=quota_share, shared_quota=shared_quota)
                         for name, cfg in config.providers.items()}
        self._open = contextlib.AsyncExitStack()

    def __getitem__(self, name: str) -> ProviderHandle:
        return self._handles[name]

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def __iter__(self) -> Iterator[ProviderHandle]:
        return iter(self._handles.values())

    def client_contexts(self) -> dict[str, ssl.SSLContext]:
        """Each HTTPS provider's live client TLS context, for the certificate watcher to reload."""
        return {h.name: h.ssl_context for h in self._handles.values() if h.ssl_context is not None}

    def set_certificate_problem(self, name: str, problem: str | None) -> None:
        """The certificate watcher's callback: why this provider's TLS files make it unusable
        (client certificate expired, not yet valid or invalid; CA bundle invalid), or None once
        good ones are loaded."""
        self._handles[name].certificate_problem = problem

    def health(self, name: str) -> str | None:
        return self._handles[name].routing_reason()

    def success_rate(self, name: str) -> float | None:
        return self._handles[name].success.rate()

    def latency_p99_ms(self, name: str) -> float | None:
        return self._handles[name].latency.p99_ms()

    def quota_wait_s(self, name: str) -> float | None:
        """Seconds until the provider's quota has a token and its last 429's wait is over (0.0:
        now); None without a quota and without a 429 to wait out."""
        handle = self._handles[name]
        held = handle.held_off_s()
        if handle.quota is None:
            return held or None
        return max(held, handle.quota.wait_s())

    async def start(self) -> None:
        """Open every transport; if one fails to start, close those already open."""
        async with contextlib.AsyncExitStack() as stack:
            for handle in self._handles.values():
                await handle.transport.start()
                stack.push_async_callback(handle.transport.close)
            self._open = stack.pop_all()

    async def close(self) -> None:
        await self._open.aclose()
