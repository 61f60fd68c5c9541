"""The reconciler after a crash (DESIGN rule 4): whatever a dead process left `attempting` is
settled on start with a status query at the provider that holds the attempt, and the caller's
idempotency key then replays the final answer.

The crash is simulated for real: the journal rows and the in-flight idempotency records are
written with SqliteStore at the configured path, the charge (where there is one) is made at
the emulator through the gateway's own ProviderClient over mTLS, exactly as the dead gateway
would have; then the gateway starts on that database.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
from typing import Any

from gateway.http.auth import fingerprint_key
from gateway.http.idempotency import fingerprint
from gateway.app_keys import STORE
from gateway.app_keys import RECONCILER
from gateway.config import GatewayConfig
from gateway.journal.records import Attempt, PaymentRecord
from gateway.journal.sqlite import SqliteStore
from gateway.metrics import Metrics
from gateway.orchestrator import provider_idempotency_key
from gateway.provider_client import ProviderClient
from gateway.provider_pool import make_handle
from domain.outcome import Outcome, PaymentStatus
from domain.secret import Secret
from domain.types import Card, Operation, PaymentOrder
from tests.conftest import AUTH, CHECKOUT_KEY, card_payment, charges, entries, journal, txlog

SCOPE = "checkout"  # the API client the payments belonged to


def _body(reference: str) -> bytes:
    return orjson.dumps(card_payment(merchant_reference=reference))


CRASHED_AT = time.time() - 3600  # long past any deadline: no live request can still own these rows


def _crashed_record(payment_id: str, reference: str, provider: str | None) -> PaymentRecord:
    record = PaymentRecord(id=payment_id, client=SCOPE, amount=1299, currency="EUR", capture=True,
                           merchant_reference=reference, status=PaymentStatus.ATTEMPTING, card_brand="visa",
                           card_bin="424242", card_last4="4242", route="default",
                           created_at=CRASHED_AT, updated_at=CRASHED_AT)
    if provider is not None:
        key = provider_idempotency_key(payment_id, provider)
        record.provider, record.provider_idempotency_key = provider, key
        record.attempts.append(Attempt(provider=provider, try_number=1, operation="authorize", idempotency_key=key,
                                       started_at=CRASHED_AT))
    return record


async def _charge_directly(config: GatewayConfig, provider: str, payment_id: str, reference: str) -> str:
    """What the crashed gateway's call did: a real authorisation at the provider, through the
    gateway's own `ProviderClient` on a handle built from the same configuration."""
    client = ProviderClient(make_handle(provider, config.providers[provider], config.engine), Metrics())
    order = PaymentOrder(payment_id=payment_id, amount=1299, currency="EUR", capture=True,
                         merchant_reference=reference, card=Card(Secret("4242424242424242"), 12, 2030, Secret("123")))
    key = provider_idempotency_key(payment_id, provider)
    await client.handle.transport.start()
    try:
        result = await client.call(Operation.AUTHORIZE, order, key, time.monotonic() + 5.0,
                                   client.new_attempt(Operation.AUTHORIZE, 1, key))
    finally:
        await client.handle.transport.close()
    assert result.outcome is Outcome.APPROVED and result.reference
    return result.reference


async def _leave_crash_behind(config: GatewayConfig, records: list[tuple[PaymentRecord, str]]) -> None:
    store = SqliteStore(Path(config.storage.sqlite_path))
    await store.open()
    try:
        for record, key in records:
            await store.save_payment(record)
            now = time.time()
            request = SimpleNamespace(method="POST", path="/v1/payments")
            claim = await store.claim_idempotency(SCOPE, key, _print(request, _body(record.merchant_reference)),
                                                  record.id, now, now + 3600)
            assert claim.kind.value == "new"
    finally:
        await store.close()


def _print(request: Any, body: bytes) -> str:
    """The fingerprint the gateway stores for this request, as the crashed process stored it."""
    return fingerprint(request, body, orjson.loads(body), fingerprint_key(CHECKOUT_KEY)).value


async def _replay(client, key: str, reference: str):  # type: ignore[no-untyped-def]
    return await client.post("/v1/payments", data=_body(reference),
                             headers={**AUTH, "Idempotency-Key": key, "Content-Type": "application/json"})


async def test_reconciler_settles_what_a_crash_left_behind(engine_config, start_gateway, stripes) -> None:
    config = engine_config()
    charged = _crashed_record("pay_crash_charged", "order-charged", "primary")
    uncharged = _crashed_record("pay_crash_uncharged", "order-uncharged", "primary")
    unsent = _crashed_record("pay_crash_unsent", "order-unsent", None)
    reference = await _charge_directly(config, "primary", charged.id, charged.merchant_reference)
    keys = {charged.id: "key-charged", uncharged.id: "key-uncharged", unsent.id: "key-unsent"}
    await _leave_crash_behind(config, [(r, keys[r.id]) for r in (charged, uncharged, unsent)])

    client = await start_gateway(config)  # the reconciler runs once during start-up

    got = await (await client.get(f"/v1/payments/{charged.id}", headers=AUTH)).json()
    assert got["status"] == "approved" and got["provider"] == "primary"
    assert got["provider_reference"] == reference and got["captured_amount"] == 1299
    assert got["attempts"][-1]["operation"] == "status" and got["attempts"][-1]["outcome"] == "approved"
    got = await (await client.get(f"/v1/payments/{uncharged.id}", headers=AUTH)).json()
    assert got["status"] == "failed" and got["error_code"] == "not_charged"
    got = await (await client.get(f"/v1/payments/{unsent.id}", headers=AUTH)).json()
    assert got["status"] == "failed" and got["error_code"] == "interrupted_before_provider_call"
    assert got["attempts"] == []

    # nothing was sent again: still exactly the one charge the crashed process made
    assert [c.id for c in charges(stripes["primary"], charged.id)] == [reference]
    assert entries(stripes["primary"], uncharged.id) == [] and entries(stripes["primary"], unsent.id) == []
    assert all(s.emulator.ledger.snapshot()["entries"] == [] for n, s in stripes.items() if n != "primary")

    expected = {charged.id: (201, "approved"), uncharged.id: (502, "failed"), unsent.id: (502, "failed")}
    for record in (charged, uncharged, unsent):
        resp = await _replay(client, keys[record.id], record.merchant_reference)
        doc = await resp.json()
        assert (resp.status, doc["status"]) == expected[record.id], record.id
        assert doc["id"] == record.id
        assert resp.headers.get("Idempotent-Replayed") == "true"
    assert len(charges(stripes["primary"], charged.id)) == 1

    lines = await txlog(client)
    assert sorted((line["payment_id"], line["event"], line["status"]) for line in lines) == sorted(
        (pid, "reconciliation", status) for pid, (_, status) in expected.items())
    assert (await client.app[RECONCILER].run_once(min_age_s=0)) == 0  # nothing left to settle


async def test_unreachable_provider_leaves_payment_pending_until_it_answers(engine_config, start_gateway,
                                                                           stripes) -> None:
    config = engine_config()
    record = _crashed_record("pay_crash_unreachable", "order-unreachable", "primary")
    reference = await _charge_directly(config, "primary", record.id, record.merchant_reference)
    await _leave_crash_behind(config, [(record, "key-unreachable")])
    await stripes["primary"].set_outage(True)

    client = await start_gateway(config)

    stored = await journal(client, record.id)
    assert stored.status is PaymentStatus.PENDING  # not failed: the provider may hold a charge
    assert stored.attempts[-1].operation == "status" and stored.attempts[-1].outcome == "unavailable"
    resp = await _replay(client, "key-unreachable", record.merchant_reference)
    # The reconciler took the crashed payment over: its key answers "pending", not 409 for hours.
    assert resp.status == 201 and (await resp.json())["status"] == "pending"
    assert entries(stripes["backup"], record.id) == []

    await stripes["primary"].set_outage(False)
    assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 1

    stored = await journal(client, record.id)
    assert stored.status is PaymentStatus.APPROVED and stored.provider_reference == reference
    resp = await _replay(client, "key-unreachable", record.merchant_reference)
    settled = await resp.json()
    assert resp.status == 201 and settled["status"] == "approved" and settled["error_code"] is None
    assert len(charges(stripes["primary"], record.id)) == 1
    assert entries(stripes["backup"], record.id) == []




async def test_crash_right_after_the_key_claim_gets_a_final_answer(engine_config, start_gateway, stripes) -> None:
    """The front door claims the Idempotency-Key and journals the payment (status received) in
    one transaction. A crash before the first provider call leaves both: after a restart the
    reconciler closes the payment as failed (nothing was sent) and the key replays that final
    answer instead of 409 "still being processed" until the key expires."""
    config = engine_config()
    store = SqliteStore(Path(config.storage.sqlite_path))
    await store.open()
    try:
        now = time.time()
        request = SimpleNamespace(method="POST", path="/v1/payments")
        record = PaymentRecord(id="pay_crash_orphan", client=SCOPE, amount=1299, currency="EUR", capture=True,
                               merchant_reference="order-orphan", created_at=CRASHED_AT, updated_at=CRASHED_AT)
        await store.claim_idempotency(SCOPE, "key-orphan", _print(request, _body("order-orphan")),
                                      record.id, now, now + config.storage.idempotency_retention_h * 3600, record)
    finally:
        await store.close()

    client = await start_gateway(config)
    resp = await _replay(client, "key-orphan", "order-orphan")
    doc = await resp.json()

    assert resp.status == 502, doc
    assert doc["id"] == "pay_crash_orphan"
    assert doc["status"] == "failed"
    assert doc["error_code"] == "interrupted_before_provider_call"
    assert stripes["primary"].emulator.ledger.charges() == []


async def test_a_payment_within_its_deadline_is_left_to_its_owner(engine_config, start_gateway, stripes) -> None:
    """The periodic pass: another replica (or a slow request) may still be working on a fresh
    `attempting` row, so the reconciler must not settle it, or it could answer `failed` while
    that request goes on to charge. (At start-up a process that owns its SQLite journal alone
    settles every orphan at once; see the crash tests above.)"""
    client = await start_gateway(engine_config())
    record = _crashed_record("pay_live_elsewhere", "order-live", "primary")
    record.created_at = record.updated_at = time.time()
    await client.app[STORE].save_payment(record)
    assert await client.app[RECONCILER].run_once(min_age_s=0) == 0
    assert (await client.app[STORE].get_payment("pay_live_elsewhere")).status is PaymentStatus.ATTEMPTING
    assert stripes["primary"].emulator.ledger.find_by_ref("pay_live_elsewhere") == []


async def test_one_unsettleable_payment_does_not_stop_the_others(engine_config, start_gateway, stripes) -> None:
    """A payment held by a provider no longer in the config is reported, not fatal: start-up
    goes on and the other crashed payments are settled."""
    config = engine_config()
    orphan = _crashed_record("pay_crash_renamed", "order-renamed", "primary")
    orphan.provider = "renamed"
    good = _crashed_record("pay_crash_good", "order-good", "primary")
    reference = await _charge_directly(config, "primary", good.id, good.merchant_reference)
    await _leave_crash_behind(config, [(orphan, "key-renamed"), (good, "key-good")])

    client = await start_gateway(config)

    assert (await journal(client, good.id)).provider_reference == reference
    assert (await journal(client, orphan.id)).status is PaymentStatus.ATTEMPTING


async def test_a_crashed_payment_the_lookup_cannot_clear_stays_pending_and_is_logged_once(
        engine_config, start_gateway, stripes) -> None:
    """Stripe's search lags, so 'not found' a minute after the call proves nothing: the payment
    stays pending (never failed while it may still appear), its one payment line is written when
    the reconciler takes it over, and later passes neither log again nor grow the row."""
    client = await start_gateway(engine_config())
    record = _crashed_record("pay_crash_recent_call", "order-recent", "primary")
    record.attempts[0].started_at = time.time() - 60
    await client.app[STORE].save_payment(record)  # left by a dead replica; passes race to take it
    reconciler = client.app[RECONCILER]
    await asyncio.gather(*(reconciler.run_once(min_age_s=0, ignore_backoff=True) for _ in range(3)))
    await reconciler.run_once(min_age_s=0, ignore_backoff=True)

    stored = await journal(client, record.id)
    assert stored.status is PaymentStatus.PENDING
    assert [a.operation for a in stored.attempts] == ["authorize", "status"]
    lines = await txlog(client, record.id)
    assert [(line["event"], line["status"]) for line in lines] == [("payment", "pending")]
