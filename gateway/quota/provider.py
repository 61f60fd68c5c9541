"""One provider account's quota, as the router, the payment service and `ProviderClient` see it.

- `has_token()` / `wait_s()` are memory reads, for the router: a provider whose bucket is empty
  is skipped (`over_quota`) before any call, and the payment goes to the next candidate. With a
  shared bucket they read the estimate left by the last shared answer (refilled at the account's
  rate since), so routing never costs a round trip.
- `take_first(candidates)` reserves the token of a payment's first call once its key is claimed:
  from the first candidate that has one, in one step (one Redis round trip when shared), so a
  spill-over costs no more than a payment that stays at its primary; the candidates before it
  are skipped for their quota.
- `take()` is every other request's token (a retry, a failover after an unavailable answer, a
  follow-up, a status query), taken at the moment of the call.

So each request spends exactly one token, never at routing: a routing check cannot spend a
token it does not use, and two payments that both saw the last token cannot both spend it (the
second's reservation goes to the next candidate).

The account's rate is the fleet's. Shared through Redis (`breaker_sync.backend: redis`), every
process takes from one bucket; otherwise, and while Redis is away, each process keeps its share:
rate / (engine.replicas x workers on this host), burst likewise (at least one token).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.quota.bucket import TokenBucket
from gateway.quota.shared import RedisBuckets

SHARED = "shared"
LOCAL = "local"


class ProviderQuota:
    __slots__ = ("provider", "rate", "capacity", "_local", "_estimate", "shared", "key", "limits")

    def __init__(self, provider: str, rate: float, capacity: int, *, share: int,
                 shared: RedisBuckets | None = None) -> None:
        self.provider = provider
        self.rate = rate
        self.capacity = capacity
        self._local = TokenBucket(rate / share, max(1.0, capacity / share))
        self._estimate = TokenBucket(rate, float(capacity))
        self.shared = shared
        self.key = shared.key(provider) if shared is not None else ""
        self.limits = [repr(rate), repr(float(capacity))]  # the script's arguments, formatted once

    @property
    def mode(self) -> str:
        return SHARED if self.shared is not None and self.shared.usable else LOCAL

    def _view(self) -> TokenBucket:
        return self._estimate if self.shared is not None and self.shared.usable else self._local

    def has_token(self) -> bool:
        return self._view().has_token()

    def wait_s(self) -> float:
        return self._view().wait_s()

    def observe(self, tokens: float) -> None:
        """What the shared bucket said it holds now. The local share is kept empty meanwhile,
        so if Redis goes away it refills from this moment at the share's rate, rather than
        starting full while the account's own bucket may be spent (a 429 burst at each switch)."""
        self._estimate.observe(tokens)
        self._local.observe(0.0)

    def take_local(self) -> float:
        return self._local.take()

    async def take(self) -> float:
        """0.0: a token was spent for a request about to be sent. Otherwise the seconds until
        the next token (nothing spent)."""
        shared = self.shared
        if shared is not None and shared.usable:
            answer = await shared.take_first([self.key], self.limits)
            if answer is not None:
                taken, (tokens,) = answer
                self._estimate.observe(tokens)
                return 0.0 if taken is not None else self._estimate.wait_s()
        return self._local.take()


async def take_first(quotas: Sequence[ProviderQuota | None]) -> int | None:
    """The index of the first candidate whose token was taken (or that keeps no quota), or None
    when none has a token. Candidates sharing one Redis are asked in one round trip."""
    lead: list[ProviderQuota] = []
    for quota in quotas:
        if quota is None:
            break
        lead.append(quota)
    shared = lead[0].shared if lead else None
    if shared is not None and shared.usable and all(q.shared is shared for q in lead):
        answer = await shared.take_first([q.key for q in lead], [x for q in lead for x in q.limits])
        if answer is not None:
            taken, tokens = answer
            for quota, left in zip(lead, tokens):
                quota.observe(left)
            if taken is not None:
                return taken
            return len(lead) if len(lead) < len(quotas) else None
        # Redis did not answer: the local shares (kept empty while shared, see `observe`).
    for i, quota in enumerate(lead):
        if quota.take_local() == 0.0:
            return i
    return len(lead) if len(lead) < len(quotas) else None
