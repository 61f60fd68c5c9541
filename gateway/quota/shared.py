"""The fleet's provider buckets in Redis: every replica and worker takes from the same bucket.

One Lua script refills and takes atomically (Redis's own clock, so replicas' clocks do not
matter), on the asyncio client, with a short timeout (`TIMEOUT_S`). It takes from the first of
several buckets that has a token, so a payment's first call costs one round trip even when it
spills over from its primary to a backup. The bucket is a hash `<prefix>:quota:<provider>` (`tokens`, `at`) that expires
once it would be full again, so an idle account costs nothing.

Redis is an optimisation, never a dependency of a payment: a take that fails or times out marks
Redis away, and until a background PING finds it back (capped backoff) every take is answered
None at once, without a round trip, and the caller takes from its local share of the quota
(`gateway.quota.provider`). Nothing here raises for Redis being down, slow or gone. The backoff
starts over only once a take succeeds, not at the PING: a Redis that answers PING and fails every
take (out of memory, a script refused) is retried ever more slowly, not every 0.2 s with a
warning each time. A key that is not a bucket (something else wrote it) is replaced by one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from gateway.tasks import stop_task

TIMEOUT_S = 0.25  # a take that has not come back by then is not worth waiting for: local share
MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0

# KEYS: buckets in the payment's order; ARGV: rate per second and capacity of each. Takes one
# token from the first bucket that has one, and says which (1-based; 0: none) and the tokens of
# each bucket it looked at. Tokens travel as strings: Lua numbers leave as integers.
_REFILL_AND_TAKE_FIRST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {0}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'hash' and kind ~= 'none' then
    -- Not a bucket (something else wrote our key): it is only rate state, so it is replaced.
    redis.call('DEL', key)
  end
  local b = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(b[1])
  local at = tonumber(b[2])
  if tokens == nil or at == nil then
    -- A new bucket (a first start, a Redis restarted empty) starts empty and fills at the rate
    -- from now: the account may have spent its burst a moment ago, through the local shares.
    tokens = 0
    redis.call('HSET', key, 'tokens', '0', 'at', tostring(now))
    redis.call('PEXPIRE', key, math.ceil(capacity / rate * 1000) + 1000)
  else
    tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
  end
  if tokens >= 1 then
    tokens = tokens - 1
    redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
    redis.call('PEXPIRE', key, math.ceil((capacity - tokens) / rate * 1000) + 1000)
    out[1] = i
    out[i + 1] = tostring(tokens)
    return out
  end
  out[i + 1] = tostring(tokens)
end
return out
"""


class RedisBuckets:
    def __init__(self, url: str, prefix: str, *, log: Any, on_change: Callable[[bool], None] | None = None,
                 timeout_s: float = TIMEOUT_S) -> None:
        self._url = url
        self.prefix = prefix
        self._log = log
        self._on_change = on_change
        self._timeout_s = timeout_s
        self._redis: aioredis.Redis | None = None
        self._script: Any = None
        self.usable = True  # False from a failed take until a PING answers again
        self._away = asyncio.Event()
        self._prober: asyncio.Task[None] | None = None
        self._backoff = MIN_BACKOFF_S
        self.errors = 0

    def __repr__(self) -> str:  # never the URL: it may hold a password
        return f"RedisBuckets(prefix={self.prefix!r}, usable={self.usable})"

    def key(self, provider: str) -> str:
        return f"{self.prefix}:quota:{provider}"

    async def start(self) -> None:
        """No round trip here: the first take connects (a Redis down at start is found then)."""
        self._redis = aioredis.from_url(self._url, socket_connect_timeout=self._timeout_s,
                                        socket_timeout=self._timeout_s)
        self._script = self._redis.register_script(_REFILL_AND_TAKE_FIRST)
        self._prober = asyncio.create_task(self._probe_forever(), name="quota-redis-probe")

    async def close(self) -> None:
        if self._prober is not None:
            await stop_task(self._prober)
        if self._redis is not None:
            redis, self._redis = self._redis, None
            with contextlib.suppress(RedisError, OSError):
                async with asyncio.timeout(1.0):
                    await redis.aclose()

    async def take_first(self, keys: list[str], limits: list[str]) -> tuple[int | None, list[float]] | None:
        """One token from the first of `keys` that has one: (its index, or None; the tokens left
        in each bucket looked at), or None: Redis is away, take locally. `limits`: rate and
        capacity of each key, in turn."""
        if not self.usable or self._script is None:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await self._script(keys=keys, args=limits)
            taken = int(answer[0])
            left = [float(t) for t in answer[1:]]
        except (RedisError, OSError, ValueError, IndexError) as exc:  # TimeoutError is an OSError
            self._lost(exc)
            return None
        self._backoff = MIN_BACKOFF_S
        return (taken - 1 if taken else None), left

    def _lost(self, exc: BaseException) -> None:
        self.errors += 1
        if self.usable:
            self.usable = False
            self._away.set()
            self._log.warning("quota_redis_unavailable", error=type(exc).__name__,
                              detail="each provider's quota is kept locally, this process's share, until Redis answers")
            if self._on_change is not None:
                self._on_change(False)

    async def _probe_forever(self) -> None:
        """While Redis is away: PING with capped backoff; the first answer makes takes shared again."""
        while True:
            await self._away.wait()
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            try:
                assert self._redis is not None
                async with asyncio.timeout(self._timeout_s * 4):
                    await self._redis.ping()
            except (RedisError, OSError):
                continue
            self._away.clear()
            self.usable = True
            self._log.info("quota_redis_back", detail="provider quotas are shared again")
            if self._on_change is not None:
                self._on_change(True)
