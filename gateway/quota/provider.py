"""One provider account's quota, as the router and `ProviderClient` see it.

- `has_token()` / `wait_s()` are memory reads, for the router: a provider whose bucket is empty
  is skipped (`over_quota`) before any call, and the payment goes to the next candidate. With a
  shared bucket they read the estimate left by the last shared answer (refilled at the account's
  rate since), so routing never costs a round trip.
- `take()` is the moment of the call: the token is spent there, once per provider request
  (payment, retry, follow-up, status query), never at routing. So a routing check cannot spend a
  token it does not use, and two payments that both saw the last token cannot both spend it: the
  second's take fails and it moves on (`LocalRefusal.OVER_QUOTA`).

The account's rate is the fleet's. Shared through Redis (`breaker_sync.backend: redis`), every
process takes from one bucket; otherwise, and while Redis is away, each process keeps its share:
rate / (engine.replicas x workers on this host), burst likewise (at least one token).
"""

from __future__ import annotations

from gateway.quota.bucket import TokenBucket
from gateway.quota.shared import RedisBuckets

SHARED = "shared"
LOCAL = "local"


class ProviderQuota:
    __slots__ = ("provider", "rate", "capacity", "_local", "_estimate", "_shared", "_key")

    def __init__(self, provider: str, rate: float, capacity: int, *, share: int,
                 shared: RedisBuckets | None = None) -> None:
        self.provider = provider
        self.rate = rate
        self.capacity = capacity
        self._local = TokenBucket(rate / share, max(1.0, capacity / share))
        self._estimate = TokenBucket(rate, float(capacity))
        self._shared = shared
        self._key = shared.key(provider) if shared is not None else ""

    @property
    def mode(self) -> str:
        return SHARED if self._shared is not None and self._shared.usable else LOCAL

    def _view(self) -> TokenBucket:
        return self._estimate if self._shared is not None and self._shared.usable else self._local

    def has_token(self) -> bool:
        return self._view().has_token()

    def wait_s(self) -> float:
        return self._view().wait_s()

    async def take(self) -> float:
        """0.0: a token was spent for a request about to be sent. Otherwise the seconds until
        the next token (nothing spent)."""
        shared = self._shared
        if shared is not None and shared.usable:
            answer = await shared.take(self._key, self.rate, self.capacity)
            if answer is not None:
                taken, tokens = answer
                self._estimate.observe(tokens)
                return 0.0 if taken else self._estimate.wait_s()
        return self._local.take()
