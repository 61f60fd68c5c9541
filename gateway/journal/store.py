"""The store interface the service depends on; SQLite embeds it, PostgreSQL scales it out.

The fleet contract (DESIGN rule 4: one writer per payment, one owner per background job, never
a stale overwrite), the same for both backends and for any number of processes on one database:

- **Conditional updates.** Every payment row carries a `version`. The first write of a payment
  (the front door's claim, or `save_payment` of a record at version 0) inserts it at version 1;
  every later `save_payment` is `UPDATE ... WHERE id = ? AND version = ?` and bumps it. A record
  read before someone else wrote the row fails with `StaleWrite` and changes nothing (not the
  row, not the key's answer, not the outbox): the caller re-reads and decides again. On success
  the caller's `record.version` is the stored one, so it can keep writing the same object.
- **Follow-up claims.** `claim_idempotency` with the caller's key and an existing record (moved
  to `<op>_pending`) writes both in one transaction, conditional on the record's version: a
  second capture, void or refund of the same payment, whichever process it reached, either finds
  the row pending (and is refused) or raises `StaleWrite`. A claimer that died leaves a pending
  follow-up the reconciler settles, never a key stuck with nothing behind it.
- **Leases for background work.** `lease_unresolved` hands each unresolved row to one owner for
  a lease: replicas reconciling together split the orphans instead of settling each twice; a
  dead replica's rows are taken over when its lease runs out.

Lease times are the store's own clock (PostgreSQL's for the shared database, so replicas with
skewed clocks still agree on when a lease ends).

Typed failures a caller can act on (`gateway.journal.errors`): `StaleWrite` (re-read), `JournalUnavailable` (the database
cannot take the write now: answer 503 and let the caller retry), `StoreOverloaded` (shed load),
`SchemaMismatch` (this code and the database disagree on the schema: refuse to start).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol



import orjson

from gateway.journal.records import (
    IdempotencyClaim,
    IdempotentAnswer,
    OutboxLine,
    PaymentRecord,
    StoredResponse,
)
from gateway.journal.notification_records import AttemptRecord, DeliveryState, Notification
from domain.outcome import PaymentStatus

if TYPE_CHECKING:
    from gateway.journal.schema import Migration
    from gateway.journal.webhook_events import WebhookEventRecord, WebhookState

# What the reconciler owns: payments without a final answer, and follow-ups without one.
UNRESOLVED_STATUSES = tuple(s.value for s in (
    PaymentStatus.RECEIVED, PaymentStatus.ATTEMPTING, PaymentStatus.PENDING,
    PaymentStatus.CAPTURE_PENDING, PaymentStatus.VOID_PENDING, PaymentStatus.REFUND_PENDING,
    PaymentStatus.ACTION_REQUIRED))


SET_ASIDE_OWNER = "(set aside)"  # no reconciler's lease owner: theirs hold a host name and ':'
# In every payment update: a row set aside is released by any write of it.
RELEASE_SET_ASIDE = (f"lease_owner = CASE WHEN lease_owner = '{SET_ASIDE_OWNER}' THEN NULL ELSE lease_owner END, "
                     f"lease_until = CASE WHEN lease_owner = '{SET_ASIDE_OWNER}' THEN NULL ELSE lease_until END")


def payment_row(record: PaymentRecord) -> tuple[str, str, float, float, bytes]:
    """The columns every backend stores: id, status and times for the indexes, the (redacted) document."""
    return (record.id, record.status.value, record.created_at, record.updated_at, orjson.dumps(record.to_doc()))


def payment_from_row(version: int, doc: bytes) -> PaymentRecord:
    """A stored row as a record. The version column is the truth: rows written before versions
    existed have none in their document."""
    record = PaymentRecord.from_doc(orjson.loads(doc))
    record.version = version
    return record



# The columns of a notification row, in `notification_from_row`'s order (both backends).
NOTIFICATION_COLUMNS = ("event_id, event_type, payment_id, created_at, body, state, attempts, retry_from, "
                        "next_attempt_at, delivered_at, last_status, last_error")


def notification_from_row(row: Sequence[Any]) -> Notification:
    return Notification(row[0], row[1], row[2], row[3], bytes(row[4]), DeliveryState(row[5]), *row[6:])


class next_version:  # noqa: N801 - used like a function: `with next_version(record) as expected:`
    """Around one conditional write: yields the version the row must still have, with
    `record.version` already the one the write stores (so the document agrees with the column),
    and puts it back when the write fails, so the caller's record still says what it read. (A
    write cancelled in flight may still commit: the record then reads as stale, the safe side.)
    A class rather than a generator context manager: it is on every journal write's path."""

    __slots__ = ("_record", "_expected")

    def __init__(self, record: PaymentRecord) -> None:
        self._record = record
        self._expected = record.version

    def __enter__(self) -> int:
        self._record.version = self._expected + 1
        return self._expected

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            self._record.version = self._expected


class Store(Protocol):
    migrated: list[Migration]  # the schema steps the last `open` applied (none: it ran no DDL)

    async def open(self) -> None:
        """Connect and check the schema version (migrating first where allowed). Raises
        `SchemaMismatch` or `JournalUnavailable`; never runs DDL on an up-to-date database."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """One cheap round trip that proves the journal takes writes now (readiness probe);
        raises `JournalUnavailable` otherwise."""
        ...

    async def save_payment(self, record: PaymentRecord, answer: IdempotentAnswer | None = None,
                           outbox: OutboxLine | None = None, notifications: Sequence[Notification] = ()) -> None:
        """Durable on return: callers rely on the row being on disk before a provider call.
        Conditional: raises `StaleWrite` (and writes nothing) when the row is no longer at
        `record.version`, or already exists for a record at version 0; on success
        `record.version` is the new version. With `answer`, the key's stored answer is written
        in the same transaction, so a replay can never disagree with the journal. With
        `outbox`, the transaction's log line is stored in the outbox in that same transaction
        (a `log_id` already in the outbox is an error), so a crash before the line reaches the
        log file cannot lose it. With `notifications`, the merchant notifications the change
        yields are stored (pending, due now) in that same transaction too; an `event_id`
        already stored is an error, so nothing of the write is kept."""
        ...

    async def get_payment(self, payment_id: str) -> PaymentRecord | None: ...

    async def unresolved_payments(self, limit: int = 500) -> list[PaymentRecord]:
        """Payments the reconciler owns: received, attempting or pending, or with a follow-up
        pending; oldest update first."""
        ...

    async def lease_unresolved(self, owner: str, lease_s: float, limit: int = 500) -> list[PaymentRecord]:
        """Like `unresolved_payments`, but each returned row is leased to `owner` for `lease_s`
        seconds: rows leased to another owner whose lease has not run out are skipped, rows
        already leased to `owner` are renewed. Atomic across processes, so two replicas calling
        together get disjoint rows. The lease says who may work on a row, not what it holds:
        it does not change the row's version, and the owner's writes are still conditional.
        Rows set aside (`set_aside`) are skipped until their wake time."""
        ...

    async def set_aside(self, wakes: Sequence[tuple[str, int, float]]) -> None:
        """(payment id, version, wake time): the reconciler has nothing to do for these rows
        until then (a shopper's challenge not yet expired), so its lease skips them and
        thousands of waiting challenges at a peak cannot fill its batch and starve the pending
        payments behind them. The row is leased to SET_ASIDE_OWNER, whom no reconciler is,
        until the wake time: no schema change, and every lease rule holds. Only a row still at
        that version is set aside; any later write of the row (an interrupted completion, a
        webhook) releases it, so the reconciler sees it again at its next pass."""
        ...

    async def claim_idempotency(
        self, scope: str, key: str, fingerprint: str, resource_id: str, now: float, expires_at: float,
        record: PaymentRecord | None = None,
    ) -> IdempotencyClaim:
        """Atomically: insert an in-flight record (and `record`, at version 1, so a crash right
        after the claim leaves a payment the reconciler owns), or report what the key already
        holds. `StaleWrite` when `record`'s id is already journalled."""
        ...

    async def complete_idempotency(self, scope: str, key: str, response: StoredResponse) -> None: ...

    async def release_idempotency(self, scope: str, key: str) -> None:
        """Forget an in-flight key whose request changed nothing, so the caller may retry it."""
        ...

    async def discard_unsent(self, payment_id: str, version: int, scope: str, key: str) -> bool:
        """Forget a payment claimed but never sent to any provider (every candidate at its quota),
        with its in-flight key, in one transaction: the caller was told "not now, retry with the
        same key", so the books hold no failed payment for it. Only while the row is still at
        `version` (nobody else moved it on); False, and nothing removed, otherwise."""
        ...

    async def complete_idempotency_for(self, resource_id: str, response: StoredResponse) -> None:
        """The reconciler settled `resource_id`: every key that created it (still in flight after a
        crash, or answered `pending`) now replays the final answer."""
        ...

    async def purge_expired_idempotency(self, now: float, limit: int = 2000) -> int:
        """Delete at most `limit` answered keys past their expiry; returns how many. Bounded so
        that one purge is one short transaction: a backlog of millions (a store that was down
        through its retention, a shorter retention configured) would otherwise hold the single
        writer (SQLite) or the table's locks for as long as the whole delete takes, with every
        payment waiting behind it. The caller repeats while a purge deletes `limit`."""
        ...

    # -- the transaction log's outbox (gateway.txlog.outbox) --------------------------------------

    async def delete_outbox(self, log_ids: Sequence[str]) -> None:
        """Forget outbox lines that are on disk in the log file: one transaction for the batch;
        ids no longer in the outbox are ignored."""
        ...

    async def claim_outbox(self, owner: str, *, own_before: float, any_before: float, now: float,
                           lease_until: float, after: str = "", limit: int = 500) -> list[OutboxLine]:
        """Lease and return outbox lines a crash may have kept from the log file, `limit` at a
        time in `log_id` order, starting after `after`: those `owner` wrote before `own_before`,
        and those anyone wrote before `any_before`, unless another claimer's lease runs past `now`
        (`now` = infinity takes over every lease: a process that owns its store alone). Each
        returned line is leased until `lease_until`, so replicas starting together do not both
        write it again; `delete_outbox` ends it."""
        ...

    # -- provider webhooks in (gateway.webhooks) ---------------------------------------------------

    async def journal_webhook_events(self, events: Sequence[WebhookEventRecord]) -> int:
        """Durable on return, in one transaction: each event not yet journalled for its
        (provider, event id) is inserted `pending`; one already there is left as it is (a
        repeated delivery). Returns how many were new."""
        ...

    async def lease_webhook_events(self, owner: str, lease_s: float, limit: int = 100) -> list[WebhookEventRecord]:
        """Pending events, oldest first, each leased to `owner` for `lease_s` seconds: events
        leased to another owner whose lease has not run out are skipped, `owner`'s are renewed.
        Atomic across processes (the same contract as `lease_unresolved`)."""
        ...

    async def finish_webhook_event(self, record: WebhookEventRecord) -> None:
        """Store what applying the event did (its state, payment, outcome) and end its lease."""
        ...

    async def webhook_events(self, state: WebhookState | None = None, limit: int = 100) -> list[WebhookEventRecord]:
        """Journalled events (in `state`, or any), newest first: for ops (orphans above all)."""
    # -- merchant notifications' outbox (gateway.notifications) -----------------------------------
    # Rows are inserted by `save_payment(..., notifications=...)`; the senders lease them.

    async def lease_notifications(self, owner: str, lease_s: float, limit: int) -> list[Notification]:
        """Pending notifications that are due, soonest first, each leased to `owner` for
        `lease_s` seconds: a row another sender holds under a lease that has not run out is
        skipped, so senders in any number of processes get disjoint rows. Store clock."""
        ...

    async def finish_notification(self, event_id: str, attempt: AttemptRecord,
                                  outbox: OutboxLine | None = None) -> bool:
        """Record one delivery attempt on a pending row (attempts + 1, its state, due again
        `attempt.retry_in_s` from now when it failed) and end its lease; with `outbox`, the
        attempt's transaction-log line commits with it. False (nothing written) when the row is
        no longer pending: another sender, whose lease took over an expired one, finished it."""
        ...

    async def list_notifications(self, *, since: float | None = None, event_id: str | None = None,
                                 limit: int = 100) -> list[Notification]:
        """Notifications created at or after `since` (or the one `event_id`), newest first."""
        ...

    async def replay_notifications(self, *, since: float | None = None, event_id: str | None = None) -> int:
        """Deliver again (delivered or given up alike): pending and due now, a fresh retry
        window, its lease ended. Returns how many rows."""
        ...

    async def count_pending_notifications(self) -> int: ...

    async def release_notification_leases(self, owner: str | None) -> int:
        """End `owner`'s leases (a sender stopping: its abandoned attempts are due at once), or
        every lease (`None`: a process that owns its store alone, starting after a crash)."""
        ...

    async def purge_notifications(self, before: float, limit: int = 10_000) -> int:
        """Forget up to `limit` delivered or given-up notifications created before `before`
        (`notifications.retention_days`); pending ones are kept whatever their age."""
        ...
