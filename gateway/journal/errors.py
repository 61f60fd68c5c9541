"""What a journal store can fail with, as types a caller can act on: `StaleWrite` (re-read and
decide again), `JournalUnavailable` (503, retry), `StoreOverloaded` (shed load),
`SchemaMismatch` (refuse to start), `StoreUnavailable` (the store cannot open: one line).

Their own module, below both the store interface and the schema migrations, which both raise
them."""

from __future__ import annotations


class StoreOverloaded(Exception):
    """The journal cannot take more work now: shed load rather than queue without bound."""


class StaleWrite(Exception):
    """The payment row changed since this record was read (another request, replica or the
    reconciler wrote it): nothing was written. Re-read the payment and decide again."""

    def __init__(self, payment_id: str) -> None:
        super().__init__(f"payment {payment_id} was changed by another writer since it was read")
        self.payment_id = payment_id


class JournalUnavailable(Exception):
    """The journal cannot be reached or written right now (database down, restarting or read-only,
    no pool connection free, a command timed out). Retryable: the API answers 503. A write that
    failed this way may or may not have committed; the row's version tells a later reader."""


class SchemaMismatch(Exception):
    """The database's schema version is not the one this code was built for (older, and not to be
    migrated here; or newer). The message is one line saying what to do."""


class StoreUnavailable(Exception):
    """`Store.open` failed: ``problem`` says why in one line, naming the component at fault when
    it is not the database file itself."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem
