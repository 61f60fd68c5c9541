"""Breaker state shared across replicas through Redis (asyncio client, never the blocking one).

pybreaker's `CircuitRedisStorage` would put a synchronous Redis round trip inside every breaker
check on the event loop. Instead each replica keeps its own in-process breaker (the hot path
stays a memory read) and the fleet converges by messages:

- a listener on every `ProviderBreaker` turns a local transition to `open` or `closed` into a
  message `{provider, state, opened_at, at, replica}`. pybreaker listeners are synchronous, so
  the listener only puts it on a bounded queue (never blocks, drops and counts when full); one
  publisher task sends them in order. Half-open is not shared: each replica's open breaker times
  out from the same `opened_at` and admits its own single trial; the trial's result (closed, or
  open again) is what gets shared.
- one Lua script per change writes the message into a hash (`<prefix>:state`, one field per
  provider, only if it is newer than what the hash holds) and publishes it on
  `<prefix>:events`, atomically, so the hash and the channel never disagree.
- a subscriber applies other replicas' messages to the local breaker: open -> `force_open`
  (keeping the remote `opened_at`, so the reset timeout runs from the fleet's trip, not from
  when this replica heard of it), closed -> `force_close`, without publishing them again.
  A message older than the last change seen for that provider is ignored (last writer wins).
- on start, and after every reconnect, the hash is read so a new replica starts with the
  fleet's view. It subscribes first, then reads, so no change falls in between.

Redis being down never stops payments, nor a replica's start: publishing retries a few times
then gives up (logged), and the subscriber reconnects with capped backoff and re-reads the hash.
Meanwhile each replica's breaker keeps working alone. A malformed URL still fails at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Iterable
from typing import Any

import orjson
import structlog
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from gateway.breaker import ProviderBreaker
from gateway.tasks import stop_task

OPEN = "open"
CLOSED = "closed"
_SHARED_STATES = (OPEN, CLOSED)
_PUBLISH_TRIES = 3

# KEYS[1] state hash; ARGV: provider, message, its `at`, channel.
_PUBLISH_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and tonumber(doc['at']) and tonumber(doc['at']) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""


class RedisBreakerSync:
    def __init__(self, url: str, channel_prefix: str = "gateway:breaker", *, replica_id: str | None = None,
                 log: Any = None, queue_size: int = 1000, connect_timeout_s: float = 2.0,
                 command_timeout_s: float = 5.0) -> None:
        self._url = url
        self.channel = f"{channel_prefix}:events"
        self.state_key = f"{channel_prefix}:state"
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._log = log if log is not None else structlog.get_logger("gateway.breaker_sync")
        self._queue_size = queue_size
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._breakers: dict[str, ProviderBreaker] = {}
        self._listeners: dict[str, Any] = {}
        self._last_at: dict[str, float] = {}
        self._applying: str | None = None
        self._outbox: asyncio.Queue[dict[str, Any]] | None = None
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._script: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0
        self.applied = 0
        self.dropped = 0
        self.publish_errors = 0

    def __repr__(self) -> str:  # never the URL: it may hold a password
        return f"RedisBreakerSync(replica_id={self.replica_id!r}, channel={self.channel!r})"

    @property
    def connected(self) -> bool:
        """Subscribed and holding the fleet's view (False while Redis is unreachable)."""
        return self._pubsub is not None

    # -- lifetime ------------------------------------------------------------------------------

    async def start(self, breakers: Iterable[ProviderBreaker]) -> None:
        """Connect, subscribe, take the fleet's last known state, then listen and publish."""
        self._breakers = {b.provider: b for b in breakers}
        self._outbox = asyncio.Queue(maxsize=self._queue_size)
        self._redis = aioredis.from_url(self._url, socket_connect_timeout=self._connect_timeout_s,
                                        socket_timeout=self._command_timeout_s, health_check_interval=30)
        self._script = self._redis.register_script(_PUBLISH_IF_NEWER)
        try:
            async with asyncio.timeout(self._connect_timeout_s + self._command_timeout_s):
                await self._subscribe()
        except (RedisError, OSError, TimeoutError) as exc:
            # Redis is an optimisation, not a dependency: serve with local breakers, keep trying.
            await self._drop_pubsub()
            self._log.warning("breaker_sync_unavailable", error=type(exc).__name__,
                              detail="starting with this replica's own breaker state; retrying in the background")
        except BaseException:
            await self._close_redis()
            raise
        for provider, breaker in self._breakers.items():
            listener = self._listener_for(provider)
            self._listeners[provider] = listener
            breaker.listeners.append(listener)
        self._tasks = [asyncio.create_task(self._publisher(), name="breaker-sync-publisher"),
                       asyncio.create_task(self._subscriber(), name="breaker-sync-subscriber")]

    async def close(self, *, flush_timeout_s: float = 1.0) -> None:
        for provider, listener in self._listeners.items():
            with contextlib.suppress(ValueError):
                self._breakers[provider].listeners.remove(listener)
        self._listeners.clear()
        if self._outbox is not None and self._tasks:
            with contextlib.suppress(TimeoutError):  # bounded: a change not out by now stays unshared
                await asyncio.wait_for(self._outbox.join(), flush_timeout_s)
        await asyncio.gather(*(stop_task(task) for task in self._tasks))
        self._tasks = []
        await self._close_redis()

    async def _close_redis(self) -> None:
        await self._drop_pubsub()
        if self._redis is not None:
            redis, self._redis = self._redis, None
            with contextlib.suppress(RedisError, OSError):
                await redis.aclose()

    async def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _subscribe(self) -> None:
        assert self._redis is not None
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.channel)
        snapshot = await self._redis.hgetall(self.state_key)
        for raw in snapshot.values():
            self._apply_raw(raw)

    # -- local changes -> Redis ------------------------------------------------------------------

    def _listener_for(self, provider: str) -> Any:
        def on_change(_provider: str, _old: str, new: str) -> None:
            self._local_change(provider, new)

        return on_change

    def _local_change(self, provider: str, new: str) -> None:
        """Called synchronously inside pybreaker: enqueue and return, never await or block."""
        if self._applying == provider or new not in _SHARED_STATES or self._outbox is None:
            return
        at = self._breakers[provider].changed_at
        self._last_at[provider] = at
        message = {"provider": provider, "state": new, "opened_at": at if new == OPEN else None, "at": at,
                   "replica": self.replica_id}
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            self._log.warning("breaker_sync_dropped", provider=provider, state=new)

    async def _publisher(self) -> None:
        assert self._outbox is not None
        while True:
            message = await self._outbox.get()
            try:
                await self._publish(message)
            finally:
                self._outbox.task_done()

    async def _publish(self, message: dict[str, Any]) -> None:
        payload = orjson.dumps(message)
        for attempt in range(_PUBLISH_TRIES):
            try:
                await self._script(keys=[self.state_key],
                                   args=[message["provider"], payload, repr(message["at"]), self.channel])
                self.published += 1
                return
            except (RedisError, OSError) as exc:
                if attempt + 1 == _PUBLISH_TRIES:
                    self.publish_errors += 1
                    self._log.warning("breaker_sync_publish_failed", provider=message["provider"],
                                      state=message["state"], error=type(exc).__name__)
                    return
                await asyncio.sleep(0.05 * 2 ** attempt)

    # -- Redis -> local breakers ---------------------------------------------------------------

    async def _subscriber(self) -> None:
        backoff = 0.1
        while True:
            try:
                if self._pubsub is None:
                    await self._subscribe()
                    self._log.info("breaker_sync_resubscribed", channel=self.channel)
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
                if message is not None and message.get("type") == "message":
                    self._apply_raw(message["data"])
            except (RedisError, OSError) as exc:
                self._log.warning("breaker_sync_disconnected", error=type(exc).__name__, retry_in_s=backoff)
                await self._drop_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _apply_raw(self, raw: bytes | str) -> None:
        try:
            message = orjson.loads(raw)
            self.apply(message)
        except (ValueError, KeyError, TypeError) as exc:
            self._log.warning("breaker_sync_bad_message", error=f"{type(exc).__name__}: {exc}")

    def apply(self, message: dict[str, Any]) -> None:
        """Apply another replica's change to the local breaker, without publishing it again."""
        if message.get("replica") == self.replica_id:
            return
        provider = message["provider"]
        breaker = self._breakers.get(provider)
        state = message["state"]
        if breaker is None or state not in _SHARED_STATES:
            return
        at = float(message["at"])
        if at <= self._last_at.get(provider, 0.0):
            return  # we have seen (or made) a newer change
        self._last_at[provider] = at
        self._applying = provider
        try:
            if state == OPEN:
                breaker.force_open(opened_at=float(message.get("opened_at") or at))
            elif breaker.held_open:
                return  # an operator drained this provider here; another replica's trial does not undo it
            else:
                breaker.force_close()
        finally:
            self._applying = None
        self.applied += 1
        self._log.info("breaker_sync_applied", provider=provider, state=state, from_replica=message.get("replica"))

