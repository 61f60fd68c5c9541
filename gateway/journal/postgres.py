"""The scale-out store: PostgreSQL through an asyncpg pool, shared by every replica.

Same contract as `SqliteStore`, statement for statement:

- `claim_idempotency` is one statement: `INSERT ... ON CONFLICT (scope, key) DO UPDATE ... WHERE
  the held record has expired`, with the payment row inserted by a second data-modifying CTE
  only when the claim row came back. One statement is one transaction, so the claim and the
  journal row commit together or not at all, and the unique key makes the claim atomic across
  replicas: a concurrent claimer blocks on the row until the first commits, then finds it held.
  The payment row is a plain INSERT at version 1: an id already journalled aborts the whole
  statement (`StaleWrite`), claim included.
  Only when the key is held do we read what it holds (a second statement; if the record vanished
  in between, released or purged, the claim is tried again, a bounded number of times).
- `save_payment` is one statement: the conditional payment write (`UPDATE ... WHERE id AND
  version`, or the first `INSERT ... ON CONFLICT DO NOTHING`) as a CTE that returns the row it
  wrote, and the key's answer and the outbox line as further CTEs that only act when it did.
  A stale write changes nothing and is `StaleWrite`. Under READ COMMITTED a second writer of the
  same row waits for the first to commit, then re-checks the version on the new row and finds
  it moved: exactly one of two concurrent writers from the same read wins, on any replica.
- `save_payment` with an outbox line thereby commits the transaction-log line with the final
  journal row (`gateway.txlog.outbox`); with an answer, a replay can never disagree with it.
- `lease_unresolved` and the outbox claim pick rows with `FOR UPDATE SKIP LOCKED`: a row another
  replica is leasing right now is its own; follow-up claims are an upsert that takes over only an
  expired lease. Lease times are the server's clock.
- Trouble reaching or writing the database (down, restarting, read-only, out of connections, a
  command timeout, no pool connection within the acquire timeout) is `JournalUnavailable`, mapped
  from asyncpg's errors here and nowhere else; a bad statement stays what it is.
- Durable on return: every connection runs with `synchronous_commit = on`, so a statement
  returns only after its commit record is flushed to the WAL on disk.

Group commit: the sqlite store batches in the application because SQLite has one writer and an
fsync per transaction. PostgreSQL already does it in the server: a committing backend flushes
the WAL up to its own commit record, and every concurrent commit whose record lies below that
point is made durable by the same fsync (`commit_delay`/`commit_siblings` can widen the window).
With many payments in flight on the pool's connections, one fsync serves many of them, so there
is no application-level batching here: each operation is its own short transaction.

The schema is versioned (`gateway.journal.schema`): `open` reads the version and runs DDL only
when the database is behind, under an advisory lock, and only with `migrate`.

Documents are stored as BYTEA holding the same orjson bytes as the SQLite store, not JSONB:
no parse on the hot path, and JSONB rejects a NUL character that a caller may legally send in a
free-text field such as `merchant_reference`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.journal.records import (
    ClaimKind,
    IdempotencyClaim,
    IdempotencyState,
    IdempotentAnswer,
    OutboxLine,
    PaymentRecord,
    StoredResponse,
)
from gateway.journal.schema import Migration, migrations, postgres_prepare
from gateway.journal.errors import JournalUnavailable, StaleWrite
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

_UNRESOLVED_SQL = "(" + ", ".join(f"'{s}'" for s in UNRESOLVED_STATUSES) + ")"
_IN_FLIGHT = IdempotencyState.IN_FLIGHT.value
_DONE = IdempotencyState.DONE.value
_CLAIM_TRIES = 5
_NOW = "extract(epoch FROM now())::float8"  # the server's clock: replicas agree on when leases end

# asyncpg errors that say the journal cannot take work now, by the metric label they count under.
# Anything else (a bad statement, a constraint) is a bug or a real refusal and stays as it is.
_UNAVAILABLE: tuple[tuple[type[BaseException], str], ...] = (
    (asyncpg.ReadOnlySQLTransactionError, "read_only"),  # a standby, or a read-only session
    (asyncpg.QueryCanceledError, "timeout"),  # statement_timeout, or cancelled by an operator
    (TimeoutError, "timeout"),  # the pool's command timeout
    (asyncpg.InsufficientResourcesError, "server_resources"),  # too many connections, disk full
    (asyncpg.OperatorInterventionError, "connection"),  # shutting down, starting up, crashed
    (asyncpg.PostgresConnectionError, "connection"),
    # A session the server terminated (pg_terminate_backend, a failover) can leave asyncpg's
    # protocol mid-operation: the next statement on it, or the pool's reset when it is handed
    # back, fails with "cannot switch to state N; another operation is in progress". Once
    # answered 500 (9 in the fleet drill), sometimes after the payment's row was committed.
    (asyncpg.InternalClientError, "connection"),
    # ... or a transaction whose connection the server closed under it: leaving the block says
    # "cannot call Transaction.__aexit__(): the underlying connection is closed" (a 500 in the
    # fleet drill, on a follow-up's claim).
    (asyncpg.InterfaceError, "connection"),
    (OSError, "connection"),  # refused, reset, unreachable
)
_UNAVAILABLE_TYPES = tuple(t for t, _ in _UNAVAILABLE)

_INSERT_JOURNAL = ("INSERT INTO payments (id, status, created_at, updated_at, doc, version) "
                   "VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (id) DO NOTHING RETURNING 1")
_UPDATE_JOURNAL = ("UPDATE payments SET status = $2, updated_at = $3, doc = $4, version = $5 + 1, "
                   f"{RELEASE_SET_ASIDE} "
                   "WHERE id = $1 AND version = $5 RETURNING 1")


def _save_statement(journal: str, answer: bool, line: bool, notes: bool = False) -> str:
    """The conditional payment write ($1..$5), then the key's answer (4 parameters), the
    outbox line (4 more) and the merchant notifications (5 arrays), each acting only when the
    payment write did: one statement."""
    ctes = [f"journal AS ({journal})"]
    n = 6
    if answer:
        ctes.append(f"answer AS (UPDATE idempotency SET state = '{_DONE}', status = ${n + 2}, body = ${n + 3} "
                    f"WHERE scope = ${n} AND key = ${n + 1} AND EXISTS (SELECT 1 FROM journal))")
        n += 4
    if line:
        ctes.append(f"line AS (INSERT INTO outbox (log_id, owner, created_at, line) "
                    f"SELECT ${n}, ${n + 1}, ${n + 2}, ${n + 3} WHERE EXISTS (SELECT 1 FROM journal))")
        n += 4
    if notes:
        ctes.append(f"notes AS ({_INSERT_NOTIFICATIONS.format(*range(n, n + 5))} WHERE EXISTS (SELECT 1 FROM journal))")
    return "WITH " + ",\n".join(ctes) + "\nSELECT count(*) FROM journal"


_INSERT_NOTIFICATIONS = ("INSERT INTO notifications (event_id, payment_id, event_type, created_at, body, retry_from, "
                         "next_attempt_at) SELECT e, p, t, c, b, c, c FROM unnest(${}::text[], ${}::text[], "
                         "${}::text[], ${}::float8[], ${}::bytea[]) AS n(e, p, t, c, b)")

# (first write, with answer, with outbox line, with notifications) -> statement
_SAVE = {(first, answer, line, notes): _save_statement(_INSERT_JOURNAL if first else _UPDATE_JOURNAL, answer, line,
                                                       notes)
         for first in (True, False) for answer in (False, True) for line in (False, True) for notes in (False, True)}

# $1 scope, $2 key, $3 fingerprint, $4 resource_id, $5 now, $6 expires_at
_CLAIM_CTE = f"""
WITH claim AS (
    INSERT INTO idempotency AS held (scope, key, fingerprint, resource_id, state, status, body, created_at, expires_at)
    VALUES ($1, $2, $3, $4, '{_IN_FLIGHT}', NULL, NULL, $5, $6)
    ON CONFLICT (scope, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, resource_id = EXCLUDED.resource_id, state = EXCLUDED.state,
            status = NULL, body = NULL, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
        WHERE held.expires_at <= $5
    RETURNING 1
)"""
_CLAIM = _CLAIM_CTE + "\nSELECT count(*) FROM claim"
# ... and, in the same statement, the payment row ($7..$11) at version 1 when the claim was won.
_CLAIM_WITH_RECORD = _CLAIM_CTE + """, journal AS (
    INSERT INTO payments (id, status, created_at, updated_at, doc, version)
    SELECT $7, $8, $9, $10, $11, 1 WHERE EXISTS (SELECT 1 FROM claim)
)
SELECT count(*) FROM claim"""
# ... or the existing payment row ($7 id, $8 status, $9 updated_at, $10 doc), still at version
# $11, moved to its next version (a follow-up).
_CLAIM_WITH_UPDATE = _CLAIM_CTE + """, journal AS (
    UPDATE payments SET status = $8, updated_at = $9, doc = $10, version = $11 + 1, """ + RELEASE_SET_ASIDE + """
    WHERE id = $7 AND version = $11 AND EXISTS (SELECT 1 FROM claim) RETURNING 1
)
SELECT (SELECT count(*) FROM claim) AS claimed, (SELECT count(*) FROM journal) AS journalled"""

_HELD = ("SELECT fingerprint, resource_id, state, status, body, expires_at FROM idempotency "
         "WHERE scope = $1 AND key = $2")

# $1 owner, $2 lease_s, $3 limit. SKIP LOCKED: a row another replica is leasing right now is its own.
_LEASE_UNRESOLVED = f"""
UPDATE payments SET lease_owner = $1, lease_until = {_NOW} + $2::float8 WHERE id IN (
    SELECT id FROM payments WHERE status IN {_UNRESOLVED_SQL}
        AND (lease_until IS NULL OR lease_until <= {_NOW} OR lease_owner = $1)
    ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING version, doc, updated_at"""

_WRITABLE = "SELECT NOT pg_is_in_recovery() AND NOT current_setting('transaction_read_only')::bool"

# $1 owner, $2 own_before, $3 any_before, $4 now, $5 lease_until, $6 after, $7 limit. SKIP LOCKED:
# a row another replica is claiming right now is its to write. log_id collates "C" (code points, as
# Python compares str), so the caller's `after` cursor pages through the rows in the same order.
_CLAIM_OUTBOX = """
UPDATE outbox SET claimed_until = $5 WHERE log_id IN (
    SELECT log_id FROM outbox WHERE log_id > $6 AND (claimed_until IS NULL OR claimed_until <= $4)
        AND (created_at < $3 OR (owner = $1 AND created_at < $2))
    ORDER BY log_id LIMIT $7 FOR UPDATE SKIP LOCKED)
RETURNING log_id, owner, created_at, line"""


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int  # connections open now
    in_use: int
    max_size: int


class PostgresStore:
    """`migrate`: apply pending schema steps at open, under the advisory lock
    (`storage.auto_migrate`); else refuse a database that is behind. `on_acquire(wait_s)` and
    `on_error(kind)` feed the metrics: how long each operation waited for a pool connection, and
    each `JournalUnavailable` by cause (`pool_exhausted`, `connection`, `timeout`, `read_only`,
    `server_resources`)."""

    def __init__(self, dsn: str, *, min_size: int = 2, max_size: int = 10, acquire_timeout_s: float = 2.0,
                 command_timeout_s: float = 5.0, connect_timeout_s: float = 5.0, migrate: bool = True,
                 on_acquire: Callable[[float], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self._dsn = dsn
        self._where = dsn_location(dsn)
        self._min_size = min_size
        self._max_size = max_size
        self._acquire_timeout_s = acquire_timeout_s
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._migrate = migrate
        self._on_acquire = on_acquire
        self._on_error = on_error
        self._pool: asyncpg.Pool | None = None
        self.migrated: list[Migration] = []  # the schema steps the last open applied

    def __repr__(self) -> str:  # never the DSN: it holds the password
        return f"PostgresStore({self._where}, min_size={self._min_size}, max_size={self._max_size})"

    async def open(self) -> None:
        try:
            pool = await asyncpg.create_pool(
                self._dsn, min_size=self._min_size, max_size=self._max_size, timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings={"synchronous_commit": "on", "application_name": "payment-gateway"},
            )
        except _UNAVAILABLE_TYPES as exc:
            raise self._unavailable(exc) from exc
        try:
            await asyncio.to_thread(migrations, "postgres")  # reads the step files once, off the loop
            async with pool.acquire(timeout=self._acquire_timeout_s) as conn:
                self.migrated = await postgres_prepare(conn, migrate=self._migrate)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _UNAVAILABLE_TYPES):
                raise self._unavailable(exc) from exc
            raise
        self._pool = pool

    async def close(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), timeout=self._command_timeout_s)
        except TimeoutError:
            pool.terminate()

    def pool_stats(self) -> PoolStats:
        if self._pool is None:
            return PoolStats(0, 0, self._max_size)
        size = self._pool.get_size()
        return PoolStats(size, size - self._pool.get_idle_size(), self._max_size)

    def _unavailable(self, exc: BaseException) -> JournalUnavailable:
        kind = next(label for cls, label in _UNAVAILABLE if isinstance(exc, cls))
        if self._on_error is not None:
            self._on_error(kind)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if not detail:
            detail = "command timed out" if kind == "timeout" else type(exc).__name__
        return JournalUnavailable(f"PostgreSQL {self._where}: {detail}")

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        pool = self._pool
        if pool is None:
            raise RuntimeError("store is not open")
        started = time.perf_counter()
        try:
            conn = await pool.acquire(timeout=self._acquire_timeout_s)
        except TimeoutError:
            if self._on_error is not None:
                self._on_error("pool_exhausted")
            raise JournalUnavailable(f"PostgreSQL {self._where}: no pool connection free within "
                                     f"{self._acquire_timeout_s:g} s (all {self._max_size} in use)") from None
        except _UNAVAILABLE_TYPES as exc:
            raise self._unavailable(exc) from exc
        if self._on_acquire is not None:
            self._on_acquire(time.perf_counter() - started)
        try:
            yield conn
        except _UNAVAILABLE_TYPES as exc:
            raise self._unavailable(exc) from exc
        finally:
            # A connection that cannot be handed back cleanly (its command was cancelled by the
            # timeout, its socket is dead) is terminated by the pool, which opens a fresh one on
            # the next acquire; that must not replace the operation's own outcome.
            with contextlib.suppress(*_UNAVAILABLE_TYPES, asyncpg.InterfaceError):
                await pool.release(conn)

    async def ping(self) -> None:
        async with self._conn() as conn:
            writable = await conn.fetchval(_WRITABLE)
        if not writable:
            if self._on_error is not None:
                self._on_error("read_only")
            raise JournalUnavailable(f"PostgreSQL {self._where}: read-only (a standby, or a read-only session)")

    # -- payments ------------------------------------------------------------------------------

    async def save_payment(self, record: PaymentRecord, answer: IdempotentAnswer | None = None,
                           outbox: OutboxLine | None = None, notifications: Sequence[Notification] = ()) -> None:
        with next_version(record) as expected:
            payment_id, status, created_at, updated_at, doc = payment_row(record)
            args: tuple[Any, ...] = ((payment_id, status, created_at, updated_at, doc) if expected == 0
                                     else (payment_id, status, updated_at, doc, expected))
            if answer is not None:
                args += (answer.scope, answer.key, answer.response.status, answer.response.body)
            if outbox is not None:
                args += (outbox.log_id, outbox.owner, outbox.created_at, outbox.line)
            if notifications:
                args += tuple(list(column) for column in zip(*((n.event_id, n.payment_id, n.event_type, n.created_at,
                                                                n.body) for n in notifications)))
            statement = _SAVE[expected == 0, answer is not None, outbox is not None, bool(notifications)]
            async with self._conn() as conn:
                written = await conn.fetchval(statement, *args)
            if not written:
                raise StaleWrite(payment_id)

    async def get_payment(self, payment_id: str) -> PaymentRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT version, doc FROM payments WHERE id = $1", payment_id)
        return payment_from_row(row["version"], row["doc"]) if row is not None else None

    async def unresolved_payments(self, limit: int = 500) -> list[PaymentRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT version, doc FROM payments WHERE status IN {_UNRESOLVED_SQL} ORDER BY updated_at LIMIT $1",
                limit)
        return [payment_from_row(r["version"], r["doc"]) for r in rows]

    async def lease_unresolved(self, owner: str, lease_s: float, limit: int = 500) -> list[PaymentRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(_LEASE_UNRESOLVED, owner, lease_s, limit)
        return [payment_from_row(r["version"], r["doc"]) for r in sorted(rows, key=lambda r: r["updated_at"])]

    async def set_aside(self, wakes: Sequence[tuple[str, int, float]]) -> None:
        async with self._conn() as conn:
            await conn.executemany(f"UPDATE payments SET lease_owner = '{SET_ASIDE_OWNER}', lease_until = $3 "
                                   "WHERE id = $1 AND version = $2", wakes)

    # -- idempotency ---------------------------------------------------------------------------

    async def claim_idempotency(
        self, scope: str, key: str, fingerprint: str, resource_id: str, now: float, expires_at: float,
        record: PaymentRecord | None = None,
    ) -> IdempotencyClaim:
        args: tuple[Any, ...] = (scope, key, fingerprint, resource_id, now, expires_at)
        if record is None:
            return await self._claim(_CLAIM, args, resource_id)
        with next_version(record) as expected:
            if expected == 0:
                try:
                    claim = await self._claim(_CLAIM_WITH_RECORD, args + payment_row(record), resource_id)
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name != "payments_pkey":
                        raise
                    raise StaleWrite(record.id) from exc
            else:
                payment_id, status, _created_at, updated_at, doc = payment_row(record)
                claim = await self._claim(_CLAIM_WITH_UPDATE, args + (payment_id, status, updated_at, doc, expected),
                                          resource_id, payment_id=record.id)
        if claim.kind is not ClaimKind.NEW:
            record.version -= 1  # the key was held: nothing of the record was written
        return claim

    async def _claim(self, sql: str, args: tuple[Any, ...], resource_id: str, *,
                     payment_id: str | None = None) -> IdempotencyClaim:
        """Claim the key (with `sql`'s payment write), or say what holds it. With `payment_id`,
        `sql` is the conditional update of that existing row: in one transaction with the
        claim, so a row another writer moved on since it was read undoes the claim."""
        scope, key, fingerprint, now = args[0], args[1], args[2], args[4]
        async with self._conn() as conn:
            for _ in range(_CLAIM_TRIES):
                if payment_id is None:
                    claimed = bool(await conn.fetchval(sql, *args))
                else:
                    async with conn.transaction():
                        row = await conn.fetchrow(sql, *args)
                        claimed = bool(row["claimed"])
                        if claimed and not row["journalled"]:
                            raise StaleWrite(payment_id)  # rolls the claim back with the transaction
                if claimed:
                    return IdempotencyClaim(ClaimKind.NEW, resource_id)
                row = await conn.fetchrow(_HELD, scope, key)
                if row is None or row["expires_at"] <= now:
                    continue  # released, purged or replaced since it blocked us: claim again
                if row["fingerprint"] != fingerprint:
                    return IdempotencyClaim(ClaimKind.MISMATCH, row["resource_id"])
                if row["state"] == _IN_FLIGHT:
                    return IdempotencyClaim(ClaimKind.IN_FLIGHT, row["resource_id"])
                return IdempotencyClaim(ClaimKind.REPLAY, row["resource_id"],
                                        StoredResponse(row["status"], bytes(row["body"])))
        # Only a key released and re-claimed by others this many times in a row gets here: say busy.
        return IdempotencyClaim(ClaimKind.IN_FLIGHT, None)

    async def complete_idempotency(self, scope: str, key: str, response: StoredResponse) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"UPDATE idempotency SET state = '{_DONE}', status = $3, body = $4 WHERE scope = $1 AND key = $2",
                scope, key, response.status, response.body)

    async def release_idempotency(self, scope: str, key: str) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"DELETE FROM idempotency WHERE scope = $1 AND key = $2 AND state = '{_IN_FLIGHT}'", scope, key)

    async def discard_unsent(self, payment_id: str, version: int, scope: str, key: str) -> bool:
        async with self._conn() as conn, conn.transaction():
            if await conn.execute("DELETE FROM payments WHERE id = $1 AND version = $2", payment_id, version) \
                    != "DELETE 1":
                return False
            await conn.execute(
                f"DELETE FROM idempotency WHERE scope = $1 AND key = $2 AND state = '{_IN_FLIGHT}'", scope, key)
            return True

    async def complete_idempotency_for(self, resource_id: str, response: StoredResponse) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"UPDATE idempotency SET state = '{_DONE}', status = $2, body = $3 WHERE resource_id = $1",
                resource_id, response.status, response.body)

    async def purge_expired_idempotency(self, now: float, limit: int = 2000) -> int:
        async with self._conn() as conn:
            tag = await conn.execute(
                "DELETE FROM idempotency WHERE (scope, key) IN (SELECT scope, key FROM idempotency "
                f"WHERE expires_at <= $1 AND state = '{_DONE}' ORDER BY expires_at LIMIT $2)", now, limit)
        return int(tag.rsplit(" ", 1)[-1])

    # -- the transaction log's outbox ----------------------------------------------------------

    async def delete_outbox(self, log_ids: Sequence[str]) -> None:
        if not log_ids:
            return
        async with self._conn() as conn:
            await conn.execute("DELETE FROM outbox WHERE log_id = ANY($1::text[])", list(log_ids))

    async def claim_outbox(self, owner: str, *, own_before: float, any_before: float, now: float,
                           lease_until: float, after: str = "", limit: int = 500) -> list[OutboxLine]:
        async with self._conn() as conn:
            rows = await conn.fetch(_CLAIM_OUTBOX, owner, own_before, any_before, now, lease_until, after, limit)
        return sorted((OutboxLine(r["log_id"], bytes(r["line"]), r["owner"], r["created_at"]) for r in rows),
                      key=lambda line: line.log_id)

    # -- merchant notifications' outbox (gateway.notifications) --------------------------------

    async def lease_notifications(self, owner: str, lease_s: float, limit: int) -> list[Notification]:
        async with self._conn() as conn:
            rows = await conn.fetch(_LEASE_NOTIFICATIONS, owner, lease_s, limit)
        return sorted((notification_from_row(r) for r in rows), key=lambda n: n.next_attempt_at or 0.0)

    async def finish_notification(self, event_id: str, attempt: AttemptRecord,
                                  outbox: OutboxLine | None = None) -> bool:
        args: tuple[Any, ...] = (event_id, attempt.outcome.state.value, attempt.retry_in_s,
                                 attempt.outcome is DeliveryOutcome.DELIVERED, attempt.http_status, attempt.error)
        if outbox is not None:
            args += (outbox.log_id, outbox.owner, outbox.created_at, outbox.line)
        async with self._conn() as conn:
            return bool(await conn.fetchval(_FINISH_WITH_LINE if outbox is not None else _FINISH, *args))

    async def list_notifications(self, *, since: float | None = None, event_id: str | None = None,
                                 limit: int = 100) -> list[Notification]:
        where, value = ("event_id = $1", event_id) if event_id is not None else ("created_at >= $1", since or 0.0)
        async with self._conn() as conn:
            rows = await conn.fetch(f"SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE {where} "
                                    "ORDER BY created_at DESC LIMIT $2", value, limit)
        return [notification_from_row(r) for r in rows]

    async def replay_notifications(self, *, since: float | None = None, event_id: str | None = None) -> int:
        where, value = ("event_id = $1", event_id) if event_id is not None else ("created_at >= $1", since or 0.0)
        async with self._conn() as conn:
            tag = await conn.execute(f"UPDATE notifications SET state = 'pending', retry_from = {_NOW}, "
                                     f"next_attempt_at = {_NOW}, lease_owner = NULL, lease_until = NULL "
                                     f"WHERE {where}", value)
        return int(tag.rsplit(" ", 1)[-1])

    async def count_pending_notifications(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM notifications WHERE state = 'pending'"))

    async def release_notification_leases(self, owner: str | None) -> int:
        async with self._conn() as conn:
            tag = await conn.execute("UPDATE notifications SET lease_owner = NULL, lease_until = NULL "
                                     "WHERE state = 'pending' AND lease_owner IS NOT NULL "
                                     "AND ($1::text IS NULL OR lease_owner = $1)", owner)
        return int(tag.rsplit(" ", 1)[-1])

    async def purge_notifications(self, before: float, limit: int = 10_000) -> int:
        async with self._conn() as conn:
            tag = await conn.execute("DELETE FROM notifications WHERE event_id IN (SELECT event_id FROM notifications "
                                     "WHERE created_at < $1 AND state <> 'pending' LIMIT $2)", before, limit)
        return int(tag.rsplit(" ", 1)[-1])

    # -- provider webhooks in (gateway.webhooks) -------------------------------------------------

    async def journal_webhook_events(self, events: Sequence[WebhookEventRecord]) -> int:
        rows = [(e.provider, e.event_id, e.state.value, e.received_at, e.payment_id, e.to_doc()) for e in events]
        async with self._conn() as conn:
            return await conn.fetchval(_INSERT_WEBHOOKS, [r[0] for r in rows], [r[1] for r in rows],
                                       [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows],
                                       [r[5] for r in rows])

    async def lease_webhook_events(self, owner: str, lease_s: float, limit: int = 100) -> list[WebhookEventRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(_LEASE_WEBHOOKS, owner, lease_s, limit)
        return [_webhook_record(r) for r in sorted(rows, key=lambda r: r["received_at"])]

    async def finish_webhook_event(self, record: WebhookEventRecord) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE webhook_events SET state = $3, payment_id = $4, processed_at = $5, doc = $6, "
                "lease_owner = NULL, lease_until = NULL WHERE provider = $1 AND event_id = $2",
                record.provider, record.event_id, record.state.value, record.payment_id, record.processed_at,
                record.to_doc())

    async def webhook_events(self, state: WebhookState | None = None, limit: int = 100) -> list[WebhookEventRecord]:
        async with self._conn() as conn:
            if state is None:
                rows = await conn.fetch(f"SELECT {_WEBHOOK_COLUMNS} FROM webhook_events "
                                        "ORDER BY received_at DESC LIMIT $1", limit)
            else:
                rows = await conn.fetch(f"SELECT {_WEBHOOK_COLUMNS} FROM webhook_events WHERE state = $1 "
                                        "ORDER BY received_at DESC LIMIT $2", state.value, limit)
        return [_webhook_record(r) for r in rows]


# $1 owner, $2 lease_s, $3 limit. SKIP LOCKED: a row another sender is leasing right now is its own.
_LEASE_NOTIFICATIONS = f"""
UPDATE notifications SET lease_owner = $1, lease_until = {_NOW} + $2::float8 WHERE event_id IN (
    SELECT event_id FROM notifications WHERE state = 'pending' AND next_attempt_at <= {_NOW}
        AND (lease_until IS NULL OR lease_until <= {_NOW})
    ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING {NOTIFICATION_COLUMNS}"""

# $1 event_id, $2 state, $3 retry_in_s, $4 delivered, $5 http status, $6 error; then the log line ($7..$10).
_FINISH_CTE = f"""
WITH done AS (
    UPDATE notifications SET attempts = attempts + 1, state = $2, next_attempt_at = {_NOW} + $3::float8,
        delivered_at = CASE WHEN $4 THEN {_NOW} END, last_status = $5, last_error = $6,
        lease_owner = NULL, lease_until = NULL
    WHERE event_id = $1 AND state = 'pending' RETURNING 1)"""
_FINISH = _FINISH_CTE + "\nSELECT count(*) FROM done"
_FINISH_WITH_LINE = _FINISH_CTE + """, line AS (
    INSERT INTO outbox (log_id, owner, created_at, line) SELECT $7, $8, $9, $10 WHERE EXISTS (SELECT 1 FROM done))
SELECT count(*) FROM done"""


_WEBHOOK_COLUMNS = "provider, event_id, state, received_at, payment_id, processed_at, doc"
# One statement for a delivery's items (arrays $1..$6): the new ones inserted, repeats left alone.
_INSERT_WEBHOOKS = """
WITH added AS (
    INSERT INTO webhook_events (provider, event_id, state, received_at, payment_id, doc)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::bytea[])
    ON CONFLICT (provider, event_id) DO NOTHING RETURNING 1)
SELECT count(*) FROM added"""
# $1 owner, $2 lease_s, $3 limit. SKIP LOCKED: an event another replica is leasing right now is its own.
_LEASE_WEBHOOKS = f"""
UPDATE webhook_events SET lease_owner = $1, lease_until = {_NOW} + $2::float8 WHERE (provider, event_id) IN (
    SELECT provider, event_id FROM webhook_events WHERE state = '{WebhookState.PENDING.value}'
        AND (lease_until IS NULL OR lease_until <= {_NOW} OR lease_owner = $1)
    ORDER BY received_at LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING {_WEBHOOK_COLUMNS}"""


def _webhook_record(row: asyncpg.Record) -> WebhookEventRecord:
    return WebhookEventRecord.from_row(row["provider"], row["state"], row["received_at"], row["payment_id"],
                                       row["processed_at"], bytes(row["doc"]))


def dsn_location(dsn: str) -> str:
    """host:port/database of a URL DSN, for messages: never the user or password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "(unparsable DSN)"
    if parts.scheme not in ("postgres", "postgresql"):
        return "(DSN)"
    return f"{host}:{port}{parts.path or ''}"
