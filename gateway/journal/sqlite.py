"""The embedded store: SQLite in WAL mode behind one writer thread with group commit.

Every operation is a small function queued to a dedicated thread that owns the connection.
The thread drains whatever is queued, runs it all in one transaction (a savepoint each, so one
failure does not sink its neighbours), commits once — one fsync for many payments — and wakes
the event loop once per batch. `save_payment` therefore returns only after its row is on disk,
yet a busy gateway pays one fsync per batch, not per payment.

Conditional updates cost nothing extra: a payment write is the same primary-key UPDATE with
`AND version = ?` added, and a stale one raises `StaleWrite` inside its own savepoint, so only
that operation fails and its neighbours in the batch commit. Each batch is one `BEGIN IMMEDIATE`
transaction: workers of `serve --workers N` sharing the file serialise on its write lock, which
makes versions, follow-up claims and reconciler leases hold across processes too.

The `outbox` table holds transaction-log lines committed with their final journal row and not
yet on disk in the log file (`gateway.txlog.outbox`): an insert rides in the payment's own
operation, and the deletes of a whole flushed batch of lines are one operation.

The schema is versioned (`gateway.journal.schema`): opening checks it and, with `migrate`,
applies pending steps under the write lock.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar


from gateway.file_errors import describe_os_error
from gateway.journal.records import (
    ClaimKind,
    IdempotencyClaim,
    IdempotencyState,
    IdempotentAnswer,
    OutboxLine,
    PaymentRecord,
    StoredResponse,
)
from gateway.journal.schema import Migration, sqlite_prepare
from gateway.journal.errors import JournalUnavailable, StaleWrite, StoreOverloaded, StoreUnavailable
from gateway.journal.store import (
    NOTIFICATION_COLUMNS,
    UNRESOLVED_STATUSES,
    next_version,
    notification_from_row,
    payment_from_row,
    RELEASE_SET_ASIDE,
    SET_ASIDE_OWNER,
    payment_row,
)
from gateway.journal.webhook_events import WebhookEventRecord, WebhookState
from gateway.journal.notification_records import AttemptRecord, DeliveryOutcome, Notification

T = TypeVar("T")
_STOP = object()
_UNRESOLVED = UNRESOLVED_STATUSES
_Row = tuple[str, str, float, float, bytes]


class SqliteStore:
    """`migrate`: apply pending schema steps at open (`storage.auto_migrate`); else refuse to
    open a database that is behind this code."""

    def __init__(self, path: Path, *, queue_size: int = 10_000, max_batch: int = 512, migrate: bool = True) -> None:
        self.path = path
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._max_batch = max_batch
        self._migrate = migrate
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.operations = 0
        self.migrated: list[Migration] = []  # the schema steps the last open applied

    async def open(self) -> None:
        """Start the writer thread on the database file; `StoreUnavailable` naming the file and
        the problem when it cannot be created, opened or read as a database."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        thread = threading.Thread(target=self._run, args=(ready,), name="sqlite-journal", daemon=True)
        thread.start()
        try:
            await ready
        except BaseException:
            await asyncio.to_thread(thread.join)
            raise
        self._thread = thread

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def ping(self) -> None:
        # An empty operation still takes the write lock and commits: the journal takes writes now.
        await self._submit(lambda conn: None)

    # -- the writer thread -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """In the writer thread, like every other touch of the file (never on the event loop)."""
        where = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # SQLite says only "unable to open database file"; opening it ourselves first gets the
            # reason (permission denied, is a directory, read-only file system).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreUnavailable(where, describe_os_error(exc, self.path)) from None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreUnavailable(where, f"cannot open it: {exc}") from None
        try:
            self.migrated = _prepare_when_free(conn, migrate=self._migrate)
        except sqlite3.DatabaseError as exc:  # "file is not a database", a directory the WAL cannot go in
            conn.close()
            raise StoreUnavailable(where, f"not usable as an SQLite journal: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except Exception as exc:  # surface start-up failure to open()
            self._loop.call_soon_threadsafe(_settle, [(ready, None, _unavailable(self.path, exc))])
            return
        self._loop.call_soon_threadsafe(_settle, [(ready, None, None)])
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._loop.call_soon_threadsafe(_settle, self._execute(conn, batch))
        conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[Any]) -> list[tuple[Any, Any, BaseException | None]]:
        results: list[tuple[Any, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((fut, fn(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, None, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = _unavailable(self.path, exc)
            return [(fut, None, error) for _fn, fut in batch]
        self.batches += 1
        self.operations += len(batch)
        return results

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._loop is None:
            raise RuntimeError("store is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        try:
            self._queue.put_nowait((fn, fut))
        except queue.Full:
            raise StoreOverloaded("journal write queue is full") from None
        return await fut

    # -- payments ------------------------------------------------------------------------------

    async def save_payment(self, record: PaymentRecord, answer: IdempotentAnswer | None = None,
                           outbox: OutboxLine | None = None, notifications: Sequence[Notification] = ()) -> None:
        with next_version(record) as expected:
            row = payment_row(record)

            def op(conn: sqlite3.Connection) -> None:
                _write_payment(conn, row, expected)
                if answer is not None:
                    _store_answer(conn, answer.scope, answer.key, answer.response)
                if outbox is not None:
                    conn.execute(_INSERT_OUTBOX, (outbox.log_id, outbox.owner, outbox.created_at, outbox.line))
                if notifications:
                    conn.executemany(_INSERT_NOTIFICATION, [
                        (n.event_id, n.payment_id, n.event_type, n.created_at, n.body, n.created_at, n.created_at)
                        for n in notifications])

            await self._submit(op)

    async def get_payment(self, payment_id: str) -> PaymentRecord | None:
        def op(conn: sqlite3.Connection) -> tuple[int, bytes] | None:
            return conn.execute("SELECT version, doc FROM payments WHERE id = ?", (payment_id,)).fetchone()

        row = await self._submit(op)
        return payment_from_row(*row) if row is not None else None

    async def unresolved_payments(self, limit: int = 500) -> list[PaymentRecord]:
        def op(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            return conn.execute(
                f"SELECT version, doc FROM payments WHERE status IN {_UNRESOLVED!r} ORDER BY updated_at LIMIT ?",
                (limit,),
            ).fetchall()

        return [payment_from_row(*row) for row in await self._submit(op)]

    async def lease_unresolved(self, owner: str, lease_s: float, limit: int = 500) -> list[PaymentRecord]:
        def op(conn: sqlite3.Connection) -> list[tuple[str, int, bytes]]:
            # One BEGIN IMMEDIATE transaction: no other process can lease in between.
            now = time.time()
            rows = conn.execute(
                f"SELECT id, version, doc FROM payments WHERE status IN {_UNRESOLVED!r} "
                "AND (lease_until IS NULL OR lease_until <= ? OR lease_owner = ?) ORDER BY updated_at LIMIT ?",
                (now, owner, limit),
            ).fetchall()
            conn.executemany("UPDATE payments SET lease_owner = ?, lease_until = ? WHERE id = ?",
                             [(owner, now + lease_s, r[0]) for r in rows])
            return rows

        return [payment_from_row(version, doc) for _id, version, doc in await self._submit(op)]

    async def set_aside(self, wakes: Sequence[tuple[str, int, float]]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(f"UPDATE payments SET lease_owner = '{SET_ASIDE_OWNER}', lease_until = ? "
                             "WHERE id = ? AND version = ?",
                             [(at, payment_id, version) for payment_id, version, at in wakes])

        await self._submit(op)

    # -- idempotency ---------------------------------------------------------------------------

    async def claim_idempotency(
        self, scope: str, key: str, fingerprint: str, resource_id: str, now: float, expires_at: float,
        record: PaymentRecord | None = None,
    ) -> IdempotencyClaim:
        def op(conn: sqlite3.Connection, new_row: _Row | None, expected: int = 0) -> IdempotencyClaim:
            row = conn.execute(
                "SELECT fingerprint, resource_id, state, status, body, expires_at FROM idempotency "
                "WHERE scope = ? AND key = ?",
                (scope, key),
            ).fetchone()
            if row is not None and row[5] > now:
                if row[0] != fingerprint:
                    return IdempotencyClaim(ClaimKind.MISMATCH, row[1])
                if row[2] == IdempotencyState.IN_FLIGHT:
                    return IdempotencyClaim(ClaimKind.IN_FLIGHT, row[1])
                return IdempotencyClaim(ClaimKind.REPLAY, row[1], StoredResponse(row[3], row[4]))
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, resource_id, state, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (scope, key, fingerprint, resource_id, IdempotencyState.IN_FLIGHT.value, now, expires_at),
            )
            if new_row is not None:
                _write_payment(conn, new_row, expected)  # a StaleWrite here rolls the claim back with it
            return IdempotencyClaim(ClaimKind.NEW, resource_id)

        if record is None:
            return await self._submit(lambda conn: op(conn, None))
        with next_version(record) as expected:
            new_row = payment_row(record)
            claim = await self._submit(lambda conn: op(conn, new_row, expected))
        if claim.kind is not ClaimKind.NEW:
            record.version -= 1  # the key was held: nothing of the record was written
        return claim

    async def complete_idempotency(self, scope: str, key: str, response: StoredResponse) -> None:
        await self._submit(lambda conn: _store_answer(conn, scope, key, response))

    async def release_idempotency(self, scope: str, key: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM idempotency WHERE scope = ? AND key = ? AND state = ?",
                         (scope, key, IdempotencyState.IN_FLIGHT.value))

        await self._submit(op)

    async def discard_unsent(self, payment_id: str, version: int, scope: str, key: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            if conn.execute("DELETE FROM payments WHERE id = ? AND version = ?", (payment_id, version)).rowcount != 1:
                return False
            conn.execute("DELETE FROM idempotency WHERE scope = ? AND key = ? AND state = ?",
                         (scope, key, IdempotencyState.IN_FLIGHT.value))
            return True

        return await self._submit(op)

    async def complete_idempotency_for(self, resource_id: str, response: StoredResponse) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE idempotency SET state = ?, status = ?, body = ? WHERE resource_id = ?",
                (IdempotencyState.DONE.value, response.status, response.body, resource_id),
            )

        await self._submit(op)

    async def purge_expired_idempotency(self, now: float, limit: int = 2000) -> int:
        def op(conn: sqlite3.Connection) -> int:
            # The inner query walks idempotency_expiry (oldest first) and stops at `limit`.
            return conn.execute("DELETE FROM idempotency WHERE (scope, key) IN (SELECT scope, key FROM idempotency "
                                "WHERE expires_at <= ? AND state = ? ORDER BY expires_at LIMIT ?)",
                                (now, IdempotencyState.DONE.value, limit)).rowcount

        return await self._submit(op)

    # -- the transaction log's outbox ----------------------------------------------------------

    async def delete_outbox(self, log_ids: Sequence[str]) -> None:
        if not log_ids:
            return
        params = [(log_id,) for log_id in log_ids]
        await self._submit(lambda conn: conn.executemany("DELETE FROM outbox WHERE log_id = ?", params))

    async def claim_outbox(self, owner: str, *, own_before: float, any_before: float, now: float,
                           lease_until: float, after: str = "", limit: int = 500) -> list[OutboxLine]:
        def op(conn: sqlite3.Connection) -> list[OutboxLine]:
            # One transaction (BEGIN IMMEDIATE): another process on this file cannot claim in between.
            rows = conn.execute(
                "SELECT log_id, owner, created_at, line FROM outbox WHERE log_id > ? "
                "AND (claimed_until IS NULL OR claimed_until <= ?) "
                "AND (created_at < ? OR (owner = ? AND created_at < ?)) ORDER BY log_id LIMIT ?",
                (after, now, any_before, owner, own_before, limit),
            ).fetchall()
            conn.executemany("UPDATE outbox SET claimed_until = ? WHERE log_id = ?",
                             [(lease_until, r[0]) for r in rows])
            return [OutboxLine(r[0], r[3], r[1], r[2]) for r in rows]

        return await self._submit(op)

    # -- provider webhooks in (gateway.webhooks) -------------------------------------------------

    async def journal_webhook_events(self, events: Sequence[WebhookEventRecord]) -> int:
        rows = [(e.provider, e.event_id, e.state.value, e.received_at, e.payment_id, e.to_doc()) for e in events]

        def op(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(_INSERT_WEBHOOK, row).rowcount for row in rows)

        return await self._submit(op)

    async def lease_webhook_events(self, owner: str, lease_s: float, limit: int = 100) -> list[WebhookEventRecord]:
        def op(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            # One BEGIN IMMEDIATE transaction: no other process can lease in between.
            now = time.time()
            rows = conn.execute(
                f"SELECT {_WEBHOOK_COLUMNS} FROM webhook_events WHERE state = ? "
                "AND (lease_until IS NULL OR lease_until <= ? OR lease_owner = ?) ORDER BY received_at LIMIT ?",
                (WebhookState.PENDING.value, now, owner, limit)).fetchall()
            conn.executemany("UPDATE webhook_events SET lease_owner = ?, lease_until = ? "
                             "WHERE provider = ? AND event_id = ?",
                             [(owner, now + lease_s, r[0], r[1]) for r in rows])
            return rows

        return [_webhook_record(row) for row in await self._submit(op)]

    async def finish_webhook_event(self, record: WebhookEventRecord) -> None:
        row = (record.state.value, record.payment_id, record.processed_at, record.to_doc(), record.provider,
               record.event_id)
        await self._submit(lambda conn: conn.execute(
            "UPDATE webhook_events SET state = ?, payment_id = ?, processed_at = ?, doc = ?, lease_owner = NULL, "
            "lease_until = NULL WHERE provider = ? AND event_id = ?", row))

    async def webhook_events(self, state: WebhookState | None = None, limit: int = 100) -> list[WebhookEventRecord]:
        where, params = ("WHERE state = ?", (state.value, limit)) if state is not None else ("", (limit,))

        def op(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(f"SELECT {_WEBHOOK_COLUMNS} FROM webhook_events {where} "
                                "ORDER BY received_at DESC LIMIT ?", params).fetchall()

        return [_webhook_record(row) for row in await self._submit(op)]
    # -- merchant notifications' outbox (gateway.notifications) --------------------------------

    async def lease_notifications(self, owner: str, lease_s: float, limit: int) -> list[Notification]:
        def op(conn: sqlite3.Connection) -> list[Notification]:
            # One BEGIN IMMEDIATE transaction: no other process can lease in between.
            now = time.time()
            rows = conn.execute(
                f"SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE state = 'pending' AND next_attempt_at <= ? "
                "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at LIMIT ?",
                (now, now, limit)).fetchall()
            conn.executemany("UPDATE notifications SET lease_owner = ?, lease_until = ? WHERE event_id = ?",
                             [(owner, now + lease_s, r[0]) for r in rows])
            return [notification_from_row(r) for r in rows]

        return await self._submit(op)

    async def finish_notification(self, event_id: str, attempt: AttemptRecord,
                                  outbox: OutboxLine | None = None) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            now = time.time()
            delivered = now if attempt.outcome is DeliveryOutcome.DELIVERED else None
            changed = conn.execute(_FINISH_NOTIFICATION, (attempt.outcome.state.value, now + attempt.retry_in_s,
                                                          delivered, attempt.http_status, attempt.error,
                                                          event_id)).rowcount
            if changed and outbox is not None:
                conn.execute(_INSERT_OUTBOX, (outbox.log_id, outbox.owner, outbox.created_at, outbox.line))
            return bool(changed)

        return await self._submit(op)

    async def list_notifications(self, *, since: float | None = None, event_id: str | None = None,
                                 limit: int = 100) -> list[Notification]:
        where, params = _notification_filter(since, event_id)

        def op(conn: sqlite3.Connection) -> list[Notification]:
            return [notification_from_row(r) for r in conn.execute(
                f"SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE {where} ORDER BY created_at DESC LIMIT ?",
                (*params, limit)).fetchall()]

        return await self._submit(op)

    async def replay_notifications(self, *, since: float | None = None, event_id: str | None = None) -> int:
        where, params = _notification_filter(since, event_id)

        def op(conn: sqlite3.Connection) -> int:
            now = time.time()
            return conn.execute(
                "UPDATE notifications SET state = 'pending', retry_from = ?, next_attempt_at = ?, lease_owner = NULL, "
                f"lease_until = NULL WHERE {where}", (now, now, *params)).rowcount

        return await self._submit(op)

    async def count_pending_notifications(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("SELECT count(*) FROM notifications WHERE state = 'pending'").fetchone()[0]

        return await self._submit(op)

    async def release_notification_leases(self, owner: str | None) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("UPDATE notifications SET lease_owner = NULL, lease_until = NULL "
                                "WHERE state = 'pending' AND lease_owner IS NOT NULL "
                                "AND (? IS NULL OR lease_owner = ?)", (owner, owner)).rowcount

        return await self._submit(op)

    async def purge_notifications(self, before: float, limit: int = 10_000) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM notifications WHERE event_id IN (SELECT event_id FROM notifications "
                                "WHERE created_at < ? AND state <> 'pending' LIMIT ?)", (before, limit)).rowcount

        return await self._submit(op)


_INSERT_NOTIFICATION = ("INSERT INTO notifications (event_id, payment_id, event_type, created_at, body, retry_from, "
                        "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
_FINISH_NOTIFICATION = ("UPDATE notifications SET attempts = attempts + 1, state = ?, next_attempt_at = ?, "
                        "delivered_at = ?, last_status = ?, last_error = ?, lease_owner = NULL, lease_until = NULL "
                        "WHERE event_id = ? AND state = 'pending'")


def _notification_filter(since: float | None, event_id: str | None) -> tuple[str, tuple[Any, ...]]:
    if event_id is not None:
        return "event_id = ?", (event_id,)
    return "created_at >= ?", (since if since is not None else 0.0,)


_INSERT_OUTBOX = "INSERT INTO outbox (log_id, owner, created_at, line) VALUES (?, ?, ?, ?)"

_INSERT_PAYMENT = ("INSERT INTO payments (id, status, created_at, updated_at, doc, version) VALUES (?, ?, ?, ?, ?, 1) "
                   "ON CONFLICT (id) DO NOTHING")
_UPDATE_PAYMENT = ("UPDATE payments SET status = ?, updated_at = ?, doc = ?, version = ?, "
                   f"{RELEASE_SET_ASIDE} "
                   "WHERE id = ? AND version = ?")

def _write_payment(conn: sqlite3.Connection, row: _Row, expected: int) -> None:
    """The conditional write: insert at version 1, or update the row still at `expected`."""
    if expected == 0:
        changed = conn.execute(_INSERT_PAYMENT, row).rowcount
    else:
        payment_id, status, _created_at, updated_at, doc = row
        changed = conn.execute(_UPDATE_PAYMENT, (status, updated_at, doc, expected + 1, payment_id, expected)).rowcount
    if changed != 1:
        raise StaleWrite(row[0])


_INSERT_WEBHOOK = ("INSERT INTO webhook_events (provider, event_id, state, received_at, payment_id, doc) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, event_id) DO NOTHING")
_WEBHOOK_COLUMNS = "provider, event_id, state, received_at, payment_id, processed_at, doc"


def _webhook_record(row: tuple[Any, ...]) -> WebhookEventRecord:
    provider, _event_id, state, received_at, payment_id, processed_at, doc = row
    return WebhookEventRecord.from_row(provider, state, received_at, payment_id, processed_at, doc)


def _unavailable(path: Path, exc: BaseException) -> BaseException:
    """A database that cannot be opened, locked or written (busy past the timeout, disk full or
    failing, a directory where the file should be) is unavailable; anything else is itself."""
    if isinstance(exc, sqlite3.OperationalError):
        return JournalUnavailable(f"SQLite journal {path}: {exc}")
    return exc


def _store_answer(conn: sqlite3.Connection, scope: str, key: str, response: StoredResponse) -> None:
    conn.execute(
        "UPDATE idempotency SET state = ?, status = ?, body = ? WHERE scope = ? AND key = ?",
        (IdempotencyState.DONE.value, response.status, response.body, scope, key),
    )


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, exc in results:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


OPEN_LOCKED_WAIT_S = 30.0  # how long a store opening waits for another process's migration


def _prepare_when_free(conn: sqlite3.Connection, *, migrate: bool) -> list[Migration]:
    """WAL, durable commits, the schema checked (and migrated): retried while the file is locked
    by another process opening it (a sibling worker of `serve --workers N` migrating a fresh
    file made the other's start fail with "database is locked" once, in a clean-clone run: some
    of these steps meet the lock without waiting on the busy timeout). Bounded; blocking, in the
    writer thread."""
    give_up = time.monotonic() + OPEN_LOCKED_WAIT_S
    while True:
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # each commit is on disk before callers resume
            return sqlite_prepare(conn, migrate=migrate)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.05)
