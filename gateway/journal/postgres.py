"""The scale-out store: PostgreSQL through an asyncpg pool, shared by every replica.

Same contract as `SqliteStore`, statement for statement:

- `claim_idempotency` is one statement: `INSERT ... ON CONFLICT (scope, key) DO UPDATE ... WHERE
  the held record has expired`, with the payment row inserted by a second data-modifying CTE
  only when the claim row came back. One statement is one transaction, so the claim and the
  journal row commit together or not at all, and the unique key makes the claim atomic across
  replicas: a concurrent claimer blocks on the row until the first commits, then finds it held.
  Only when the key is held do we read what it holds (a second statement; if the record vanished
  in between, released or purged, the claim is tried again, a bounded number of times).
- `save_payment` with an answer is one statement too (the payment upsert as a CTE, the answer
  as the main UPDATE), so a replay can never disagree with the journal.
- `save_payment` with an outbox line adds the line's insert as one more CTE of that statement, so
  the transaction-log line commits with the final journal row (`gateway.txlog.outbox`).
- Durable on return: every connection runs with `synchronous_commit = on`, so a statement
  returns only after its commit record is flushed to the WAL on disk.

Group commit: the sqlite store batches in the application because SQLite has one writer and an
fsync per transaction. PostgreSQL already does it in the server: a committing backend flushes
the WAL up to its own commit record, and every concurrent commit whose record lies below that
point is made durable by the same fsync (`commit_delay`/`commit_siblings` can widen the window).
With many payments in flight on the pool's connections, one fsync serves many of them, so there
is no application-level batching here: each operation is its own short transaction.

Documents are stored as BYTEA holding the same orjson bytes as the SQLite store, not JSONB:
no parse on the hot path, and JSONB rejects a NUL character that a caller may legally send in a
free-text field such as `merchant_reference`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson

from gateway.journal.records import (
    ClaimKind,
    IdempotencyClaim,
    IdempotencyState,
    IdempotentAnswer,
    OutboxLine,
    PaymentRecord,
    StoredResponse,
)
from gateway.journal.store import UNRESOLVED_STATUSES, StoreOverloaded, payment_row

_UNRESOLVED_SQL = "(" + ", ".join(f"'{s}'" for s in UNRESOLVED_STATUSES) + ")"
_IN_FLIGHT = IdempotencyState.IN_FLIGHT.value
_DONE = IdempotencyState.DONE.value
_SCHEMA_LOCK = 0x6761_7465_7761_79  # pg_advisory_xact_lock key: replicas starting together create the schema once
_CLAIM_TRIES = 5

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    doc BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_unresolved ON payments (updated_at) WHERE status IN {_UNRESOLVED_SQL};
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    body BYTEA,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE INDEX IF NOT EXISTS idempotency_resource ON idempotency (resource_id);
CREATE TABLE IF NOT EXISTS outbox (
    log_id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    claimed_until DOUBLE PRECISION,
    line BYTEA NOT NULL
);
"""

_UPSERT_PAYMENT = (
    "INSERT INTO payments (id, status, created_at, updated_at, doc) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, doc = EXCLUDED.doc"
)

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
# ... and, in the same statement, the payment row ($7..$11) when the claim was won.
_CLAIM_WITH_RECORD = _CLAIM_CTE + """, journal AS (
    INSERT INTO payments (id, status, created_at, updated_at, doc)
    SELECT $7, $8, $9, $10, $11 WHERE EXISTS (SELECT 1 FROM claim)
    ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, doc = EXCLUDED.doc
)
SELECT count(*) FROM claim"""

_HELD = ("SELECT fingerprint, resource_id, state, status, body, expires_at FROM idempotency "
         "WHERE scope = $1 AND key = $2")

# $1..$5 the payment row, $6 scope, $7 key, $8 status, $9 body
_SAVE_WITH_ANSWER = f"""
WITH journal AS ({_UPSERT_PAYMENT})
UPDATE idempotency SET state = '{_DONE}', status = $8, body = $9 WHERE scope = $6 AND key = $7"""
# ... and the transaction's log line into the outbox ($10 log_id, $11 owner, $12 created_at, $13 line)
_SAVE_WITH_ANSWER_AND_LINE = f"""
WITH journal AS ({_UPSERT_PAYMENT}),
outbox AS (INSERT INTO outbox (log_id, owner, created_at, line) VALUES ($10, $11, $12, $13))
UPDATE idempotency SET state = '{_DONE}', status = $8, body = $9 WHERE scope = $6 AND key = $7"""
# $1..$5 the payment row, $6..$9 the outbox line
_SAVE_WITH_LINE = f"""
WITH journal AS ({_UPSERT_PAYMENT})
INSERT INTO outbox (log_id, owner, created_at, line) VALUES ($6, $7, $8, $9)"""

# $1 owner, $2 own_before, $3 any_before, $4 now, $5 lease_until, $6 after, $7 limit. SKIP LOCKED:
# a row another replica is claiming right now is its to write. log_id collates "C" (code points, as
# Python compares str), so the caller's `after` cursor pages through the rows in the same order.
_CLAIM_OUTBOX = """
UPDATE outbox SET claimed_until = $5 WHERE log_id IN (
    SELECT log_id FROM outbox WHERE log_id > $6 AND (claimed_until IS NULL OR claimed_until <= $4)
        AND (created_at < $3 OR (owner = $1 AND created_at < $2))
    ORDER BY log_id LIMIT $7 FOR UPDATE SKIP LOCKED)
RETURNING log_id, owner, created_at, line"""


class PostgresStore:
    def __init__(self, dsn: str, *, min_size: int = 2, max_size: int = 10, acquire_timeout_s: float = 5.0,
                 command_timeout_s: float = 10.0, connect_timeout_s: float = 5.0) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._acquire_timeout_s = acquire_timeout_s
        self._command_timeout_s = command_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:  # never the DSN: it holds the password
        return f"PostgresStore(min_size={self._min_size}, max_size={self._max_size})"

    async def open(self) -> None:
        pool = await asyncpg.create_pool(
            self._dsn, min_size=self._min_size, max_size=self._max_size, timeout=self._connect_timeout_s,
            command_timeout=self._command_timeout_s,
            server_settings={"synchronous_commit": "on", "application_name": "payment-gateway"},
        )
        try:
            async with pool.acquire(timeout=self._acquire_timeout_s) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(SCHEMA)
        except BaseException:
            await pool.close()
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

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise RuntimeError("store is not open")
        try:
            conn = await self._pool.acquire(timeout=self._acquire_timeout_s)
        except TimeoutError:
            raise StoreOverloaded("no journal connection free within the acquire timeout") from None
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    # -- payments ------------------------------------------------------------------------------

    async def save_payment(self, record: PaymentRecord, answer: IdempotentAnswer | None = None,
                           outbox: OutboxLine | None = None) -> None:
        args: tuple[Any, ...] = payment_row(record)
        if answer is None:
            sql = _UPSERT_PAYMENT if outbox is None else _SAVE_WITH_LINE
        else:
            sql = _SAVE_WITH_ANSWER if outbox is None else _SAVE_WITH_ANSWER_AND_LINE
            args += (answer.scope, answer.key, answer.response.status, answer.response.body)
        if outbox is not None:
            args += (outbox.log_id, outbox.owner, outbox.created_at, outbox.line)
        async with self._conn() as conn:
            await conn.execute(sql, *args)

    async def get_payment(self, payment_id: str) -> PaymentRecord | None:
        async with self._conn() as conn:
            doc = await conn.fetchval("SELECT doc FROM payments WHERE id = $1", payment_id)
        return PaymentRecord.from_doc(orjson.loads(doc)) if doc is not None else None

    async def unresolved_payments(self, limit: int = 500) -> list[PaymentRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT doc FROM payments WHERE status IN {_UNRESOLVED_SQL} ORDER BY updated_at LIMIT $1", limit)
        return [PaymentRecord.from_doc(orjson.loads(r[0])) for r in rows]

    # -- idempotency ---------------------------------------------------------------------------

    async def claim_idempotency(
        self, scope: str, key: str, fingerprint: str, resource_id: str, now: float, expires_at: float,
        record: PaymentRecord | None = None,
    ) -> IdempotencyClaim:
        args: tuple[Any, ...] = (scope, key, fingerprint, resource_id, now, expires_at)
        sql = _CLAIM
        if record is not None:
            sql, args = _CLAIM_WITH_RECORD, args + payment_row(record)
        async with self._conn() as conn:
            for _ in range(_CLAIM_TRIES):
                if await conn.fetchval(sql, *args):
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

    async def complete_idempotency_for(self, resource_id: str, response: StoredResponse) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"UPDATE idempotency SET state = '{_DONE}', status = $2, body = $3 WHERE resource_id = $1",
                resource_id, response.status, response.body)

    async def purge_expired_idempotency(self, now: float) -> int:
        async with self._conn() as conn:
            tag = await conn.execute(f"DELETE FROM idempotency WHERE expires_at <= $1 AND state = '{_DONE}'", now)
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


