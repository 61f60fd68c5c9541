"""The gateway's own provider call, for tests that talk to one emulator.

Provider tests used to build, send and classify a request by hand, and translate transport
errors themselves: a copy of the gateway's call that could drift from it unseen. `GatewayCalls`
is instead a `ProviderClient` on a handle that `make_handle` builds from a `ProviderConfig`, as
`ProviderPool` does for the running gateway, so these tests exercise exactly the build, send,
classification and error translation the gateway runs (its status queries included, through
`ProviderClient.lookup` and the mapping's `parse_status`).

The API key comes from the environment variable the config names, as in production; the autouse
fixture in `tests/conftest.py` sets `STRIPE_API_KEY`, `ADYEN_API_KEY` and `CHECKOUT_API_KEY`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from domain.types import FollowUp, Operation, PaymentOrder, ProviderResult, StatusAnswer
from gateway.config import BreakerConfig, EngineConfig, ProviderConfig
from gateway.metrics import Metrics
from gateway.provider_client import ProviderClient
from gateway.provider_pool import make_handle
from providers.base import ProviderMapping
from providers.transport import ProviderTransport

DEFAULT_DEADLINE_S = 2.0
# These tests are about each provider's answers, not the breaker: a test's run of injected 5xx
# or outages must never trip it and turn the next answer into a local refusal.
NEVER_TRIPS = BreakerConfig(fail_max=10_000)


async def start_client(kind: str, base_url: str, *, api_key_env: str | None = None,
                       merchant_account: str | None = None) -> ProviderClient:
    """A `ProviderClient` for the emulator at `base_url`, its transport started (close it with
    `GatewayCalls.close`). `api_key_env` defaults to `<KIND>_API_KEY`."""
    cfg = ProviderConfig(kind=kind, base_url=base_url, api_key_env=api_key_env or f"{kind.upper()}_API_KEY",
                         merchant_account=merchant_account, connect_timeout_ms=1000,
                         timeout_ms=int(DEFAULT_DEADLINE_S * 1000), breaker=NEVER_TRIPS)
    handle = make_handle(kind, cfg, EngineConfig())
    await handle.transport.start()
    return ProviderClient(handle, Metrics())


@dataclass
class GatewayCalls:
    """One provider's calls exactly as the gateway makes them, each with its own deadline."""

    client: ProviderClient

    @property
    def mapping(self) -> ProviderMapping:
        return self.client.mapping

    @property
    def transport(self) -> ProviderTransport:
        """The raw transport, only for requests the gateway never builds (a provider's test
        trigger, a stripped header) and for wire-level evidence (a replay header)."""
        return self.client.handle.transport

    async def call(self, op: Operation, subject: PaymentOrder | FollowUp, key: str | None,
                   timeout_s: float = DEFAULT_DEADLINE_S) -> ProviderResult:
        """`op` once, as the executor's try: the try is cut to a deadline `timeout_s` away."""
        return await self.client.call(op, subject, key, time.monotonic() + timeout_s,
                                      self.client.new_attempt(op, 1, key))

    async def status(self, subject: FollowUp, timeout_s: float = DEFAULT_DEADLINE_S) -> StatusAnswer:
        """A status query, as the executor's and the reconciler's."""
        return await self.client.lookup(subject, time.monotonic() + timeout_s,
                                        self.client.new_attempt(Operation.STATUS, 1, None))

    async def close(self) -> None:
        await self.client.handle.transport.close()
