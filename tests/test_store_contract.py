"""One contract for every journal backend: the SQLite store and the PostgreSQL store must agree.

Real databases only: SQLite in a temporary file, PostgreSQL at GATEWAY_TEST_PG_DSN (default
postgresql://gateway:gateway@127.0.0.1:5432/gateway_test; `.ci/run` starts it). Each PostgreSQL
test gets a fresh schema, dropped afterwards. When PostgreSQL is down these tests fail, they
do not skip.

Atomicity is shown with the databases' own triggers: a trigger that refuses one payment write
makes the statement fail for real, and the test checks that nothing of it was committed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from gateway.journal.postgres import PostgresStore
from gateway.journal.records import (
    Attempt,
    ClaimKind,
    IdempotencyClaim,
    IdempotentAnswer,
    PaymentRecord,
    StoredResponse,
)
from gateway.journal.sqlite import SqliteStore
from domain.outcome import PaymentStatus

PG_DSN = os.environ.get("GATEWAY_TEST_PG_DSN", "postgresql://gateway:gateway@127.0.0.1:5432/gateway_test")
SCOPE = "checkout"
FP = "f" * 64
OTHER_FP = "e" * 64
HOUR = 3600.0


def dsn_with_search_path(dsn: str, schema: str) -> str:
    """asyncpg passes unknown DSN query parameters to the server as settings."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"] + [("search_path", schema)]
    return urlunsplit(parts._replace(query=urlencode(query)))


@asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    """A DSN whose tables live in a schema of their own, dropped afterwards."""
    schema = f"gw_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield dsn_with_search_path(PG_DSN, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with pg_schema() as dsn:
        yield dsn


@dataclass
class Backend:
    kind: str
    store: SqliteStore | PostgresStore
    new_store: Callable[[], SqliteStore | PostgresStore]  # another store on the same database (a replica)
    execute: Callable[[str], Awaitable[None]]  # DDL through a separate connection
    stored: Callable[[], Awaitable[bytes]]  # every byte the database holds for the journal, as it is now


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        async with _opened(sqlite_backend(tmp_path / "journal.db")) as opened:
            yield opened
    else:
        async with pg_schema() as dsn, _opened(postgres_backend(dsn)) as opened:
            yield opened


def sqlite_backend(path: Path) -> Backend:
    async def execute(sql: str) -> None:
        def run() -> None:
            conn = sqlite3.connect(path)
            try:
                conn.executescript(sql)
            finally:
                conn.close()

        await asyncio.to_thread(run)

    async def stored() -> bytes:
        """The database file and its write-ahead log, byte for byte."""
        files = (path, path.with_name(path.name + "-wal"))
        return b"".join([await asyncio.to_thread(p.read_bytes) for p in files if p.exists()])

    return Backend("sqlite", SqliteStore(path), lambda: SqliteStore(path), execute, stored)


def postgres_backend(dsn: str) -> Backend:
    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def new_store() -> PostgresStore:
        return PostgresStore(dsn, min_size=1, max_size=5)

    async def stored() -> bytes:
        """Every column of every journal table (the server's own files are out of reach)."""
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            out = []
            for table in ("payments", "idempotency", "outbox"):
                for row in await conn.fetch(f"SELECT * FROM {table}"):
                    out += [v if isinstance(v, bytes) else str(v).encode() for v in row.values()]
            return b"\n".join(out)
        finally:
            await conn.close()

    return Backend("postgres", new_store(), new_store, execute, stored)


@asynccontextmanager
async def _opened(backend: Backend) -> AsyncIterator[Backend]:
    await backend.store.open()
    try:
        yield backend
    finally:
        await backend.store.close()


def payment(payment_id: str | None = None, status: PaymentStatus = PaymentStatus.RECEIVED,
            updated_at: float | None = None, **extra: object) -> PaymentRecord:
    now = time.time()
    return PaymentRecord(id=payment_id or f"pay_{uuid.uuid4().hex}", client=SCOPE, amount=1299, currency="EUR",
                         capture=True, merchant_reference="order-1", status=status, created_at=now,
                         updated_at=updated_at if updated_at is not None else now, **extra)  # type: ignore[arg-type]


def key() -> str:
    return f"key-{uuid.uuid4()}"


async def claim(store: SqliteStore | PostgresStore, k: str, fp: str = FP, resource: str = "pay_x",
                now: float | None = None, ttl: float = HOUR, record: PaymentRecord | None = None,
                scope: str = SCOPE) -> IdempotencyClaim:
    now = time.time() if now is None else now
    return await store.claim_idempotency(scope, k, fp, resource, now, now + ttl, record)


REFUSE_APPROVED_BOOM = {
    "sqlite": """
        CREATE TRIGGER refuse_boom_insert BEFORE INSERT ON payments
        WHEN NEW.id = 'pay_boom' AND NEW.status = 'approved' BEGIN SELECT RAISE(ABORT, 'refused by test'); END;
        CREATE TRIGGER refuse_boom_update BEFORE UPDATE ON payments
        WHEN NEW.id = 'pay_boom' AND NEW.status = 'approved' BEGIN SELECT RAISE(ABORT, 'refused by test'); END;
    """,
    "postgres": """
        CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'refused by test'; END $$;
        CREATE TRIGGER refuse_boom BEFORE INSERT OR UPDATE ON payments FOR EACH ROW
            WHEN (NEW.id = 'pay_boom' AND NEW.status = 'approved') EXECUTE FUNCTION refuse_boom();
    """,
}
DB_ERRORS = (sqlite3.Error, asyncpg.PostgresError)


# -- payments ---------------------------------------------------------------------------------------


async def test_payment_round_trips_with_attempts_and_odd_text(backend: Backend) -> None:
    record = payment(metadata={"note": "a\x00b é ✓"}, card_last4="4242",
                     attempts=[Attempt(provider="stripe", try_number=1, operation="authorize",
                                       idempotency_key="k1", started_at=time.time(), outcome="approved",
                                       http_status=200, latency_ms=12.5)])
    record.merchant_reference = "order\x00with-nul"

    await backend.store.save_payment(record)

    got = await backend.store.get_payment(record.id)
    assert got is not None and got.to_doc() == record.to_doc()
    assert await backend.store.get_payment("pay_missing") is None


async def test_save_payment_upserts(backend: Backend) -> None:
    record = payment()
    await backend.store.save_payment(record)
    record.status = PaymentStatus.APPROVED
    record.provider = "stripe"
    record.updated_at += 1

    await backend.store.save_payment(record)

    got = await backend.store.get_payment(record.id)
    assert got is not None and got.status is PaymentStatus.APPROVED and got.provider == "stripe"


async def test_unresolved_payments_are_received_attempting_pending_oldest_first(backend: Backend) -> None:
    base = time.time() - 100
    records = {status: payment(status=status, updated_at=base + i) for i, status in enumerate([
        PaymentStatus.PENDING, PaymentStatus.APPROVED, PaymentStatus.RECEIVED, PaymentStatus.DECLINED,
        PaymentStatus.ATTEMPTING, PaymentStatus.FAILED])}
    for record in reversed(records.values()):
        await backend.store.save_payment(record)

    unresolved = await backend.store.unresolved_payments()
    first_two = await backend.store.unresolved_payments(limit=2)

    assert [r.status for r in unresolved] == [PaymentStatus.PENDING, PaymentStatus.RECEIVED, PaymentStatus.ATTEMPTING]
    assert [r.id for r in unresolved] == [records[s].id for s in
                                         (PaymentStatus.PENDING, PaymentStatus.RECEIVED, PaymentStatus.ATTEMPTING)]
    assert [r.id for r in first_two] == [r.id for r in unresolved[:2]]


# -- nothing secret at rest (DESIGN rule 6) ---------------------------------------------------------

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
# A provider reference whose 12 digits pass Luhn: an identifier, which must stay verbatim.
LUHN_REFERENCE = "EMUA424242424242"


async def test_card_data_that_reaches_a_record_is_not_at_rest(backend: Backend) -> None:
    """Whatever way a card number gets into a record or an answer (a provider's message, a caller
    that skipped the API), the store's codecs redact it; identifiers stay as they were."""
    record = payment(error_message=f"issuer said {MASTERCARD[:8]} {MASTERCARD[8:]}",
                     metadata={"note": f"pan {VISA[:4]}.{VISA[4:8]}.{VISA[8:12]}.{VISA[12:]}", "card_cvc": "917",
                               MASTERCARD: "key"},
                     provider="adyen", provider_reference=LUHN_REFERENCE,
                     attempts=[Attempt(provider="adyen", try_number=1, operation="authorize", idempotency_key="k1",
                                       started_at=time.time(), reference=LUHN_REFERENCE,
                                       message=f"refused {VISA} cvc=917")])
    record.merchant_reference = f"order {VISA}"
    k, other = key(), key()
    await claim(backend.store, k, resource=record.id, record=record)
    answer = StoredResponse(201, orjson.dumps({"id": record.id, "provider_reference": LUHN_REFERENCE,
                                               "merchant_reference": record.merchant_reference, "note": "CVV: 917"}))
    await backend.store.save_payment(record, IdempotentAnswer(SCOPE, k, answer))
    await claim(backend.store, other, resource=record.id)
    await backend.store.complete_idempotency(SCOPE, other, StoredResponse(422, f"refused {MASTERCARD}".encode()))

    raw = await backend.stored()
    for secret in (VISA, MASTERCARD, "cvc=917", "CVV: 917", '"917"'):
        assert secret.encode() not in raw, secret
    got = await backend.store.get_payment(record.id)
    assert got is not None
    assert (got.provider_reference, got.attempts[0].reference) == (LUHN_REFERENCE, LUHN_REFERENCE)
    assert got.merchant_reference == "order 424242******4242" and got.metadata["card_cvc"] == "[REDACTED]"
    replay = await claim(backend.store, k, resource=record.id)
    assert replay.response is not None and orjson.loads(replay.response.body)["provider_reference"] == LUHN_REFERENCE


# -- claims -----------------------------------------------------------------------------------------


async def test_claim_new_journals_the_record_in_the_same_transaction(backend: Backend) -> None:
    record = payment()

    result = await claim(backend.store, key(), resource=record.id, record=record)

    assert result == IdempotencyClaim(ClaimKind.NEW, record.id)
    got = await backend.store.get_payment(record.id)
    assert got is not None and got.to_doc() == record.to_doc()
    assert [r.id for r in await backend.store.unresolved_payments()] == [record.id]


async def test_claim_of_held_key_is_in_flight_mismatch_or_replay_and_journals_nothing(backend: Backend) -> None:
    k = key()
    first = payment()
    assert (await claim(backend.store, k, resource=first.id, record=first)).kind is ClaimKind.NEW
    copy, other = payment(), payment()

    in_flight = await claim(backend.store, k, resource=copy.id, record=copy)
    mismatch = await claim(backend.store, k, fp=OTHER_FP, resource=other.id, record=other)
    answer = StoredResponse(201, b'{"id": "%s", "status": "approved"}' % first.id.encode())
    await backend.store.complete_idempotency(SCOPE, k, answer)
    replay = await claim(backend.store, k, resource=copy.id, record=copy)
    mismatch_after = await claim(backend.store, k, fp=OTHER_FP, resource=other.id, record=other)

    assert in_flight == IdempotencyClaim(ClaimKind.IN_FLIGHT, first.id)
    assert mismatch == IdempotencyClaim(ClaimKind.MISMATCH, first.id)
    assert replay == IdempotencyClaim(ClaimKind.REPLAY, first.id, answer)
    assert mismatch_after == IdempotencyClaim(ClaimKind.MISMATCH, first.id)
    assert await backend.store.get_payment(copy.id) is None
    assert await backend.store.get_payment(other.id) is None


async def test_keys_are_scoped(backend: Backend) -> None:
    k = key()
    assert (await claim(backend.store, k, scope="a")).kind is ClaimKind.NEW
    assert (await claim(backend.store, k, scope="b", fp=OTHER_FP)).kind is ClaimKind.NEW
    assert (await claim(backend.store, k, scope="a")).kind is ClaimKind.IN_FLIGHT


async def test_expired_record_is_replaced_by_a_new_claim(backend: Backend) -> None:
    now = time.time()
    done_key, stuck_key = key(), key()
    assert (await claim(backend.store, done_key, resource="pay_old", now=now, ttl=10)).kind is ClaimKind.NEW
    await backend.store.complete_idempotency(SCOPE, done_key, StoredResponse(201, b"old"))
    assert (await claim(backend.store, stuck_key, resource="pay_stuck", now=now, ttl=10)).kind is ClaimKind.NEW
    later = now + 11
    fresh = payment()

    replaced = await claim(backend.store, done_key, fp=OTHER_FP, resource=fresh.id, now=later, record=fresh)
    replaced_stuck = await claim(backend.store, stuck_key, fp=OTHER_FP, resource="pay_new", now=later)

    assert replaced == IdempotencyClaim(ClaimKind.NEW, fresh.id)
    assert replaced_stuck == IdempotencyClaim(ClaimKind.NEW, "pay_new")
    assert await backend.store.get_payment(fresh.id) is not None
    # the replacement is a fresh in-flight record: no trace of the old answer or fingerprint
    assert await claim(backend.store, done_key, fp=OTHER_FP, now=later + 1) == IdempotencyClaim(
        ClaimKind.IN_FLIGHT, fresh.id)
    assert (await claim(backend.store, done_key, fp=FP, now=later + 1)).kind is ClaimKind.MISMATCH


async def test_record_is_not_journalled_when_its_claim_fails_and_vice_versa(backend: Backend) -> None:
    await backend.execute(REFUSE_APPROVED_BOOM[backend.kind])
    k = key()
    refused = payment("pay_boom", status=PaymentStatus.APPROVED)

    with pytest.raises(DB_ERRORS):
        await claim(backend.store, k, resource=refused.id, record=refused)

    assert await backend.store.get_payment("pay_boom") is None
    # the key was not left claimed: the caller's retry owns it
    assert (await claim(backend.store, k, resource="pay_ok", record=payment("pay_ok"))).kind is ClaimKind.NEW


async def test_save_with_answer_is_atomic(backend: Backend) -> None:
    await backend.execute(REFUSE_APPROVED_BOOM[backend.kind])
    k = key()
    record = payment("pay_boom")
    assert (await claim(backend.store, k, resource=record.id, record=record)).kind is ClaimKind.NEW
    record.status = PaymentStatus.APPROVED
    answer = IdempotentAnswer(SCOPE, k, StoredResponse(201, b'{"status": "approved"}'))

    with pytest.raises(DB_ERRORS):
        await backend.store.save_payment(record, answer)

    # neither half was written: the journal still says received, the key is still in flight
    got = await backend.store.get_payment("pay_boom")
    assert got is not None and got.status is PaymentStatus.RECEIVED
    assert (await claim(backend.store, k, resource=record.id)).kind is ClaimKind.IN_FLIGHT

    ok = payment()
    k2 = key()
    await claim(backend.store, k2, resource=ok.id, record=ok)
    ok.status = PaymentStatus.APPROVED
    await backend.store.save_payment(ok, IdempotentAnswer(SCOPE, k2, StoredResponse(201, b"approved")))
    got_ok = await backend.store.get_payment(ok.id)
    assert got_ok is not None and got_ok.status is PaymentStatus.APPROVED
    assert await claim(backend.store, k2, resource=ok.id) == IdempotencyClaim(
        ClaimKind.REPLAY, ok.id, StoredResponse(201, b"approved"))


async def test_release_forgets_only_an_in_flight_key(backend: Backend) -> None:
    k, done = key(), key()
    await claim(backend.store, k, resource="pay_a")
    await claim(backend.store, done, resource="pay_b")
    await backend.store.complete_idempotency(SCOPE, done, StoredResponse(200, b"done"))

    await backend.store.release_idempotency(SCOPE, k)
    await backend.store.release_idempotency(SCOPE, done)

    assert await claim(backend.store, k, fp=OTHER_FP, resource="pay_c") == IdempotencyClaim(ClaimKind.NEW, "pay_c")
    assert await claim(backend.store, done, resource="pay_b") == IdempotencyClaim(
        ClaimKind.REPLAY, "pay_b", StoredResponse(200, b"done"))


async def test_complete_idempotency_for_settles_every_key_of_the_resource(backend: Backend) -> None:
    crashed, pending, unrelated = key(), key(), key()
    await claim(backend.store, crashed, resource="pay_r")
    await claim(backend.store, pending, resource="pay_r", scope="other")
    await backend.store.complete_idempotency("other", pending, StoredResponse(202, b"pending"))
    await claim(backend.store, unrelated, resource="pay_s")
    final = StoredResponse(201, b"approved")

    await backend.store.complete_idempotency_for("pay_r", final)

    assert await claim(backend.store, crashed, resource="x") == IdempotencyClaim(ClaimKind.REPLAY, "pay_r", final)
    assert await claim(backend.store, pending, resource="x", scope="other") == IdempotencyClaim(
        ClaimKind.REPLAY, "pay_r", final)
    assert (await claim(backend.store, unrelated, resource="x")).kind is ClaimKind.IN_FLIGHT


async def test_purge_removes_only_expired_answered_keys(backend: Backend) -> None:
    now = time.time()
    expired_done, live_done, expired_in_flight = key(), key(), key()
    for k, ttl in ((expired_done, 10), (live_done, HOUR), (expired_in_flight, 10)):
        await claim(backend.store, k, resource=f"pay_{k}", now=now, ttl=ttl)
    for k in (expired_done, live_done):
        await backend.store.complete_idempotency(SCOPE, k, StoredResponse(201, b"x"))

    purged = await backend.store.purge_expired_idempotency(now + 11)
    again = await backend.store.purge_expired_idempotency(now + 11)

    assert (purged, again) == (1, 0)
    assert (await claim(backend.store, live_done, resource="y", now=now + 11)).kind is ClaimKind.REPLAY
    # the expired in-flight key was kept (its payment may still be settling) but may be re-claimed
    assert (await claim(backend.store, expired_in_flight, resource="z", now=now + 11)).kind is ClaimKind.NEW
    assert (await claim(backend.store, expired_done, resource="w", now=now + 11)).kind is ClaimKind.NEW


async def test_concurrent_claims_from_two_replicas_have_one_winner(backend: Backend) -> None:
    replica = backend.new_store()
    await replica.open()
    try:
        k = key()
        records = [payment() for _ in range(20)]
        results = await asyncio.gather(*(
            claim(backend.store if i % 2 else replica, k, resource=r.id, record=r) for i, r in enumerate(records)))
    finally:
        await replica.close()

    winners = [r for r in results if r.kind is ClaimKind.NEW]
    assert len(winners) == 1
    assert all(r == IdempotencyClaim(ClaimKind.IN_FLIGHT, winners[0].resource_id) for r in results if r not in winners)
    journalled = [r.id for r in records if await backend.store.get_payment(r.id) is not None]
    assert journalled == [winners[0].resource_id]


async def test_store_survives_reopen(backend: Backend) -> None:
    record = payment()
    k = key()
    await claim(backend.store, k, resource=record.id, record=record)
    await backend.store.close()
    await backend.store.open()  # schema creation is idempotent; the rows are durable

    assert (await backend.store.get_payment(record.id)) is not None
    assert (await claim(backend.store, k, resource=record.id)).kind is ClaimKind.IN_FLIGHT
