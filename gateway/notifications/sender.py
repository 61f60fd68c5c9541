"""The sender: delivers the notification outbox to `notifications.url`, at least once.

Runs beside the payments in every gateway process, never in their way:
- its own `ClientSession` (a connection limit of `max_concurrency`, connect and total timeouts
  per attempt), so a slow or dead receiver holds at most that many connections of its own and
  no payment ever waits for one;
- rows are leased (`Store.lease_notifications`: FOR UPDATE SKIP LOCKED on PostgreSQL, the write
  lock on SQLite), so processes sharing a store deliver each event once in the normal case; a
  lease outlives one bounded attempt (`lease_s`), so it runs out only when its holder died, and
  then another process delivers the event (at least once: a receiver deduplicates by event id);
- each attempt is recorded on its row and logged as one `notification_delivery` transaction line
  committed in the same transaction (the line's own outbox, `gateway.txlog.outbox`);
- a failed attempt (anything but 2xx: an error status, a redirect, a timeout, a refused
  connection) is tried again after `retry_base_s`, doubling up to `retry_max_s`, with jitter,
  until `give_up_after_s` after the event (default 3 days): then `given_up`, left for
  `gateway webhooks replay`.

Delivered and given-up rows are kept `retention_days` (for `gateway webhooks list`), then purged.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import time

import aiohttp
import structlog

from gateway.config import NotificationsConfig
from gateway.journal.store import Store
from gateway.metrics import Metrics
from gateway.notifications.records import AttemptRecord, DeliveryOutcome, Notification
from gateway.notifications.signing import SIGNATURE_HEADER, signature_header
from gateway.txlog.outbox import TransactionLog

USER_AGENT = "payment-gateway-notifications/1"
LEASE_MARGIN_S = 5.0  # a lease: two attempts' worth plus this (the attempt's own store write)
PURGE_INTERVAL_S = 3600.0
_RESPONSE_BYTES = 4096  # read at most this much of a receiver's answer


class NotificationSender:
    def __init__(self, store: Store, config: NotificationsConfig, *, txlog: TransactionLog, metrics: Metrics,
                 ops_log: structlog.typing.FilteringBoundLogger, wake: asyncio.Event | None = None,
                 rng: random.Random | None = None) -> None:
        assert config.url is not None, "notifications are off without notifications.url"
        self.store = store
        self.config = config
        self.url = config.url
        self.txlog = txlog
        self.metrics = metrics
        self.log = ops_log
        self.wake = wake or asyncio.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"  # its leases' owner
        self.lease_s = 2 * config.timeout_s + LEASE_MARGIN_S
        self._secrets = [s.get_secret_value() for s in config.secrets]
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._gauge_due = 0.0
        self._purge_due = 0.0

    async def start(self, *, exclusive: bool = False) -> None:
        """`exclusive`: this process owns its store alone, so every lease left is a dead
        process's (a crash mid-delivery): those events are due at once, not when it runs out."""
        if exclusive:
            await self.store.release_notification_leases(None)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s, connect=self.config.connect_timeout_s)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=self.config.max_concurrency),
            headers={"User-Agent": USER_AGENT}, raise_for_status=False)

    async def close(self) -> None:
        """After `run_forever` stopped: the attempts it abandoned are due again at once, for
        whichever sender comes next (the next start, another replica)."""
        try:
            await self.store.release_notification_leases(self.owner)
        except Exception as exc:  # noqa: BLE001 - then the leases simply run out
            self.log.warning("notification_leases_not_released", error=repr(exc))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_forever(self) -> None:
        """Keep up to `max_concurrency` deliveries in flight: lease into the free slots whenever
        one frees up, a commit in this process wakes it, or `poll_interval_s` passes."""
        try:
            while True:
                try:
                    await self._fill()
                    await self._purge_if_due()
                except Exception as exc:  # noqa: BLE001 - a bad pass (journal down) must not end delivery
                    self.log.warning("notification_pass_failed", error=repr(exc))
                try:
                    await asyncio.wait_for(self.wake.wait(), self.config.poll_interval_s)
                except TimeoutError:
                    pass
                self.wake.clear()
        finally:
            await self._cancel_in_flight()

    async def run_once(self) -> int:
        """One pass, for tests and tools: lease what is due into the free slots and wait for
        those attempts; returns how many were attempted."""
        started = await self._fill()
        if started:
            await asyncio.wait(started)
        return len(started)

    async def _fill(self) -> set[asyncio.Task[None]]:
        free = self.config.max_concurrency - len(self._in_flight)
        started: set[asyncio.Task[None]] = set()
        if free > 0:
            for notification in await self.store.lease_notifications(self.owner, self.lease_s, free):
                task = asyncio.create_task(self._attempt(notification), name=f"notify-{notification.event_id}")
                self._in_flight.add(task)
                task.add_done_callback(self._finished)
                started.add(task)
        now = time.monotonic()
        if not self._in_flight or now >= self._gauge_due:  # when idle, and once per poll interval when busy
            self._gauge_due = now + self.config.poll_interval_s
            self.metrics.notifications_pending.set(await self.store.count_pending_notifications())
        return started

    async def _purge_if_due(self) -> None:
        """Once per PURGE_INTERVAL_S: forget delivered and given-up rows past the retention."""
        now = time.monotonic()
        if now < self._purge_due:
            return
        self._purge_due = now + PURGE_INTERVAL_S
        purged = await self.store.purge_notifications(time.time() - self.config.retention_days * 86400)
        if purged:
            self.log.info("notifications_purged", rows=purged, retention_days=self.config.retention_days)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self.wake.set()  # a slot is free: lease the next one now

    async def _cancel_in_flight(self) -> None:
        """Stopping: attempts still in flight are abandoned; their leases run out and another
        process (or the next start) delivers them again."""
        tasks = list(self._in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _attempt(self, notification: Notification) -> None:
        try:
            await self._deliver(notification)
        except Exception as exc:  # noqa: BLE001 - not recorded: its lease runs out and it is tried again
            self.log.warning("notification_attempt_not_recorded", event_id=notification.event_id, error=repr(exc))

    async def _deliver(self, notification: Notification) -> None:
        http_status, error, latency_ms = await self._post(notification)
        attempt = notification.attempts + 1
        if http_status is not None and 200 <= http_status < 300:
            result = AttemptRecord(DeliveryOutcome.DELIVERED, http_status=http_status)
        else:
            retry_in = self.backoff(attempt)
            gives_up = time.time() + retry_in > notification.window_start + self.config.give_up_after_s
            result = AttemptRecord(DeliveryOutcome.GIVEN_UP if gives_up else DeliveryOutcome.FAILED,
                                   retry_in_s=retry_in, http_status=http_status, error=error)
        line = self.txlog.render(
            "notification_delivery",
            notification={"event_id": notification.event_id, "type": notification.event_type,
                          "payment_id": notification.payment_id, "attempt": attempt, "outcome": result.outcome.value,
                          "http_status": http_status, "error": error, "latency_ms": latency_ms,
                          "retry_in_s": round(result.retry_in_s, 3) if result.outcome is DeliveryOutcome.FAILED
                          else None, "created_at": notification.created_at})
        if await self.store.finish_notification(notification.event_id, result, outbox=line):
            self.txlog.emit(line)
            self.metrics.notification_deliveries.labels(result.outcome.value).inc()

    async def _post(self, notification: Notification) -> tuple[int | None, str | None, float]:
        """One signed POST: (status or None, what went wrong or None, latency)."""
        assert self._session is not None, "start() the sender first"
        headers = {"Content-Type": "application/json", "Gateway-Event-Id": notification.event_id,
                   "Gateway-Event-Type": notification.event_type,
                   SIGNATURE_HEADER: signature_header(notification.body, self._secrets, int(time.time()))}
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with self._session.post(self.url, data=notification.body, headers=headers,
                                          allow_redirects=False) as response:
                status = response.status
                await response.content.read(_RESPONSE_BYTES)
            if not 200 <= status < 300:
                error = f"http_{status}"
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as exc:
            error = _client_error(exc)
        return status, error, round((time.monotonic() - started) * 1000, 3)

    def backoff(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt`: base doubling to the cap, then a
        random share of half of it (equal jitter), so a receiver back from an outage is not hit
        by every pending event in the same second."""
        delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** min(attempt - 1, 32))
        return delay / 2 + self._rng.uniform(0, delay / 2)


def _client_error(exc: aiohttp.ClientError) -> str:
    """A short, stable reason for the log line (never the body or headers we sent)."""
    kinds: tuple[tuple[type[BaseException], str], ...] = (
        (aiohttp.ClientConnectorError, "connect_failed"),
        (aiohttp.ServerDisconnectedError, "disconnected"),
        (aiohttp.ClientPayloadError, "bad_response"),
        (aiohttp.ClientResponseError, "bad_response"),
        (aiohttp.ClientOSError, "connection_error"),
    )
    return next((label for cls, label in kinds if isinstance(exc, cls)), type(exc).__name__)

