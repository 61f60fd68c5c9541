"""Breaker state and operator holds shared across replicas through Redis (asyncio client, never
the blocking one).

pybreaker's `CircuitRedisStorage` would put a synchronous Redis round trip inside every breaker
check on the event loop. Instead each replica keeps its own in-process breaker (the hot path
stays a memory read) and the fleet converges by messages:

- a listener on every `ProviderBreaker` turns a local transition to `open` or `closed` into a
  message `{kind: state, provider, state, opened_at, at, replica}`. pybreaker listeners are
  synchronous, so the listener only puts it on a bounded queue (never blocks, drops and counts
  when full); one publisher task sends them in order. Half-open is not shared: each replica's
  open breaker times out from the same `opened_at` and admits its own single trial; the trial's
  result (closed, or open again) is what gets shared.
- an operator's hold (the console's forced open: drained for maintenance, no trial calls) is
  fleet state too: `{kind: hold, provider, held, at, replica}`. A hold holds on every replica
  until an operator releases it (the console's forced close, on any replica), and it is kept in
  Redis, so a replica started later, or restarted, holds it from its first request.
- one Lua script per change writes the message into a hash (`<prefix>:state` or
  `<prefix>:holds`, one field per provider, only if it is newer than what the hash holds) and
  publishes it on `<prefix>:events`, atomically, so the hashes and the channel never disagree.
- a subscriber applies other replicas' messages to the local breaker: open -> `force_open`
  (keeping the remote `opened_at`, so the reset timeout runs from the fleet's trip, not from
  when this replica heard of it), closed -> `force_close` (unless held here), hold -> held open,
  release -> closed, without publishing them again. A message older than the last change seen
  of its kind for that provider is ignored (last writer wins).
- on start, and after every reconnect, the replica subscribes, then republishes the newest
  change it knows of each kind per provider (its own, or one it applied: a trip made while Redis
  was down, or a Redis restarted empty, is shared once it is back; the script keeps whichever is
  newer), then reads both hashes, so it holds the fleet's view and no change falls in between.

The part that is not Redis (listeners, the publisher queue, applying others' changes) is
`BreakerSync`; `gateway.workers.link.HostBreakerSync` carries the same messages between the
workers of one host through the supervisor's hub, when there is no Redis.

Redis being down never stops payments, nor a replica's start: publishing retries a few times
then gives up (counted; the change is republished on reconnect), and the subscriber reconnects
with capped backoff. Meanwhile each replica's breaker keeps working alone, and `/readyz` shows
`breaker_sync` degraded (never not ready: Redis is optional). A malformed URL still fails at
start.

A Redis that hangs (stopped, a frozen host) is "down" too, though its TCP connections stay open
and nothing ever fails: every command has a socket timeout, every (re)subscription is bounded,
and the subscriber's watchdog PINGs the subscription after `ping_every_s` of silence and counts
Redis gone when nothing came back within `answer_within_s` of it. So a hung Redis is `degraded`
(and `gateway_breaker_sync_connected` 0) within a few seconds, and the reconnect path above runs
when it answers again. No payment waits on any of this: the breaker's listeners only enqueue.
A replica that has not read the fleet's hashes since it started (Redis down or hung at its
start) says so in `/readyz`: it cannot know of a hold set elsewhere until Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
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
STATE = "state"  # message kinds
HOLD = "hold"
KINDS = (STATE, HOLD)
_PUBLISH_TRIES = 3
MAX_BACKOFF_S = 5.0
_WATCHDOG = "breaker-sync-watchdog"  # the PING message, told apart from redis-py's own health check

# KEYS[1] state or holds hash; ARGV: provider, message, its `at`, channel.
_PUBLISH_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and tonumber(doc['at']) and tonumber(doc['at']) >= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""


class BreakerSync:
    """What every breaker sync shares, whatever carries its messages: listeners that turn local
    changes into messages on a bounded queue, one publisher task, and `apply` for the others'
    messages (last writer wins per kind and provider). A transport subclass implements `_open`
    (first connection at start; must not raise for an unreachable peer), `_send`, `_receive_forever`
    (the subscriber task, reconnecting), `_close_transport`, `connected` and `health`.

    `on_error(kind)` counts trouble for the metrics: `connection` (the peer unreachable, each
    failed (re)connection), `publish` (a change not sent after its retries), `dropped` (the
    queue was full), `bad_message`."""

    def __init__(self, *, replica_id: str | None = None, log: Any = None, queue_size: int = 1000,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._log = log if log is not None else structlog.get_logger("gateway.breaker_sync")
        self._queue_size = queue_size
        self._on_error = on_error
        self._breakers: dict[str, ProviderBreaker] = {}
        self._listeners: dict[str, tuple[Any, Any]] = {}
        # (kind, provider) -> the newest change seen (made here or applied): its `at`, and itself
        self._seen: dict[tuple[str, str], float] = {}
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._applying: str | None = None
        self._outbox: asyncio.Queue[dict[str, Any]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0
        self.applied = 0
        self.dropped = 0
        self.publish_errors = 0

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        raise NotImplementedError

    async def _open(self) -> None:
        raise NotImplementedError

    async def _send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _receive_forever(self) -> None:
        raise NotImplementedError

    async def _close_transport(self) -> None:
        raise NotImplementedError

    # -- lifetime ------------------------------------------------------------------------------

    async def start(self, breakers: Iterable[ProviderBreaker]) -> None:
        """Connect, take the others' last known state and holds, then listen and publish."""
        self._breakers = {b.provider: b for b in breakers}
        self._outbox = asyncio.Queue(maxsize=self._queue_size)
        try:
            await self._open()
        except BaseException:
            await self._close_transport()
            raise
        for provider, breaker in self._breakers.items():
            on_state, on_hold = self._listeners_for(provider)
            self._listeners[provider] = (on_state, on_hold)
            breaker.listeners.append(on_state)
            breaker.hold_listeners.append(on_hold)
        self._tasks = [asyncio.create_task(self._publisher(), name="breaker-sync-publisher"),
                       asyncio.create_task(self._receive_forever(), name="breaker-sync-subscriber")]

    async def close(self, *, flush_timeout_s: float = 1.0) -> None:
        for provider, (on_state, on_hold) in self._listeners.items():
            breaker = self._breakers[provider]
            with contextlib.suppress(ValueError):
                breaker.listeners.remove(on_state)
            with contextlib.suppress(ValueError):
                breaker.hold_listeners.remove(on_hold)
        self._listeners.clear()
        if self._outbox is not None and self._tasks:
            with contextlib.suppress(TimeoutError):  # bounded: a change not out by now stays unshared
                await asyncio.wait_for(self._outbox.join(), flush_timeout_s)
        await asyncio.gather(*(stop_task(task) for task in self._tasks))
        self._tasks = []
        await self._close_transport()

    def _count(self, kind: str) -> None:
        if self._on_error is not None:
            self._on_error(kind)

    async def _republish(self) -> None:
        """After (re)connecting: share the newest change known of each kind per provider (its own,
        or one it applied), which the peer may have missed while it was away."""
        for message in list(self._latest.values()):
            await self._send(message)

    # -- local changes -> the others -------------------------------------------------------------

    def _listeners_for(self, provider: str) -> tuple[Any, Any]:
        def on_state(_provider: str, _old: str, new: str) -> None:
            if new in _SHARED_STATES:
                breaker = self._breakers[provider]
                at = breaker.changed_at
                self._local(provider, {"kind": STATE, "provider": provider, "state": new,
                                       "opened_at": at if new == OPEN else None, "at": at})

        def on_hold(_provider: str, held: bool) -> None:
            self._local(provider, {"kind": HOLD, "provider": provider, "held": held,
                                   "at": self._breakers[provider].hold_changed_at})

        return on_state, on_hold

    def _local(self, provider: str, message: dict[str, Any]) -> None:
        """Called synchronously inside the breaker: enqueue and return, never await or block."""
        if self._applying == provider or self._outbox is None:
            return  # applying another replica's change: it is not ours to publish
        message["replica"] = self.replica_id
        seen = (message["kind"], provider)
        self._seen[seen] = message["at"]
        self._latest[seen] = message
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            self._count("dropped")
            self._log.warning("breaker_sync_dropped", provider=provider, kind=message["kind"])

    async def _publisher(self) -> None:
        assert self._outbox is not None
        while True:
            message = await self._outbox.get()
            try:
                await self._publish(message)
            finally:
                self._outbox.task_done()

    async def _publish(self, message: dict[str, Any]) -> None:
        for attempt in range(_PUBLISH_TRIES):
            try:
                await self._send(message)
                self.published += 1
                return
            except (RedisError, OSError) as exc:
                if attempt + 1 == _PUBLISH_TRIES:
                    # Not lost: it stays this replica's newest change, republished on reconnect.
                    self.publish_errors += 1
                    self._count("publish")
                    self._log.warning("breaker_sync_publish_failed", provider=message["provider"],
                                      kind=message["kind"], error=type(exc).__name__)
                    return
                await asyncio.sleep(0.05 * 2 ** attempt)

    # -- the others' changes -> local breakers ---------------------------------------------------

    def _apply_raw(self, raw: bytes | str) -> None:
        try:
            message = orjson.loads(raw)
            self.apply(message)
        except (ValueError, KeyError, TypeError) as exc:
            self._count("bad_message")
            self._log.warning("breaker_sync_bad_message", error=f"{type(exc).__name__}: {exc}")

    def apply(self, message: dict[str, Any]) -> None:
        """Apply another replica's change to the local breaker, without publishing it again."""
        if message.get("replica") == self.replica_id:
            return
        kind = message.get("kind", STATE)  # a release before holds were shared sends no kind
        provider = message["provider"]
        breaker = self._breakers.get(provider)
        if breaker is None or kind not in KINDS or (kind == STATE and message["state"] not in _SHARED_STATES):
            return
        at = float(message["at"])
        if at <= self._seen.get((kind, provider), 0.0):
            return  # we have seen (or made) a newer change
        self._seen[(kind, provider)] = at
        self._latest[(kind, provider)] = message
        self._applying = provider
        try:
            if kind == HOLD:
                if message["held"]:
                    breaker.force_open(opened_at=at, hold=True)
                elif breaker.held_open:
                    breaker.force_close()
            elif message["state"] == OPEN:
                breaker.force_open(opened_at=float(message.get("opened_at") or at))
            elif breaker.held_open:
                return  # an operator holds this provider; only a release (a hold message) undoes it
            else:
                breaker.force_close()
        finally:
            self._applying = None
        self.applied += 1
        self._log.info("breaker_sync_applied", provider=provider, kind=kind,
                       state=message.get("state"), held=message.get("held"), from_replica=message.get("replica"))


class RedisBreakerSync(BreakerSync):
    """The fleet's breaker sync through Redis (see the module docstring)."""

    def __init__(self, url: str, channel_prefix: str = "gateway:breaker", *, replica_id: str | None = None,
                 log: Any = None, queue_size: int = 1000, connect_timeout_s: float = 2.0,
                 command_timeout_s: float = 2.0, ping_every_s: float = 1.0, answer_within_s: float = 2.0,
                 on_error: Callable[[str], None] | None = None) -> None:
        super().__init__(replica_id=replica_id, log=log, queue_size=queue_size, on_error=on_error)
        self._url = url
        self.channel = f"{channel_prefix}:events"
        self.state_key = f"{channel_prefix}:state"
        self.holds_key = f"{channel_prefix}:holds"
        self._keys = {STATE: self.state_key, HOLD: self.holds_key}
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._ping_every_s = ping_every_s
        self._answer_within_s = answer_within_s
        self._heard_at = 0.0  # monotonic: the subscription's last message or PONG
        self._ping_sent_at: float | None = None  # the watchdog's PING not answered yet
        self._read_fleet = False  # the hashes were read at least once since start
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._script: Any = None
        self._unreachable_since: float | None = None
        self._last_error: str | None = None

    def __repr__(self) -> str:  # never the URL: it may hold a password
        return f"RedisBreakerSync(replica_id={self.replica_id!r}, channel={self.channel!r})"

    @property
    def connected(self) -> bool:
        """Subscribed and holding the fleet's view (False while Redis is unreachable)."""
        return self._pubsub is not None

    def health(self) -> dict[str, Any]:
        """For `/readyz`: `ok`, or `degraded` with why and since when (epoch seconds)."""
        if self.connected:
            return {"status": "ok"}
        if self._read_fleet:
            reason = (f"Redis unreachable or not answering ({self._last_error}): this replica's breakers and holds "
                      "are its own until it reconnects (a hold set elsewhere meanwhile is not held here)")
        else:
            reason = (f"Redis unreachable or not answering ({self._last_error}) since this replica started: it has "
                      "not read the fleet's breaker state and holds, so a provider held on another replica is not "
                      "held here until Redis answers")
        return {"status": "degraded", "since": self._unreachable_since, "read_fleet_holds": self._read_fleet,
                "reason": reason}

    # -- lifetime ------------------------------------------------------------------------------

    async def _open(self) -> None:
        self._redis = aioredis.from_url(self._url, socket_connect_timeout=self._connect_timeout_s,
                                        socket_timeout=self._command_timeout_s,
                                        health_check_interval=self._ping_every_s)
        self._script = self._redis.register_script(_PUBLISH_IF_NEWER)
        try:
            await self._subscribe()
        except (RedisError, OSError, TimeoutError) as exc:
            # Redis is an optimisation, not a dependency: serve with local breakers, keep trying.
            await self._lost(exc)
            self._log.warning("breaker_sync_unavailable", error=type(exc).__name__,
                              detail="starting with this replica's own breaker state; retrying in the background")

    async def _close_transport(self) -> None:
        await self._drop_pubsub()
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await self._quietly(redis.aclose())

    async def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            await self._quietly(pubsub.aclose())

    async def _quietly(self, closing: Any) -> None:
        """Close a connection, bounded: a hung Redis must not hold up a reconnect or a shutdown."""
        with contextlib.suppress(RedisError, OSError):  # TimeoutError is an OSError
            async with asyncio.timeout(self._command_timeout_s):
                await closing

    async def _lost(self, exc: BaseException) -> None:
        await self._drop_pubsub()
        if self._unreachable_since is None:
            self._unreachable_since = time.time()
        self._last_error = type(exc).__name__
        self._count("connection")

    async def _subscribe(self) -> None:
        """Subscribe first, so no change falls between the snapshot and the stream; share what
        this replica knows that Redis may have missed; then take the fleet's view. Bounded as a
        whole: a Redis that accepts connections but never answers fails it."""
        assert self._redis is not None
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self._connect_timeout_s + self._command_timeout_s):
                await pubsub.subscribe(self.channel)
                await self._republish()
                for key in self._keys.values():
                    snapshot = await self._redis.hgetall(key)
                    for raw in snapshot.values():
                        self._apply_raw(raw)
        except BaseException:
            await self._quietly(pubsub.aclose())
            raise
        self._pubsub = pubsub
        self._read_fleet = True
        self._heard_at, self._ping_sent_at = time.monotonic(), None
        self._unreachable_since = self._last_error = None

    async def _send(self, message: dict[str, Any]) -> None:
        await self._script(keys=[self._keys[message["kind"]]],
                           args=[message["provider"], orjson.dumps(message), repr(message["at"]), self.channel])

    # -- Redis -> local breakers ---------------------------------------------------------------

    async def _receive_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                if self._pubsub is None:
                    await self._subscribe()
                    self._log.info("breaker_sync_resubscribed", channel=self.channel)
                await self._receive_or_ping()
                backoff = 0.1
            except (RedisError, OSError) as exc:  # TimeoutError (the watchdog's too) is an OSError
                if self._pubsub is not None:
                    self._log.warning("breaker_sync_disconnected", error=type(exc).__name__, retry_in_s=backoff)
                await self._lost(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _receive_or_ping(self) -> None:
        """One turn of the subscriber: apply a message, or prove that Redis still answers. After
        `ping_every_s` without a message, PING on the subscription; nothing back (not even the
        PONG) within `answer_within_s` of it means Redis is gone. A stopped Redis keeps its TCP
        connections open and never answers: without this the subscriber would wait on it,
        reported connected, for as long as it hangs."""
        assert self._pubsub is not None
        now = time.monotonic()
        if self._ping_sent_at is not None:
            waited = now - self._ping_sent_at
            if waited > self._answer_within_s:
                raise TimeoutError(f"Redis did not answer a PING within {self._answer_within_s:g} s")
            wait = self._answer_within_s - waited
        elif now - self._heard_at >= self._ping_every_s:
            async with asyncio.timeout(self._answer_within_s):
                await self._pubsub.ping(_WATCHDOG)
            self._ping_sent_at = now
            wait = self._answer_within_s
        else:
            wait = self._ping_every_s - (now - self._heard_at)
        message = await self._pubsub.get_message(timeout=max(wait, 0.01))
        if message is None:
            return
        self._heard_at = time.monotonic()
        if message.get("type") == "pong":
            self._ping_sent_at = None
        elif message.get("type") == "message":
            self._apply_raw(message["data"])
