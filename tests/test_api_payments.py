"""End to end: HTTP API -> gateway -> emulator over mTLS on loopback."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import pytest

from gateway.app_keys import STORE
from gateway.journal.sqlite import SqliteStore
from tests.conftest import AUTH, READER_KEY, card_payment


def key() -> dict[str, str]:
    return {**AUTH, "Idempotency-Key": str(uuid.uuid4())}


async def test_approved_payment(make_config, start_gateway, emulators) -> None:
    client = await start_gateway(make_config())
    resp = await client.post("/v1/payments", json=card_payment(), headers=key())
    assert resp.status == 201
    doc = await resp.json()
    assert doc["status"] == "approved"
    assert doc["provider"] == "stripe"
    assert doc["provider_reference"].startswith("pi_")
    assert doc["attempts"][0]["outcome"] == "approved"
    assert doc["card"] == {"brand": "visa", "bin": "424242", "last4": "4242"}
    assert len(emulators["stripe"].emulator.ledger.charges()) == 1
    got = await client.get(f"/v1/payments/{doc['id']}", headers=AUTH)
    assert (await got.json())["status"] == "approved"


async def test_hard_decline_does_not_fail_over(make_config, start_gateway, emulators) -> None:
    client = await start_gateway(make_config())
    resp = await client.post("/v1/payments", json=card_payment("4000000000009995"), headers=key())
    doc = await resp.json()
    assert resp.status == 201
    assert doc["status"] == "declined"
    assert doc["decline_code"] == "insufficient_funds"
    assert [a["provider"] for a in doc["attempts"]] == ["stripe"]


async def test_same_key_same_body_replays_byte_for_byte(make_config, start_gateway, emulators) -> None:
    client = await start_gateway(make_config())
    headers = key()
    first = await client.post("/v1/payments", json=card_payment(), headers=headers)
    second = await client.post("/v1/payments", json=card_payment(), headers=headers)
    assert first.status == second.status == 201
    assert await first.read() == await second.read()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(emulators["stripe"].emulator.ledger.charges()) == 1


async def test_the_same_payment_re_serialised_is_a_replay(make_config, start_gateway, emulators) -> None:
    """Outside attack: the fingerprint hashed the body's bytes, so the same payment sent again
    with its keys in another order, or indented (a checkout rebuilding the request after a
    crash), was 422 `idempotency_key_reused`, and a checkout that then pays with a new key
    charges twice. The fingerprint hashes the JSON document in canonical form."""
    client = await start_gateway(make_config())
    headers = {**key(), "Content-Type": "application/json"}
    body = card_payment()
    first = await client.post("/v1/payments", data=orjson.dumps(body), headers=headers)
    reordered = dict(reversed(list(body.items())))
    for again in (orjson.dumps(reordered), orjson.dumps(body, option=orjson.OPT_INDENT_2)):
        second = await client.post("/v1/payments", data=again, headers=headers)
        assert second.status == first.status == 201, await second.text()
        assert second.headers["Idempotent-Replayed"] == "true" and await second.read() == await first.read()
    assert len(emulators["stripe"].emulator.ledger.charges()) == 1


async def test_a_key_claimed_by_an_earlier_release_still_replays_the_same_bytes(make_config, start_gateway,
                                                                                emulators) -> None:
    """Earlier releases stored the raw bytes' fingerprint: a retry across the upgrade must be
    a replay (in flight here), not 422, or the checkout might pay again with a new key."""
    from types import SimpleNamespace

    from gateway.http.auth import fingerprint_key
    from gateway.http.idempotency import fingerprint
    from tests.conftest import CHECKOUT_KEY

    client = await start_gateway(make_config())
    headers = key()
    raw = orjson.dumps(card_payment())
    old = fingerprint(SimpleNamespace(method="POST", path="/v1/payments"), raw, orjson.loads(raw),
                      fingerprint_key(CHECKOUT_KEY)).legacy
    assert old is not None
    now = time.time()
    await client.app[STORE].claim_idempotency("checkout", headers["Idempotency-Key"], old, "pay_earlier", now,
                                              now + 3600)
    resp = await client.post("/v1/payments", data=raw, headers={**headers, "Content-Type": "application/json"})
    assert resp.status == 409 and (await resp.json())["code"] == "idempotency_key_in_use", await resp.text()
    assert emulators["stripe"].emulator.ledger.charges() == []


async def test_same_key_other_body_is_422(make_config, start_gateway) -> None:
    client = await start_gateway(make_config())
    headers = key()
    await client.post("/v1/payments", json=card_payment(), headers=headers)
    resp = await client.post("/v1/payments", json=card_payment(amount=5), headers=headers)
    assert resp.status == 422
    assert (await resp.json())["code"] == "idempotency_key_reused"


async def test_missing_idempotency_key_is_400(make_config, start_gateway, emulators) -> None:
    client = await start_gateway(make_config())
    resp = await client.post("/v1/payments", json=card_payment(), headers=AUTH)
    assert resp.status == 400
    doc = await resp.json()
    assert doc == {"code": "idempotency_key_missing", "message": doc["message"], "field": "Idempotency-Key"}
    assert emulators["stripe"].emulator.ledger.charges() == []


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer nope"}, 401),
    ({"Authorization": "Basic abc"}, 401),
    ({"Authorization": f"Bearer {READER_KEY}"}, 403),
])
async def test_auth(make_config, start_gateway, headers, status) -> None:
    client = await start_gateway(make_config())
    resp = await client.post("/v1/payments", json=card_payment(),
                             headers={**headers, "Idempotency-Key": "k1"})
    assert resp.status == status
    assert (await resp.json())["code"] in ("unauthenticated", "forbidden")


@pytest.mark.parametrize(("body", "content_type", "status", "code", "field"), [
    (b"{not json", "application/json", 400, "malformed_json", None),
    (b"[1, 2]", "application/json", 400, "malformed_json", None),
    (orjson.dumps(card_payment(amount="12")), "application/json", 422, "invalid_field", "amount"),
    (orjson.dumps(card_payment(amount=-5)), "application/json", 422, "invalid_field", "amount"),
    (orjson.dumps(card_payment(amount=1.5)), "application/json", 422, "invalid_field", "amount"),
    (orjson.dumps(card_payment(currency="XXQ")), "application/json", 422, "invalid_field", "currency"),
    (orjson.dumps(card_payment("4242424242424241")), "application/json", 422, "invalid_field",
     "payment_method.number"),
    (orjson.dumps({**card_payment(), "surprise": 1}), "application/json", 422, "invalid_field", "surprise"),
    (orjson.dumps({k: v for k, v in card_payment().items() if k != "merchant_reference"}), "application/json",
     422, "invalid_field", "merchant_reference"),
    (orjson.dumps(card_payment()), "text/plain", 415, "unsupported_media_type", "Content-Type"),
    (b"{" + b" " * 70_000 + b"}", "application/json", 413, "body_too_large", None),
])
async def test_bad_input_gets_a_clear_error_and_writes_nothing(make_config, start_gateway, emulators, tmp_path,
                                                                body, content_type, status, code, field) -> None:
    client = await start_gateway(make_config())
    headers = {**key(), "Content-Type": content_type}
    resp = await client.post("/v1/payments", data=body, headers=headers)
    assert resp.status == status
    doc = await resp.json()
    assert doc["code"] == code
    assert doc["field"] == field
    assert doc["message"]
    # nothing half-written: the same key is free for a corrected request
    ok = await client.post("/v1/payments", json=card_payment(), headers=headers | {"Content-Type": "application/json"})
    assert ok.status == 201
    assert len(emulators["stripe"].emulator.ledger.charges()) == 1


async def test_unknown_payment_is_404(make_config, start_gateway) -> None:
    client = await start_gateway(make_config())
    resp = await client.get("/v1/payments/pay_nope", headers=AUTH)
    assert resp.status == 404
    assert (await resp.json())["code"] == "payment_not_found"


async def test_journal_survives_restart_and_log_has_no_card_number(make_config, start_gateway, tmp_path) -> None:
    config = make_config()
    client = await start_gateway(config)
    resp = await client.post("/v1/payments", json=card_payment(), headers=key())
    payment_id = (await resp.json())["id"]
    await client.close()  # runs every cleanup context: store closed, log flushed

    store = SqliteStore(Path(config.storage.sqlite_path))
    await store.open()
    try:
        record = await store.get_payment(payment_id)
    finally:
        await store.close()
    assert record is not None and record.status.value == "approved"

    client = await start_gateway(config)
    got = await client.get(f"/v1/payments/{payment_id}", headers=AUTH)
    assert (await got.json())["status"] == "approved"

    log = (Path(config.log.dir) / config.log.file).read_bytes()
    lines = [orjson.loads(line) for line in log.splitlines()]
    assert [line["payment_id"] for line in lines] == [payment_id]
    assert b"4242424242424242" not in log
    assert b"sk_test_gateway" not in log
    db = Path(config.storage.sqlite_path).read_bytes()
    assert b"4242424242424242" not in db


@pytest.mark.parametrize(("number", "shown_bin", "last4"), [
    ("4242424242424242", "424242", "4242"),  # 16 digits: BIN and last 4, 6 hidden
    ("378282246310005", "37828", "0005"),  # 15: a 6-digit BIN would leave only 5 hidden
    ("675900000018", "67", "0018"),  # 12 (Maestro): 2 + 4 shown, 6 hidden
])  # fmt: skip
async def test_the_journal_keeps_at_least_six_card_digits_hidden(make_config, start_gateway, emulators,
                                                                 number, shown_bin, last4) -> None:
    config = make_config()
    client = await start_gateway(config)
    resp = await client.post("/v1/payments", json=card_payment(number), headers=key())
    doc = await resp.json()
    assert resp.status == 201, doc
    assert (doc["card"]["bin"], doc["card"]["last4"]) == (shown_bin, last4)
    journalled = await client.app[STORE].get_payment(doc["id"])
    assert journalled is not None and (journalled.card_bin, journalled.card_last4) == (shown_bin, last4)


async def test_openapi_matches_the_validator(make_config, start_gateway) -> None:
    client = await start_gateway(make_config())
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    schema = doc["components"]["schemas"]["PaymentCreate"]
    assert set(schema["required"]) == {"amount", "currency", "payment_method", "merchant_reference"}
    assert schema["additionalProperties"] is False


async def test_health_ready_metrics(make_config, start_gateway) -> None:
    client = await start_gateway(make_config())
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["providers"]["stripe"]["usable"] is True
    await client.post("/v1/payments", json=card_payment(), headers=key())
    text = await (await client.get("/metrics")).text()
    assert 'gateway_payments_total{status="approved"} 1.0' in text


async def test_a_stored_fingerprint_cannot_be_searched_for_the_card(make_config, start_gateway) -> None:
    """The key's fingerprint hashes the body, which holds the card number and CVC; stored beside
    the BIN, last four and amount, a plain SHA-256 of it gives them back by a small search. It
    is keyed by a secret derived from the caller's API key instead."""
    import hashlib
    import sqlite3

    config = make_config()
    client = await start_gateway(config)
    body = card_payment(number="4000056655665556")
    raw = orjson.dumps(body)
    resp = await client.post("/v1/payments", data=raw,
                             headers={**AUTH, "Idempotency-Key": "fp-key", "Content-Type": "application/json"})
    assert resp.status == 201
    conn = sqlite3.connect(config.storage.sqlite_path)
    try:
        [(stored,)] = conn.execute("SELECT fingerprint FROM idempotency WHERE key = 'fp-key'").fetchall()
    finally:
        conn.close()
    assert stored != hashlib.sha256(b"POST /v1/payments\n" + raw).hexdigest()
    replay = await client.post("/v1/payments", data=raw,
                               headers={**AUTH, "Idempotency-Key": "fp-key", "Content-Type": "application/json"})
    assert replay.status == 201 and replay.headers.get("Idempotent-Replayed") == "true"
