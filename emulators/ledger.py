"""Every payment object an emulator created, so tests and drills can count double charges."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class LedgerEntry:
    id: str
    payment_ref: str
    amount: int
    currency: str
    approved: bool
    status: str
    idempotency_key: str | None = None
    decline_code: str | None = None
    captured: int = 0
    refunded: int = 0
    voided: bool = False
    created_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """In-memory store of payment objects; `charges` are the approved ones."""

    def __init__(self, id_prefix: str) -> None:
        self._prefix = id_prefix
        self._seq = itertools.count(1)
        self._entries: dict[str, LedgerEntry] = {}

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._seq):012d}"

    def add(self, entry: LedgerEntry) -> LedgerEntry:
        self._entries[entry.id] = entry
        return entry

    def get(self, entry_id: str) -> LedgerEntry | None:
        return self._entries.get(entry_id)

    def find_by_ref(self, payment_ref: str) -> list[LedgerEntry]:
        return [e for e in self._entries.values() if e.payment_ref == payment_ref]

    def entries(self) -> list[LedgerEntry]:
        return list(self._entries.values())

    def charges(self) -> list[LedgerEntry]:
        return [e for e in self._entries.values() if e.approved]

    def duplicates(self) -> dict[str, int]:
        """Payment references charged more than once."""
        counts = Counter(e.payment_ref for e in self.charges())
        return {ref: n for ref, n in counts.items() if n > 1}

    def clear(self) -> None:
        self._entries.clear()

    def snapshot(self) -> dict[str, Any]:
        charges = self.charges()
        return {
            "entries": [asdict(e) for e in self._entries.values()],
            "charges": len(charges),
            "duplicates": self.duplicates(),
        }
