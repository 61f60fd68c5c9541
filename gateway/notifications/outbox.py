"""From a settlement to the outbox rows committed with it.

`PaymentService.commit(record, kind, settled_from=before)` asks `rows(before, record)` for the
event the transition yields (`events.late_event`) and stores it with the row, the key's answer
and the transaction line in one database transaction (`Store.save_payment(...,
notifications=...)`). The event id is derived from the payment id and the row version the commit
writes, so the same transition can never be stored twice (the id is the table's primary key),
and it is letters only, so no log redaction can mistake it for a card number.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import orjson

from gateway.answers import payment_doc
from gateway.journal.records import PaymentRecord
from gateway.notifications.events import EventType, Settling, late_event
from gateway.notifications.records import Notification

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def event_id(payment_id: str, version: int, event_type: EventType) -> str:
    digest = int.from_bytes(hashlib.sha256(f"{payment_id}:{version}:{event_type}".encode()).digest()[:16], "big")
    out = []
    for _ in range(24):  # 24 letters: 112 bits
        digest, letter = divmod(digest, 26)
        out.append(_LETTERS[letter])
    return "evt_" + "".join(out)


def event_body(event_id: str, event_type: EventType, record: PaymentRecord, created_at: float) -> bytes:
    """The delivered JSON: the payment exactly as `GET /v1/payments/{id}` returns it once this
    row is stored (the journal's redacted document read back)."""
    stored = PaymentRecord.from_doc(record.to_doc())
    return orjson.dumps({"id": event_id, "type": event_type.value, "created_at": created_at,
                         "payment_id": record.id, "payment": payment_doc(stored)})


class NotificationOutbox:
    """Off (`enabled` false: no `notifications.url`) nothing is stored. `committed` wakes this
    process's sender at once; other processes find the rows on their next poll."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.wake = asyncio.Event()

    def rows(self, before: Settling, after: PaymentRecord) -> tuple[Notification, ...]:
        """The rows to commit with `after` (still at the version the settler read)."""
        if not self.enabled:
            return ()
        kind = late_event(before, after)
        if kind is None:
            return ()
        now = time.time()
        eid = event_id(after.id, after.version, kind)
        return (Notification(eid, kind.value, after.id, now, event_body(eid, kind, after, now)),)

    def committed(self) -> None:
        self.wake.set()
