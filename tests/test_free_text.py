"""Card data and secrets in free-text fields are refused at the door (DESIGN rule 6), and a
refused request leaves nothing behind: no journal row, no idempotency record, not one byte of
the card number in the SQLite database or its write-ahead log. The detector doing it is the
logs' own, which knows the configuration's secret values."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.app_keys import OPS_LOG, STORE, TRANSACTION_LOG
from gateway.config import GatewayConfig
from tests.conftest import AUTH, CHECKOUT_KEY, PROVIDER_KEYS, card_payment

# Not the payment method's card (4242...), so a hit in the database can only come from free text.
PAN = "5555555555554444"
AMEX = "378282246310005"
FULL_WIDTH = PAN.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
SK_LIVE = "sk_live_51HqLyjWDarjtT1zdp7dcXAbCdEf"
ADYEN_KEY = "AQEyhmfxK4PJaBZGw0m/n3Q5qf3VaY9UCJ1+XWZe9W27jmlZiuNK8ah3Ljv1TjK6EMFdWw2+5HzctViMSCJMYAc=-uQMZkRLH"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
# Never at rest, whatever the request: digits and key bodies as they would appear in the files
# (a security code only with its label: three digits alone occur in any file by chance).
NEVER_AT_REST = [PAN, AMEX, "cvc=917", "cvc 917", "code: 0123", SK_LIVE, ADYEN_KEY[:40],
                 "MIIEvQIBADANBgkq", CHECKOUT_KEY, PROVIDER_KEYS["adyen"], "whsec_9f8e7d6c5b4a"]

CARD, SECRET = "card_data_in_free_text", "secret_in_free_text"
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"merchant_reference": f"order {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"}, CARD, "merchant_reference"),
    ({"merchant_reference": f"order-{AMEX[:4]}.{AMEX[4:10]}.{AMEX[10:]}"}, CARD, "merchant_reference"),
    ({"description": f"card\t{PAN[:4]}\t{PAN[4:8]}\t{PAN[8:12]}\t{PAN[12:]}"}, CARD, "description"),
    ({"description": f"card {FULL_WIDTH}"}, CARD, "description"),
    # As pasted from a URL or a page, spaced out, or with an invisible mark (a re-attack).
    ({"merchant_reference": f"r {PAN[:4]}%20{PAN[4:8]}%20{PAN[8:12]}%20{PAN[12:]}"}, CARD, "merchant_reference"),
    ({"return_url": f"https://shop.example/return?card={PAN[:4]}%20{PAN[4:8]}%20{PAN[8:12]}%20{PAN[12:]}"}, CARD,
     "return_url"),
    ({"description": f"{PAN[:4]}&nbsp;{PAN[4:8]}&nbsp;{PAN[8:12]}&nbsp;{PAN[12:]}"}, CARD, "description"),
    ({"description": f"{PAN[:4]}<b>{PAN[4:8]}</b>{PAN[8:12]} {PAN[12:]}"}, CARD, "description"),
    ({"metadata": {"note": f"{PAN[:4]}    {PAN[4:8]}    {PAN[8:12]}    {PAN[12:]}"}}, CARD, "metadata.note"),
    ({"metadata": {"note": f"{PAN[0]}\u0301{PAN[1:]}"}}, CARD, "metadata.note"),
    # Any punctuation between the groups (an outside attack stored these verbatim).
    ({"merchant_reference": f"{PAN[:4]},{PAN[4:8]},{PAN[8:12]},{PAN[12:]}"}, CARD, "merchant_reference"),
    ({"metadata": {"note": f"{PAN[:4]}|{PAN[4:8]}|{PAN[8:12]}|{PAN[12:]}"}}, CARD, "metadata.note"),
    ({"description": f"card {PAN[:4]}:{PAN[4:8]}:{PAN[8:12]}:{PAN[12:]}"}, CARD, "description"),
    ({"description": f"card {PAN[:4]}; {PAN[4:8]}; {PAN[8:12]}; {PAN[12:]}"}, CARD, "description"),
    ({"description": f"card {PAN[:4]}*{PAN[4:8]}*{PAN[8:12]}*{PAN[12:]}"}, CARD, "description"),
    ({"description": f"ref 99{PAN}01"}, CARD, "description"),
    ({"metadata": {"note": f"paid with {PAN}"}}, CARD, "metadata.note"),
    ({"metadata": {"note": "cvc=917"}}, CARD, "metadata.note"),
    ({"metadata": {"note": "Security code: 0123"}}, CARD, "metadata.note"),
    ({"metadata": {"note": "card verification value 917"}}, CARD, "metadata.note"),
    ({"metadata": {"pin": "1234"}}, "sensitive_metadata_key", "metadata.pin"),
    ({"metadata": {"db_passwd": "x"}}, "sensitive_metadata_key", "metadata.db_passwd"),
    ({"metadata": {"cookie": "x"}}, "sensitive_metadata_key", "metadata.cookie"),
    ({"payment_method": {"type": "token", "token": PAN}}, CARD, "payment_method.token"),
    ({"metadata": {PAN: "x"}}, CARD, "metadata"),
    ({"metadata": {"card_cvc": "917"}}, "sensitive_metadata_key", "metadata.card_cvc"),
    ({"metadata": {"api-key": "x"}}, "sensitive_metadata_key", "metadata.api-key"),
    ({"payment_method": {"type": "card", "number": "4242424242424242", "exp_month": 12, "exp_year": 2030,
                         "holder_name": f"J {PAN}"}}, CARD, "payment_method.holder_name"),
    ({"description": f"key {SK_LIVE}"}, SECRET, "description"),
    ({"description": f"key {ADYEN_KEY}"}, SECRET, "description"),
    ({"metadata": {"pem": PEM}}, SECRET, "metadata.pem"),
    ({"metadata": {"hook": "whsec_9f8e7d6c5b4a"}}, SECRET, "metadata.hook"),
    ({"metadata": {"auth": "Bearer eyJhbGciOi.J9"}}, SECRET, "metadata.auth"),
    # The gateway's own configured secret values, whatever their shape.
    ({"merchant_reference": f"order {CHECKOUT_KEY}"}, SECRET, "merchant_reference"),
    ({"description": f"see {PROVIDER_KEYS['adyen']}"}, SECRET, "description"),
]


def key(name: str | None = None) -> dict[str, str]:
    return {**AUTH, "Idempotency-Key": name or str(uuid.uuid4())}


def bytes_at_rest(config: GatewayConfig) -> bytes:
    """The SQLite database and its write-ahead log, as the files hold them now."""
    db = Path(config.storage.sqlite_path)
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def rows(config: GatewayConfig, table: str) -> int:
    conn = sqlite3.connect(f"file:{config.storage.sqlite_path}?mode=ro", uri=True)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def assert_nothing_secret_at_rest(config: GatewayConfig) -> None:
    raw = bytes_at_rest(config)
    assert raw, "the database files exist"
    leaked = [s for s in NEVER_AT_REST if s.encode() in raw]
    assert not leaked, leaked


async def test_card_data_and_secrets_in_free_text_are_refused_before_anything_is_written(
        make_config, start_gateway, emulators) -> None:
    config = make_config()
    client = await start_gateway(config)
    for i, (extra, code, field) in enumerate(REFUSED):
        resp = await client.post("/v1/payments", json=card_payment(**extra), headers=key(f"refused-{i}"))
        doc = await resp.json()
        assert (resp.status, doc["code"], doc["field"]) == (422, code, field), (extra, doc)
        assert not [s for s in NEVER_AT_REST if s in doc["message"]], doc  # the error never echoes it

    assert rows(config, "payments") == rows(config, "idempotency") == 0
    assert_nothing_secret_at_rest(config)
    assert emulators["stripe"].emulator.ledger.charges() == []
    # The refused key holds nothing: the corrected request goes through under it.
    ok = await client.post("/v1/payments", json=card_payment(), headers=key("refused-0"))
    assert ok.status == 201
    assert rows(config, "payments") == rows(config, "idempotency") == 1
    assert_nothing_secret_at_rest(config)


async def test_free_text_that_only_looks_like_card_data_is_accepted_as_sent(make_config, start_gateway,
                                                                          emulators) -> None:
    """Digits in other shapes (a reference in 6 + 6 digits that passes Luhn, decimals, times, a
    code that is no security code) go through, and the journal keeps them as sent."""
    client = await start_gateway(make_config())
    body = card_payment(merchant_reference="ORD-123456-000017", description="2 items at 1999.50, 2024-05-01 12:00",
                        metadata={"cvc_check": "pass", "ts": "1714564800.123456", "peer": "192.168.100.200",
                                  # Luhn-valid, as one long number in ten is, but no card begins so
                                  "order": "order-1733058000006", "counter": "000000000000000018",
                                  # punctuation between groups counts, but not in these shapes
                                  "at": "2024-05-01T12:30:45.123456Z", "total": "1,234,567,890,123",
                                  "where": "10.0.0.1:8080", "link": "https://shop.example/r?order=A%2B1&x=2",
                                  "spaced": "2 items at 19.99  each, 100% sure"})
    # The checkout's keys are often its order number and a millisecond time: Luhn-valid here too.
    resp = await client.post("/v1/payments", json=body,
                             headers={**AUTH, "Idempotency-Key": "checkout-1733058000123455"})
    assert resp.status == 201, await resp.text()
    record = await client.app[STORE].get_payment((await resp.json())["id"])
    assert record is not None
    assert (record.merchant_reference, record.metadata) == (body["merchant_reference"], body["metadata"])


@pytest.mark.parametrize(("operation", "capture"), [("refunds", True), ("void", False)])
async def test_a_follow_up_reason_with_card_data_is_refused(make_config, start_gateway, emulators,
                                                            operation, capture) -> None:
    config = make_config()
    client = await start_gateway(config)
    created = await client.post("/v1/payments", json=card_payment(capture=capture), headers=key())
    payment_id = (await created.json())["id"]
    follow_up = key()

    refused = await client.post(f"/v1/payments/{payment_id}/{operation}",
                                json={"reason": f"customer card {PAN} cvc 917"}, headers=follow_up)
    doc = await refused.json()

    assert (refused.status, doc["code"], doc["field"]) == (422, CARD, "reason")
    assert rows(config, "idempotency") == 1  # the payment's own key only
    assert_nothing_secret_at_rest(config)
    done = await client.post(f"/v1/payments/{payment_id}/{operation}", json={"reason": "requested_by_customer"},
                             headers=follow_up)
    assert done.status == 200


async def test_the_configured_secret_values_are_hidden_in_both_logs(make_config, start_gateway, capsys) -> None:
    client = await start_gateway(make_config())
    note = f"provider said: bad key {PROVIDER_KEYS['adyen']}; caller used {CHECKOUT_KEY}"

    client.app[OPS_LOG].warning("provider_error", note=note)
    line = client.app[TRANSACTION_LOG].render("payment", payment_id="pay_x", note=note).line

    ops = capsys.readouterr().err
    for text in (ops, line.decode()):
        assert "provider_error" in ops and "[REDACTED]" in text
        assert PROVIDER_KEYS["adyen"] not in text and CHECKOUT_KEY not in text
