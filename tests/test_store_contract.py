"""One contract for every journal backend: the SQLite store and the PostgreSQL store must agree.

Real databases only (the `backend` fixture of conftest.py): SQLite in a temporary file,
PostgreSQL at GATEWAY_TEST_PG_DSN (default postgresql://gateway:gateway@127.0.0.1:5432/gateway_test;
`.ci/run` starts it). Each PostgreSQL test gets a fresh schema, dropped afterwards. When PostgreSQL is down these tests fail, they
do not skip.

Atomicity is shown with the databases' own triggers: a trigger that refuses one payment write
makes the statement fail for real, and the test checks that nothing of it was committed.

The fleet contract (one writer per payment, one owner per background job) is shown here with
two stores on one database in one process; tests/test_store_processes.py shows it again with
real processes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path

import orjson
import pytest

from gateway.journal.postgres import PostgresStore
from gateway.journal.records import (
    Attempt,
    ClaimKind,
    IdempotencyClaim,
    IdempotentAnswer,
    OutboxLine,
    PaymentRecord,
    PendingFollowUp,
    StoredResponse,
)
from gateway.journal.store import payment_from_row
from gateway.journal.sqlite import SqliteStore
from gateway.journal.errors import StaleWrite
from domain.outcome import PaymentStatus
from tests.conftest import DB_ERRORS, REFUSE_APPROVED_BOOM, STORE_SCOPE, Backend, payment

SCOPE = STORE_SCOPE
FP = "f" * 64
OTHER_FP = "e" * 64
HOUR = 3600.0


def key() -> str:
    return f"key-{uuid.uuid4()}"


async def claim(store: SqliteStore | PostgresStore, k: str, fp: str = FP, resource: str = "pay_x",
                now: float | None = None, ttl: float = HOUR, record: PaymentRecord | None = None,
                scope: str = SCOPE) -> IdempotencyClaim:
    now = time.time() if now is None else now
    return await store.claim_idempotency(scope, k, fp, resource, now, now + ttl, record)




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


async def test_purge_deletes_at_most_its_limit_per_call(backend: Backend) -> None:
    now = time.time()
    older, old, live = key(), key(), key()
    for k, ttl in ((older, 5), (old, 10), (live, HOUR)):
        await claim(backend.store, k, resource=f"pay_{k}", now=now, ttl=ttl)
        await backend.store.complete_idempotency(SCOPE, k, StoredResponse(201, b"x"))

    counts = [await backend.store.purge_expired_idempotency(now + 11, limit=1) for _ in range(3)]

    assert counts == [1, 1, 0]
    assert (await claim(backend.store, live, resource="y", now=now + 11)).kind is ClaimKind.REPLAY
    assert (await claim(backend.store, older, resource="w", now=now + 11)).kind is ClaimKind.NEW


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


# -- conditional updates: one writer per payment ----------------------------------------------------


async def test_first_write_is_version_1_and_each_write_bumps_it(backend: Backend) -> None:
    record = payment()
    await backend.store.save_payment(record)
    assert record.version == 1
    record.status = PaymentStatus.APPROVED
    await backend.store.save_payment(record)

    got = await backend.store.get_payment(record.id)
    assert record.version == 2
    assert got is not None and got.version == 2 and got.status is PaymentStatus.APPROVED
    assert [r.version for r in await backend.store.unresolved_payments()] == []


async def test_two_readers_both_write_the_second_is_stale_and_the_row_keeps_the_first(backend: Backend) -> None:
    replica = backend.new_store()
    await replica.open()
    try:
        record = payment()
        await backend.store.save_payment(record)
        mine, theirs = await backend.store.get_payment(record.id), await replica.get_payment(record.id)
        assert mine is not None and theirs is not None and mine.version == theirs.version == 1

        mine.status, mine.provider = PaymentStatus.APPROVED, "stripe"
        await backend.store.save_payment(mine)
        theirs.status, theirs.error_code = PaymentStatus.FAILED, "interrupted_before_provider_call"
        with pytest.raises(StaleWrite) as stale:
            await replica.save_payment(theirs)
    finally:
        await replica.close()

    assert stale.value.payment_id == record.id
    assert theirs.version == 1  # still what it read: the caller re-reads and decides again
    got = await backend.store.get_payment(record.id)
    assert got is not None and (got.status, got.provider, got.error_code, got.version) == (
        PaymentStatus.APPROVED, "stripe", None, 2)


async def test_concurrent_writers_of_one_read_have_exactly_one_winner(backend: Backend) -> None:
    replica = backend.new_store()
    await replica.open()
    try:
        record = payment()
        await backend.store.save_payment(record)
        readers = [await (backend.store if i % 2 else replica).get_payment(record.id) for i in range(10)]
        for i, r in enumerate(readers):
            assert r is not None
            r.merchant_reference = f"writer-{i}"
        results = await asyncio.gather(*((backend.store if i % 2 else replica).save_payment(r)
                                         for i, r in enumerate(readers)), return_exceptions=True)
    finally:
        await replica.close()

    winners = [i for i, result in enumerate(results) if result is None]
    assert len(winners) == 1 and all(isinstance(r, StaleWrite) for r in results if r is not None)
    got = await backend.store.get_payment(record.id)
    assert got is not None and got.merchant_reference == f"writer-{winners[0]}" and got.version == 2


async def test_a_stale_write_writes_neither_the_answer_nor_the_outbox_line(backend: Backend) -> None:
    k = key()
    record = payment()
    assert (await claim(backend.store, k, resource=record.id, record=record)).kind is ClaimKind.NEW
    assert record.version == 1  # the claim is the payment's first write
    stale = await backend.store.get_payment(record.id)
    assert stale is not None
    record.status = PaymentStatus.ATTEMPTING
    await backend.store.save_payment(record)
    stale.status = PaymentStatus.APPROVED
    line = OutboxLine("log-stale", b'{"payment": "stale"}\n', owner="me")

    with pytest.raises(StaleWrite):
        await backend.store.save_payment(stale, IdempotentAnswer(SCOPE, k, StoredResponse(201, b"approved")), line)

    got = await backend.store.get_payment(record.id)
    assert got is not None and got.status is PaymentStatus.ATTEMPTING
    assert (await claim(backend.store, k, resource=record.id)).kind is ClaimKind.IN_FLIGHT
    assert await backend.store.claim_outbox("me", own_before=float("inf"), any_before=float("inf"),
                                            now=float("inf"), lease_until=time.time() + 60) == []
    # the same write from a fresh read goes through, all three parts of it
    fresh = await backend.store.get_payment(record.id)
    assert fresh is not None
    fresh.status = PaymentStatus.APPROVED
    await backend.store.save_payment(fresh, IdempotentAnswer(SCOPE, k, StoredResponse(201, b"approved")), line)
    assert (await claim(backend.store, k, resource=record.id)).kind is ClaimKind.REPLAY
    assert [x.log_id for x in await backend.store.claim_outbox(
        "me", own_before=float("inf"), any_before=float("inf"), now=float("inf"),
        lease_until=time.time() + 60)] == ["log-stale"]


async def test_a_new_record_for_a_journalled_id_is_stale_and_claims_nothing(backend: Backend) -> None:
    original = payment("pay_taken")
    await backend.store.save_payment(original)
    twin = payment("pay_taken", country="NL")
    k = key()

    with pytest.raises(StaleWrite):
        await backend.store.save_payment(twin)
    with pytest.raises(StaleWrite):
        await claim(backend.store, k, resource=twin.id, record=twin)

    assert twin.version == 0
    got = await backend.store.get_payment("pay_taken")
    assert got is not None and got.country is None and got.version == 1
    # the failed claim left the key free
    assert (await claim(backend.store, k, resource="pay_other")).kind is ClaimKind.NEW


async def test_a_claim_that_finds_the_key_held_leaves_the_record_new(backend: Backend) -> None:
    k = key()
    assert (await claim(backend.store, k, resource="pay_first")).kind is ClaimKind.NEW
    copy = payment()

    assert (await claim(backend.store, k, resource=copy.id, record=copy)).kind is ClaimKind.IN_FLIGHT
    assert copy.version == 0


async def test_sqlite_stale_write_fails_only_its_own_operation_in_a_group_commit(tmp_path: Path) -> None:
    """Ops queued while the writer waits for the file's write lock run as one batch, one
    transaction: the stale one is rolled back to its savepoint, its neighbours commit."""
    path = tmp_path / "journal.db"
    store = SqliteStore(path)
    await store.open()
    try:
        record, other = payment(), payment()
        await store.save_payment(record)
        first, second = await store.get_payment(record.id), await store.get_payment(record.id)
        assert first is not None and second is not None
        first.status, second.status = PaymentStatus.APPROVED, PaymentStatus.DECLINED

        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        batches = store.batches
        parked = asyncio.ensure_future(store.ping())  # the writer takes it, then waits for the lock
        await asyncio.sleep(0.05)
        results = asyncio.gather(store.save_payment(first), store.save_payment(second), store.save_payment(other),
                                 return_exceptions=True)
        await asyncio.sleep(0.05)
        blocker.execute("COMMIT")
        blocker.close()
        await parked
        outcome = await results
    finally:
        await store.close()

    assert store.batches == batches + 2, "the three writes were one batch"
    assert outcome[0] is None and isinstance(outcome[1], StaleWrite) and outcome[2] is None
    await store.open()
    try:
        got, got_other = await store.get_payment(record.id), await store.get_payment(other.id)
    finally:
        await store.close()
    assert got is not None and got.status is PaymentStatus.APPROVED and got.version == 2
    assert got_other is not None and got_other.version == 1


# -- follow-up claims: the caller's key and the payment's pending row in one conditional write ---------


async def test_a_follow_up_claim_moves_the_row_on_once_across_replicas(backend: Backend) -> None:
    """Two replicas read the same approved payment and each claims a follow-up (its own key)
    with the row moved to `refund_pending`: one wins; the other's claim raises StaleWrite and
    leaves neither its key nor the row written."""
    record = payment(status=PaymentStatus.APPROVED)
    await backend.store.save_payment(record)
    replica = backend.new_store()
    await replica.open()
    try:
        mine, theirs = await backend.store.get_payment(record.id), await replica.get_payment(record.id)
        assert mine is not None and theirs is not None
        mine.status = theirs.status = PaymentStatus.REFUND_PENDING
        assert (await claim(backend.store, "refund-a", resource="refund-a", record=mine)).kind is ClaimKind.NEW
        with pytest.raises(StaleWrite):
            await claim(replica, "refund-b", resource="refund-b", record=theirs)
        assert theirs.version == 1  # what it read: nothing of it was written
        assert (await claim(replica, "refund-b", resource="refund-b")).kind is ClaimKind.NEW  # the key stayed free
    finally:
        await replica.close()
    got = await backend.store.get_payment(record.id)
    assert got is not None and got.status is PaymentStatus.REFUND_PENDING and got.version == 2


# -- leases on unresolved payments -----------------------------------------------------------------------


async def test_replicas_leasing_together_split_the_unresolved_rows(backend: Backend) -> None:
    base = time.time() - 100
    rows = [payment(status=PaymentStatus.PENDING, updated_at=base + i) for i in range(30)]
    for record in rows:
        await backend.store.save_payment(record)
    await backend.store.save_payment(payment(status=PaymentStatus.APPROVED))
    replicas = [backend.new_store() for _ in range(2)]
    for replica in replicas:
        await replica.open()
    try:
        leased = await asyncio.gather(*(store.lease_unresolved(f"replica-{i}", 60, limit=20)
                                        for i, store in enumerate([backend.store, *replicas])))
        again = await backend.store.lease_unresolved("replica-0", 60)
        others = await replicas[0].lease_unresolved("replica-1", 60)
    finally:
        for replica in replicas:
            await replica.close()

    ids = [[r.id for r in batch] for batch in leased]
    assert sorted(sum(ids, [])) == sorted(r.id for r in rows), "every row leased exactly once"
    for batch in leased:
        assert [r.updated_at for r in batch] == sorted(r.updated_at for r in batch)
    assert [r.id for r in again] == ids[0], "the owner renews its own rows"
    assert [r.id for r in others] == ids[1]


async def test_a_dead_replicas_lease_expires_and_a_lease_is_not_a_write(backend: Backend) -> None:
    record = payment(status=PaymentStatus.PENDING)
    await backend.store.save_payment(record)
    [leased] = await backend.store.lease_unresolved("dead-replica", 0.2)
    assert await backend.store.lease_unresolved("live-replica", 60) == []

    await asyncio.sleep(0.3)
    [taken] = await backend.store.lease_unresolved("live-replica", 60)

    assert taken.id == record.id and taken.version == leased.version == 1
    # the lease did not move the version: the request that still holds the record may write it
    record.status = PaymentStatus.APPROVED
    await backend.store.save_payment(record)
    assert await backend.store.lease_unresolved("live-replica", 60) == []  # settled: nothing to lease
    taken.status = PaymentStatus.FAILED
    with pytest.raises(StaleWrite):  # and the lease holder's write from its old read is stale
        await backend.store.save_payment(taken)


async def test_challenges_set_aside_until_due_never_fill_a_lease_batch(backend: Backend) -> None:
    """At a peak, thousands of shoppers sit in 3-D Secure challenges: the reconciler sets each
    aside until its action expires, so a batch of them cannot starve the pending payment behind
    them; a write of a set-aside row (an interrupted completion, a webhook) releases it at once."""
    now = time.time()
    waiting = [payment(status=PaymentStatus.ACTION_REQUIRED, updated_at=now - 60 + i,
                       action_expires_at=now + 900) for i in range(3)]
    soon = payment(status=PaymentStatus.ACTION_REQUIRED, updated_at=now - 50, action_expires_at=now + 0.3)
    pending = payment(status=PaymentStatus.PENDING, updated_at=now - 10)
    for record in (*waiting, soon, pending):
        await backend.store.save_payment(record)
    leased = await backend.store.lease_unresolved("replica-a", 60, limit=4)
    assert [r.id for r in leased] == [r.id for r in (*waiting, soon)], "the challenges fill the batch"

    await backend.store.set_aside([(r.id, r.version, r.action_expires_at) for r in leased])
    assert [r.id for r in await backend.store.lease_unresolved("replica-a", 60, limit=4)] == [pending.id]
    assert [r.id for r in await backend.store.lease_unresolved("replica-b", 60, limit=4)] == []

    first = waiting[0]
    first.updated_at = time.time()
    await backend.store.save_payment(first)  # an interrupted completion writes the row
    assert [r.id for r in await backend.store.lease_unresolved("replica-a", 60, limit=4)] == [pending.id, first.id]

    await asyncio.sleep(max(0.0, soon.action_expires_at - time.time()) + 0.05)  # the shopper's time runs out
    again = await backend.store.lease_unresolved("replica-a", 60, limit=4)
    assert soon.id in {r.id for r in again} and waiting[1].id not in {r.id for r in again}

    # Set aside from an old read: the row moved on since (version 2), so it stays in the batch.
    await backend.store.set_aside([(first.id, 1, now + 900)])
    assert first.id in {r.id for r in await backend.store.lease_unresolved("replica-a", 60, limit=4)}


async def test_fields_a_newer_release_wrote_are_kept_through_a_read_and_a_write(backend: Backend) -> None:
    """A rolling upgrade: the new release writes a payment with fields this one does not know
    (in the payment, an attempt, the pending follow-up); this release reads the row, works on
    it, and writes it back with those fields as they were, instead of failing on the row."""
    record = payment(status=PaymentStatus.CAPTURE_PENDING)
    doc = record.to_doc()
    doc["routing_score"] = 0.93
    doc["attempts"] = [{**Attempt("stripe", 1, "authorize", "k1", time.time()).to_doc(), "acquirer_region": "eu"}]
    doc["follow_up"] = {**PendingFollowUp("capture", 1299, "k2", STORE_SCOPE, "front", "approved", time.time(),
                                          8.0).to_doc(), "partial_sequence": 2}
    newer = payment_from_row(0, orjson.dumps(doc))  # not journalled yet: the first write
    assert newer.newer_fields == {"routing_score": 0.93}
    await backend.store.save_payment(newer)

    read = await backend.store.get_payment(record.id)
    assert read is not None and read.follow_up is not None
    read.status = PaymentStatus.CAPTURED  # this release's own write of the row
    read.follow_up = None
    read.captured_amount = 1299
    await backend.store.save_payment(read)

    stored = (await backend.store.get_payment(record.id)).to_doc()  # type: ignore[union-attr]
    assert stored["routing_score"] == 0.93 and stored["status"] == "captured"
    assert stored["attempts"][0]["acquirer_region"] == "eu"
    assert "newer_fields" not in stored and "newer_fields" not in stored["attempts"][0]


async def test_a_payment_never_sent_is_discarded_with_its_key_only_at_its_version(backend: Backend) -> None:
    k = key()
    record = payment()
    assert (await claim(backend.store, k, resource=record.id, record=record)).kind is ClaimKind.NEW
    assert not await backend.store.discard_unsent(record.id, record.version + 1, SCOPE, k), "moved on: kept"
    assert await backend.store.get_payment(record.id) is not None
    assert await backend.store.discard_unsent(record.id, record.version, SCOPE, k)
    assert await backend.store.get_payment(record.id) is None
    assert (await claim(backend.store, k, resource="pay_again")).kind is ClaimKind.NEW, "the key is free again"
