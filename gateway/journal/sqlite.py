"""The embedded store: SQLite in WAL mode behind one writer thread with group commit.

Every operation is a small function queued to a dedicated thread that owns the connection.
The thread drains whatever is queued, runs it all in one transaction (a savepoint each, so one
failure does not sink its neighbours), commits once — one fsync for many payments — and wakes
the event loop once per batch. `save_payment` therefore returns only after its row is on disk,
yet a busy gateway pays one fsync per batch, not per payment.

The `outbox` table holds transaction-log lines committed with their final journal row and not
yet on disk in the log file (`gateway.txlog.outbox`): an insert rides in the payment's own
operation, and the deletes of a whole flushed batch of lines are one operation.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

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
from gateway.journal.store import UNRESOLVED_STATUSES, StoreOverloaded, StoreUnavailable, payment_row

T = TypeVar("T")
_STOP = object()
_UNRESOLVED = UNRESOLVED_STATUSES

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_unresolved ON payments (updated_at)
    WHERE status IN {_UNRESOLVED!r};
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    body BLOB,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE INDEX IF NOT EXISTS idempotency_resource ON idempotency (resource_id);
CREATE TABLE IF NOT EXISTS outbox (
    log_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    claimed_until REAL,
    line BLOB NOT NULL
);
"""



class SqliteStore:
    def __init__(self, path: Path, *, queue_size: int = 10_000, max_batch: int = 512) -> None:
        self.path = path
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._max_batch = max_batch
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.operations = 0

    async def open(self) -> None:
        """Start the writer thread on the database file; `StoreUnavailable` naming the file and
        the problem when it cannot be created, opened or read as a database."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="sqlite-journal", daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- the writer thread -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
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
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # each commit is on disk before callers resume
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:  # "file is not a database", a directory the WAL cannot go in
            conn.close()
            raise StoreUnavailable(where, f"not usable as an SQLite journal: {exc}") from None
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except Exception as exc:  # surface start-up failure to open()
            self._loop.call_soon_threadsafe(_settle, [(ready, None, exc)])
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
            return [(fut, None, exc) for _fn, fut in batch]
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
                           outbox: OutboxLine | None = None) -> None:
        row = payment_row(record)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_UPSERT_PAYMENT, row)
            if answer is not None:
                _store_answer(conn, answer.scope, answer.key, answer.response)
            if outbox is not None:
                conn.execute(_INSERT_OUTBOX, (outbox.log_id, outbox.owner, outbox.created_at, outbox.line))

        await self._submit(op)

    async def get_payment(self, payment_id: str) -> PaymentRecord | None:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT doc FROM payments WHERE id = ?", (payment_id,)).fetchone()
            return row[0] if row else None

        doc = await self._submit(op)
        return PaymentRecord.from_doc(orjson.loads(doc)) if doc is not None else None

    async def unresolved_payments(self, limit: int = 500) -> list[PaymentRecord]:
        def op(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                f"SELECT doc FROM payments WHERE status IN {_UNRESOLVED!r} ORDER BY updated_at LIMIT ?", (limit,)
            ).fetchall()
            return [r[0] for r in rows]

        return [PaymentRecord.from_doc(orjson.loads(d)) for d in await self._submit(op)]

    # -- idempotency ---------------------------------------------------------------------------

    async def claim_idempotency(
        self, scope: str, key: str, fingerprint: str, resource_id: str, now: float, expires_at: float,
        record: PaymentRecord | None = None,
    ) -> IdempotencyClaim:
        new_row = payment_row(record) if record is not None else None

        def op(conn: sqlite3.Connection) -> IdempotencyClaim:
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
                conn.execute(_UPSERT_PAYMENT, new_row)
            return IdempotencyClaim(ClaimKind.NEW, resource_id)

        return await self._submit(op)

    async def complete_idempotency(self, scope: str, key: str, response: StoredResponse) -> None:
        await self._submit(lambda conn: _store_answer(conn, scope, key, response))

    async def release_idempotency(self, scope: str, key: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM idempotency WHERE scope = ? AND key = ? AND state = ?",
                         (scope, key, IdempotencyState.IN_FLIGHT.value))

        await self._submit(op)

    async def complete_idempotency_for(self, resource_id: str, response: StoredResponse) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE idempotency SET state = ?, status = ?, body = ? WHERE resource_id = ?",
                (IdempotencyState.DONE.value, response.status, response.body, resource_id),
            )

        await self._submit(op)

    async def purge_expired_idempotency(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM idempotency WHERE expires_at <= ? AND state = ?",
                                (now, IdempotencyState.DONE.value)).rowcount

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


_INSERT_OUTBOX = "INSERT INTO outbox (log_id, owner, created_at, line) VALUES (?, ?, ?, ?)"

_UPSERT_PAYMENT = (
    "INSERT INTO payments (id, status, created_at, updated_at, doc) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at, doc = excluded.doc"
)


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
