"""The store interface the service depends on; SQLite embeds it, PostgreSQL scales it out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import orjson

from gateway.journal.records import (
    IdempotencyClaim,
    IdempotentAnswer,
    OutboxLine,
    PaymentRecord,
    StoredResponse,
)
from domain.outcome import PaymentStatus

UNRESOLVED_STATUSES = (PaymentStatus.RECEIVED.value, PaymentStatus.ATTEMPTING.value, PaymentStatus.PENDING.value)


class StoreOverloaded(Exception):
    """The journal cannot take more work now: shed load rather than queue without bound."""


def payment_row(record: PaymentRecord) -> tuple[str, str, float, float, bytes]:
    """The columns every backend stores: id, status and times for the indexes, the (redacted) document."""
    return (record.id, record.status.value, record.created_at, record.updated_at, orjson.dumps(record.to_doc()))


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def save_payment(self, record: PaymentRecord, answer: IdempotentAnswer | None = None,
                           outbox: OutboxLine | None = None) -> None:
        """Durable on return: callers rely on the row being on disk before a provider call.
        With `answer`, the key's stored answer is written in the same transaction, so a
        replay can never disagree with the journal. With `outbox`, the transaction's log line
        is stored in the outbox in that same transaction (a `log_id` already in the outbox is
        an error), so a crash before the line reaches the log file cannot lose it."""
        ...

    async def get_payment(self, payment_id: str) -> PaymentRecord | None: ...

    async def unresolved_payments(self, limit: int = 500) -> list[PaymentRecord]:
        """Payments the reconciler owns: received, attempting or pending."""
        ...

    async def claim_idempotency(
        self, scope: str, key: str, fingerprint: str, resource_id: str, now: float, expires_at: float,
        record: PaymentRecord | None = None,
    ) -> IdempotencyClaim:
        """Atomically: insert an in-flight record (and `record`, so a crash right after the claim
        leaves a payment the reconciler owns), or report what the key already holds."""
        ...

    async def complete_idempotency(self, scope: str, key: str, response: StoredResponse) -> None: ...

    async def release_idempotency(self, scope: str, key: str) -> None:
        """Forget an in-flight key whose request changed nothing, so the caller may retry it."""
        ...

    async def complete_idempotency_for(self, resource_id: str, response: StoredResponse) -> None:
        """The reconciler settled `resource_id`: every key that created it (still in flight after a
        crash, or answered `pending`) now replays the final answer."""
        ...

    async def purge_expired_idempotency(self, now: float) -> int: ...

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
