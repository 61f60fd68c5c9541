"""Redaction: unit cases per rule, copy semantics, and what actually reaches the disk."""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import json
import re
import string
import unicodedata
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from structlog.testing import LogCapture

from domain.cards import PAN_MAX, PAN_MIN, issuer_lengths, truncate_pan, visible_digits
from domain.secret import Secret
from gateway.http.errors import ApiError
from gateway.http.free_text import refuse_card_data
from gateway.http.schemas import Body, PaymentCreate, RefundCreate, VoidCreate
from gateway.redaction import REDACTED, Finding, Redactor, luhn_valid, mask_pan
from gateway.txlog import JsonLinesWriter, build_ops_logger, build_transaction_logger
from tests.conftest import luhn_complete

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
AMEX = "378282246310005"
SK_TEST = "sk_test_51HqLyjWDarjtT1zdp7dcXAbCdEf"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA7vbqajDw4o6gJy8UtmIbkcpnkO3Kwc4qsEnSZp/TR+fQi62F\n"
    "-----END RSA PRIVATE KEY-----"
)


def redact(event: dict[str, Any]) -> dict[str, Any]:
    return Redactor()(None, "info", event)


# -- helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize("pan", [VISA, MASTERCARD, AMEX, "6011111111111117", "3056930009020004"])
def test_luhn_accepts_test_cards(pan: str) -> None:
    assert luhn_valid(pan)


@pytest.mark.parametrize("digits", ["4242424242424241", "", "4242 4242 4242 4242", "١٢٣"])
def test_luhn_rejects_wrong_check_digit_and_non_digits(digits: str) -> None:
    assert not luhn_valid(digits)


def test_mask_pan_keeps_bin_and_last4_where_six_digits_stay_hidden() -> None:
    assert mask_pan("4242 4242 4242 4242") == "424242******4242"
    assert mask_pan("4242-4242-4242-4242") == "424242******4242"
    assert mask_pan(AMEX) == "37828******0005"  # 15 digits: a BIN of 6 would leave only 5 hidden
    assert mask_pan("500000000004") == "50******0004"
    assert mask_pan("12345") == "*****"


@pytest.mark.parametrize(("length", "lead", "last"), [
    (19, 6, 4), (16, 6, 4), (15, 5, 4), (14, 4, 4), (13, 3, 4), (12, 2, 4), (10, 0, 4), (8, 0, 2), (6, 0, 0), (0, 0, 0),
])  # fmt: skip
def test_truncation_rule_shows_last4_first_then_the_bin_that_fits(length: int, lead: int, last: int) -> None:
    assert visible_digits(length) == (lead, last)
    number = "9" * length
    assert truncate_pan(number) == ("9" * lead, "9" * last)


# -- by key name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "number", "card_number", "cardNumber", "PAN", "cvc", "CVV", "cvc2", "security_code",
        "exp_month", "exp_year", "expiry", "expiry_date", "api_key", "apikey", "x-api-key",
        "X-API-Key", "Authorization", "password", "secret", "private_key", "client_secret",
        "token", "access_token", "refresh_token", "encryptedCardNumber", "encrypted_card_number",
    ],
)  # fmt: skip
def test_sensitive_key_values_are_replaced(key: str) -> None:
    out = redact({"event": "e", "nested": {"deeper": [{key: "123"}]}})
    assert out["nested"]["deeper"][0][key] == REDACTED


def test_sensitive_key_hides_containers_and_numbers() -> None:
    out = redact({"card": {"number": 4242424242424242, "cvc": 737}, "token": {"id": "x"}})
    assert out["card"] == {"number": REDACTED, "cvc": REDACTED}
    assert out["token"] == REDACTED


def test_custom_key_set_replaces_default() -> None:
    out = Redactor({"iban"})(None, "info", {"IBAN": "DE89370400440532013000", "cvc": "1"})
    assert out == {"IBAN": REDACTED, "cvc": "1"}


def test_ordinary_keys_and_values_pass_unchanged() -> None:
    event = {
        "event": "payment",
        "amount": 1999,
        "currency": "EUR",
        "ratio": 0.5,
        "ok": True,
        "none": None,
        "payment_id": "pay_01HX3K9Z8Q7R6S5T4U3V2W1X0Y",
        "idempotency_key": "7f3e2a10-9b4c-4d1e-8f2a-3c5b6d7e8f90",
        "started": "2024-05-01T12:00:00.123456Z",
        "phone": "+44 20 7946 0958",
        "epoch": "1714564800.123456",
        "peer": "192.168.100.200",
        "latency": "latency 12.345 ms",
        "created_at": 1714564800.123456,
        "latency_ms": 4242424242.25,
        "captured_amount": 424242424242,  # Luhn-valid, but an amount, not a card
        "refunded_amount": 4242424242.0,
        "cvc_check": "pass",
        "note": "CVC check passed",
    }
    assert redact(event) == event


# -- by content -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4242 4242 4242 4242 ok", "card 424242******4242 ok"),
        ("card 4242-4242-4242-4242", "card 424242******4242"),
        (f"pan={VISA};", "pan=424242******4242;"),
        (f"amex {AMEX}", "amex 37828******0005"),
        ("not a card 4242424242424241", "not a card 4242424242424241"),
        ("short 42424242424", "short 42424242424"),
    ],
)
def test_card_numbers_in_text_are_masked(text: str, expected: str) -> None:
    assert redact({"note": text}) == {"note": expected}


def test_card_number_beside_other_numbers_is_masked_in_place() -> None:
    out = redact({"note": "qty 2 4242 4242 4242 4242 - 17 items"})
    # "4242 4242 4242" (12 digits, twice) passes Luhn too: each such span keeps only 2 + 4 shown.
    assert out == {"note": "qty 2 42** **** **** 4242 - 17 items"}


def test_epoch_times_and_padded_counters_in_references_are_not_cards() -> None:
    """Luhn passes one number in ten: these all pass it, and none can begin a card."""
    refs = {ref: ref for ref in ("order-1733058000006", "1733058000123455", "000000000000000018",
                                 "INV-0000004242424242")}
    assert all(luhn_valid(next(part for part in ref.split("-") if part.isdigit())) for ref in refs)
    assert redact(refs) == refs
    assert {Redactor().finding(ref) for ref in refs} == {None}


@pytest.mark.parametrize("pan", ["122000000000003",  # UATP (airline), 15 digits beginning with 1
                                 "9792000000000003",  # a national scheme no table here lists (Troy)
                                 "7000000000000005"])  # petroleum (fleet cards)
def test_cards_of_unlisted_networks_are_still_hidden(pan: str) -> None:
    assert luhn_valid(pan)
    assert redact({"note": f"card {pan}"}) == {"note": f"card {mask_pan(pan)}"}


def test_provider_identifiers_stay_as_they_are_in_every_log_line() -> None:
    """A 16-digit Adyen pspReference passes Luhn one time in ten: under the keys that hold the
    provider's own identifiers it is kept (the journal keeps it too), so an incident can be
    followed from our lines to the provider's records; the same digits elsewhere are masked."""
    psp = "8835296650153313"
    assert luhn_valid(psp)
    line = {"provider_reference": psp, "event_id": f"AUTHORISATION:{psp}:true", "note": f"ref {psp}",
            "attempts": [{"provider_reference": psp}], "providerReference": int(psp)}
    assert redact(line) == {**line, "note": f"ref {mask_pan(psp)}", "providerReference": mask_pan(psp)}


def test_long_references_without_a_card_inside_are_not_mangled() -> None:
    """A window inside a longer run counts only with a card network's prefix and length."""
    refs = {"psp_reference": "8535296650153317", "order": "20240501123456789012", "nanos": "1714564800123456789"}
    assert redact(refs) == refs


def test_card_numbers_in_keys_and_integers_are_masked() -> None:
    out = redact({VISA: 5555555555554444, "n": [4242424242424242, 12]})
    assert out == {"424242******4242": "555555******4444", "n": ["424242******4242", 12]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key {SK_TEST} used", f"key sk_test_{REDACTED} used"),
        ("sk_live_abc123", f"sk_live_{REDACTED}"),
        ("rk_test_abc123", f"rk_test_{REDACTED}"),
        ("rk_live_abc123", f"rk_live_{REDACTED}"),
        ("whsec_abc123", f"whsec_{REDACTED}"),
        ("refused sk_test_dev_gateway: no", f"refused sk_test_{REDACTED}: no"),  # a re-attack saw _gateway kept
        ("pk_test_abc123", "pk_test_abc123"),
    ],
)
def test_stripe_style_keys_keep_only_the_prefix(text: str, expected: str) -> None:
    assert redact({"msg": text}) == {"msg": expected}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_tokens_are_hidden(scheme: str) -> None:
    out = redact({"hdr": f"{scheme} eyJhbGciOi.J9-x_y~z+/=="})
    assert out == {"hdr": f"Bearer {REDACTED}"}


def test_pem_private_keys_are_hidden() -> None:
    out = redact({"cfg": f"key:\n{PEM}\nend", "cut": PEM[:60]})
    assert out == {"cfg": "key:\n[REDACTED PRIVATE KEY]\nend", "cut": "[REDACTED PRIVATE KEY]"}


def test_bytes_and_foreign_objects_are_scrubbed_as_rendered() -> None:
    @dataclasses.dataclass
    class Card:
        number: str
        brand: str

    class Opaque:
        def __repr__(self) -> str:
            return f"Opaque({VISA})"

    out = redact({"raw": VISA.encode(), "card": Card(VISA, "visa"), "obj": Opaque()})
    assert out == {
        "raw": "424242******4242",
        "card": {"number": REDACTED, "brand": "visa"},
        "obj": "Opaque(424242******4242)",
    }


def test_pathological_nesting_is_cut_not_crashed() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    out = redact({"loop": cyclic})
    assert orjson.dumps(out)  # finite and renderable


# -- copy semantics -------------------------------------------------------------------------


def test_caller_data_is_never_mutated() -> None:
    payload = {
        "card": {"number": VISA, "cvc": "123", "holder": "A N Other"},
        "items": [{"note": f"paid with {VISA}"}, ("Bearer abc.def", [SK_TEST])],
        "headers": {"Authorization": "Bearer abc.def", "X-Api-Key": "k"},
    }
    before = copy.deepcopy(payload)
    out = redact({"event": "payment", "payload": payload})
    assert payload == before
    assert out["payload"]["card"] is not payload["card"]
    assert out["payload"]["items"][1] == ("Bearer [REDACTED]", [f"sk_test_{REDACTED}"])


def test_redactor_in_a_structlog_chain() -> None:
    capture = LogCapture()
    log = structlog.wrap_logger(
        structlog.PrintLogger(io.StringIO()),
        processors=[Redactor(), capture],
        wrapper_class=structlog.BoundLogger,
    )
    card = {"number": VISA, "cvc": "123"}
    log.bind(card=card).info("charge", note=f"card {VISA}")
    assert capture.entries == [
        {
            "card": {"number": REDACTED, "cvc": REDACTED},
            "note": "card 424242******4242",
            "event": "charge",
            "log_level": "info",
        }
    ]
    assert card == {"number": VISA, "cvc": "123"}


# -- bytes on disk --------------------------------------------------------------------------


def test_transaction_log_file_holds_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "tx.jsonl"
    writer = JsonLinesWriter(path)
    writer.start()
    log = build_transaction_logger(writer)
    log.info(
        "payment",
        card={"number": VISA, "cvc": "737", "exp_month": "03", "exp_year": "2030"},
        headers={"Authorization": f"Bearer {SK_TEST}", "X-API-Key": "AQEyhmfxK..."},
        note=f"retry with {MASTERCARD}\nthen {AMEX}",
        pem=PEM,
    )
    log.info("second", n=1)
    assert writer.flush_barrier(5)
    writer.close()

    data = path.read_bytes()
    for secret in (VISA, MASTERCARD, AMEX, SK_TEST, "737", "AQEyhmfx", "MIIEowIBAAKCAQEA"):
        assert secret.encode() not in data
    lines = data.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3  # one line per call, newline-terminated
    first = orjson.loads(lines[0])
    assert first["note"] == "retry with 555555******4444\nthen 37828******0005"
    assert first["ts"].endswith("Z") and first["event"] == "payment"


def test_values_orjson_refuses_still_make_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tx.jsonl"
    writer = JsonLinesWriter(path)
    writer.start()
    build_transaction_logger(writer).info("payment", big=2**70, odd="\ud800", note=VISA)
    writer.close()
    (raw,) = path.read_bytes().splitlines()
    entry = json.loads(raw)  # orjson.loads refuses the lone surrogate too
    assert entry["big"] == 2**70 and entry["odd"] == "\ud800"
    assert entry["note"] == "424242******4242"


def test_ops_logger_redacts_and_renders_tracebacks() -> None:
    stream = io.StringIO()
    log = build_ops_logger(stream)
    try:
        raise ValueError(f"provider rejected {SK_TEST}")
    except ValueError:
        log.exception("breaker_opened", provider="stripe", api_key=SK_TEST)
    log.debug("noise")
    (line,) = stream.getvalue().splitlines()
    entry = orjson.loads(line)
    assert SK_TEST not in line
    assert entry["api_key"] == REDACTED and entry["level"] == "error"
    assert "sk_test_[REDACTED]" in entry["exception"]


# -- shapes the scan must see through ------------------------------------------------------


@pytest.mark.parametrize("text", [
    "4242.4242.4242.4242", "4242/4242/4242/4242", "4242_4242_4242_4242", "4242\t4242\t4242\t4242",
    "4242\n4242\n4242\n4242", "4242\r\n4242\r\n4242\r\n4242", "4242\xa04242\xa04242\xa04242", "4242  4242  4242  4242",
    "4242 - 4242 - 4242 - 4242", "4242\u20134242\u20134242\u20134242", "4242\u200b4242\u200b4242\u200b4242",
    "４２４２４２４２４２４２４２４２", "４２４２\u3000４２４２\u3000４２４２\u3000４２４２", "٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢",
])  # fmt: skip
def test_card_numbers_behind_any_separator_or_digit_form_are_masked(text: str) -> None:
    assert redact({"note": f"paid with {text} today"}) == {"note": "paid with 424242******4242 today"}


def test_amex_grouping_with_dots_is_masked() -> None:
    assert redact({"note": "3782.822463.10005"}) == {"note": "37828******0005"}


@pytest.mark.parametrize(("before", "pan", "after"), [
    ("ref 99", VISA, ""), ("", VISA, "0001"), ("id=000", "4111111111111111", "00"), ("77", AMEX, "1"),
])  # fmt: skip
def test_a_card_glued_to_other_digits_is_masked(before: str, pan: str, after: str) -> None:
    out = redact({"note": before + pan + after})["note"]
    assert out.startswith(before) and len(out) == len(before + pan + after)
    # at least the card's own mask; an overlapping window that also passes may hide more
    assert out[len(before) : len(before) + len(pan)].count("*") >= mask_pan(pan).count("*")


@pytest.mark.parametrize("text", [
    "1714564800.123456", "192.168.100.200 10.0.0.1", "12.345/67.890/12.345", "2024/05/01 12:00:00.123456",
    "v1.2.3.4.5.6.7.8.9.10.11.12", "amounts 1999.00 2499.50 3999.99",
    "ORD-123456-000017",  # 123456000017 passes Luhn, but 6 + 6 is no card's grouping
])  # fmt: skip
def test_numbers_in_other_shapes_are_not_cards(text: str) -> None:
    assert redact({"note": text}) == {"note": text}


@pytest.mark.parametrize("key", [
    "card_cvc", "cardCvv", "card-cvv", "Card_CVV", "card.cvc", "CARD CVV", "security code", "Security-Code",
    "cvc2", "CVV2", "card_verification_value", "ｃｖｃ", "card.number", "Card-Number", "cardNumber", "card_exp_month",
    "payment_token", "webhookSecret", "X-API-KEY",
])  # fmt: skip
def test_key_names_are_folded_before_matching(key: str) -> None:
    assert redact({"card": {key: "917"}}) == {"card": {key: REDACTED}}


@pytest.mark.parametrize(("text", "expected"), [
    ("cvc=917", f"cvc={REDACTED}"),
    ("retry CVV: 917 now", f"retry CVV: {REDACTED} now"),
    ("card_cvc 0123", f"card_cvc {REDACTED}"),
    ("Security Code: 917.", f"Security Code: {REDACTED}."),
    ('{"cvv":"917"}', f'{{"cvv":"{REDACTED}"}}'),
    ("cvc_check: pass 200", "cvc_check: pass 200"),
    ("CVC check passed", "CVC check passed"),
])  # fmt: skip
def test_security_codes_written_inline_are_hidden(text: str, expected: str) -> None:
    assert redact({"note": text}) == {"note": expected}


@pytest.mark.parametrize(("text", "expected"), [
    ("sk_sbox_m73dzbpy7cf3gfd46xr4yj5xo4e", f"sk_sbox_{REDACTED}"),
    ("live key sk_m73dzbpy7cf3gfd46xr4yj5xo4e.", f"live key sk_{REDACTED}."),
    ("sk_test_0b9b5db6-f223-49d0-b68f-f6643dd4f808", f"sk_test_{REDACTED}"),
    ("X-API-Key AQEyhmfxK4PJaBZGw0m/n3Q5qf3VaY9UCJ1+XWZe9W27jmlZiuNK8ah3Ljv1TjK6EMFdWw2+5HzctViMSCJMYAc=-uQMZkRLH"
     "q62MeeVuOL+4C6ZZpU4ge6O2pHA8J3AHxDE=-i1i{=G?)jz%xt.a<R end", f"X-API-Key AQE{REDACTED} end"),
    ("task_abcdefghijklmnopqrstuvwxyz", "task_abcdefghijklmnopqrstuvwxyz"),
    ("sk_short", "sk_short"),
])  # fmt: skip
def test_checkout_and_adyen_keys_are_hidden(text: str, expected: str) -> None:
    assert redact({"msg": text}) == {"msg": expected}


def test_configured_secret_values_are_hidden_wherever_they_appear() -> None:
    redactor = Redactor(secrets=["test-checkout-key", "adyen_test_key_v2", "short"])
    out = redactor(None, "info", {"msg": "auth with test-checkout-key failed", "test-checkout-key": 1,
                                  "cfg": ["adyen_test_key_v2"], "word": "a short word"})
    assert out == {"msg": f"auth with {REDACTED} failed", REDACTED: 1, "cfg": [REDACTED], "word": "a short word"}


def test_secret_types_are_hidden_whole() -> None:
    out = redact({"a": Secret("917"), "b": SecretStr("tok_123"), "c": [Secret("x")]})
    assert out == {"a": REDACTED, "b": REDACTED, "c": [REDACTED]}


def test_card_numbers_as_negative_or_float_numbers_are_masked() -> None:
    out = redact({"n": -4242424242424242, "f": 4242424242424242.0, "t": 1714564800.5})
    assert out == {"n": "424242******4242", "f": "424242******4242", "t": 1714564800.5}


@pytest.mark.parametrize(("text", "finding"), [
    ("order 4242 4242 4242 4242", Finding.CARD_NUMBER),
    ("cvc: 917", Finding.SECURITY_CODE),
    ("key sk_live_abc123", Finding.SECRET),
    (PEM, Finding.SECRET),
    ("Bearer abc.def", Finding.SECRET),
    ("order 2024-05-01 #18342", None),
    ("ok", None),
])  # fmt: skip
def test_finding_names_what_scrubbing_would_hide(text: str, finding: Finding | None) -> None:
    redactor = Redactor()
    assert redactor.finding(text) is finding
    assert (redactor.scrub_text(text) != text) is (finding is not None)


# -- property: nothing secret survives, wherever it hides -----------------------------------

_counter = itertools.count()
# Surrounding text never contains "_" or "~", so it cannot spell out a whole key or token by
# chance. It is often digits, spaces and dashes, so numbers sit next to the card numbers; only
# a digit directly touching the card is avoided (the glued forms below do that on purpose).
_text = st.one_of(
    st.text(st.characters(blacklist_characters="_~", blacklist_categories=("Cs",)), max_size=12),
    st.text("0123456789 -x/", max_size=8),
)
_boundary = st.sampled_from([" ", "-", "x", "/", "\n"])
_before = st.just("") | st.builds(str.__add__, _text, _boundary)
_after = st.just("") | st.builds(str.__add__, _boundary, _text)

SEPARATORS = ["", " ", "-", ".", "/", "_", "\t", "\n", "\xa0", "  ", " - ", "\u2013"]
_FULL_WIDTH = str.maketrans(string.digits, "０１２３４５６７８９")
_ARABIC_INDIC = str.maketrans(string.digits, "٠١٢٣٤٥٦٧٨٩")
# Real networks' prefixes (4 digits each), for the cards that hide glued to other digits.
_ISSUED_PREFIXES = ["4242", "4000", "4111", "5555", "5105", "2221", "2720", "3782", "3714", "6011", "6500", "3056",
                    "3600", "3530", "6200", "2200", "6759", "5018"]
# Every character the scan treats as a separator, and what a digit may be written as.
_SEPARATOR_CHARS = re.compile(r"[\s._/\-\u00ad\u2010-\u2015\u2212\u200b-\u200d\u2060\ufeff]")


def _varied(pan: str) -> bool:
    """At least 4 different digits. A degenerate number (all zeros) can be spelled again by the
    digits beside its mask once separators are ignored, which `as_read` does; a real one cannot."""
    return len(set(pan)) >= 4


@st.composite
def luhn_pans(draw: st.DrawFn) -> str:
    """Any Luhn-valid number a card can begin as (`domain.cards.card_like`), not only the listed
    networks': 2-9 first, or 1 with UATP's 15 digits."""
    length = draw(st.integers(PAN_MIN, PAN_MAX))
    first = draw(st.sampled_from("123456789" if length == 15 else "23456789"))
    body = draw(st.text(string.digits, min_size=length - 2, max_size=length - 2).filter(_varied))
    return luhn_complete(first + body)


@st.composite
def issued_pans(draw: st.DrawFn) -> str:
    """A Luhn-valid number in a length its network issues (what a window must look like)."""
    prefix = draw(st.sampled_from(_ISSUED_PREFIXES))
    length = draw(st.sampled_from(sorted(n for n in issuer_lengths(prefix) if n >= 13)))
    body = draw(st.text(string.digits, min_size=length - 5, max_size=length - 5).filter(_varied))
    return luhn_complete(prefix + body)


def formatted(pan: str, separator: str) -> str:
    return separator.join(pan[i : i + 4] for i in range(0, len(pan), 4))


@st.composite
def pan_forms(draw: st.DrawFn) -> tuple[str, str]:
    """(a card number, the way it is written): grouped behind any separator, in full-width or
    Arabic-Indic digits, or glued to other digits."""
    shape = draw(st.sampled_from(["grouped", "full-width", "arabic-indic", "glued"]))
    if shape == "glued":
        pan = draw(issued_pans())
        before, after = draw(st.tuples(st.text(string.digits, max_size=4), st.text(string.digits, max_size=4))
                             .filter(lambda glue: any(glue)))
        return pan, before + pan + after
    pan = draw(luhn_pans())
    form = formatted(pan, draw(st.sampled_from(SEPARATORS)))
    if shape == "full-width":
        form = form.translate(_FULL_WIDTH).replace(" ", "\u3000")
    elif shape == "arabic-indic":
        form = form.translate(_ARABIC_INDIC)
    return pan, form


def as_read(data: str) -> str:
    """What a reader of `data` could make of it: NFKC, every script's digits as ASCII, no separators."""
    text = unicodedata.normalize("NFKC", data)
    text = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in text)
    return _SEPARATOR_CHARS.sub("", text)


@st.composite
def secrets_case(draw: st.DrawFn) -> tuple[list[str], list[str], Any]:
    """(card numbers, key and token, metadata tree hiding each of them somewhere)."""
    cards = draw(st.lists(pan_forms(), min_size=1, max_size=3))
    key = "sk_test_" + draw(st.text(string.ascii_letters + string.digits, min_size=8))
    token = draw(st.text(string.ascii_letters + string.digits + "-._+/", min_size=8)) + "~"
    forms = [form for _, form in cards] + [key, f"Bearer {token}"]

    def embed(form: str) -> st.SearchStrategy[str]:
        return st.builds(lambda before, after: before + form + after, _before, _after)

    carriers = st.one_of([embed(f) for f in forms])
    # Ints stay below 13 digits so none can spell a card number by chance (int PANs and ints
    # orjson refuses have their own tests above).
    numbers = st.integers(-(10**12), 10**12)
    leaves = st.one_of(carriers, _text, numbers, st.none(), st.booleans())
    keys = st.one_of(carriers, _text)
    tree = draw(
        st.recursive(
            leaves,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
            max_leaves=12,
        )
    )
    # Every form appears at least once, beside wherever the random tree put them.
    pinned = {draw(_text) + str(i): draw(embed(f)) for i, f in enumerate(forms)}
    return [pan for pan, _ in cards], [key, token], {"tree": tree, "pinned": pinned}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=secrets_case())
def test_no_secret_reaches_the_file(
    tmp_path: Path, case: tuple[list[str], list[str], Any]
) -> None:
    pans, credentials, metadata = case
    before = copy.deepcopy(metadata)
    path = tmp_path / f"tx-{next(_counter)}.jsonl"
    writer = JsonLinesWriter(path)
    writer.start()
    build_transaction_logger(writer).info("payment", metadata=metadata)
    writer.close()

    data = path.read_bytes()
    # orjson escapes control characters: undo that, so a "\n" between groups reads as one.
    readable = as_read(json.dumps(json.loads(data), ensure_ascii=False))
    for pan in pans:
        assert pan.encode() not in data
        assert pan not in readable
    for credential in credentials:
        assert credential.encode() not in data
    assert metadata == before
    assert len(data.splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(card=pan_forms())
def test_a_masked_card_keeps_at_least_six_digits_hidden(card: tuple[str, str]) -> None:
    pan, form = card
    out = Redactor().scrub_text(form)
    digits_before = sum(c.isdecimal() for c in form)
    digits_after = sum(c.isdecimal() for c in out)
    assert digits_before - digits_after >= 6
    assert pan not in as_read(out)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 40), data=st.data())
def test_truncation_never_shows_more_than_length_minus_six(length: int, data: st.DataObject) -> None:
    number = data.draw(st.text(string.digits, min_size=length, max_size=length))
    lead, last = truncate_pan(number)
    assert len(lead) + len(last) <= max(0, length - 6)
    assert len(last) == min(4, max(0, length - 6))  # the last 4 first, then the BIN
    assert mask_pan(number).count("*") >= min(length, 6)


_CVC_WORDS = ["cvc", "cvv", "cvc2", "cvv2", "security code", "card verification value", "csc"]


@st.composite
def cvc_keys(draw: st.DrawFn) -> str:
    """A security-code key as someone might spell it: any case, any joiner, a prefix or not."""
    words = draw(st.sampled_from(["", "card ", "payment card ", "shopper "])) + draw(st.sampled_from(_CVC_WORDS))
    joined = draw(st.sampled_from(["_", "-", ".", " ", ""])).join(words.split())
    return "".join(c.upper() if draw(st.booleans()) else c for c in joined)


@settings(max_examples=200, deadline=None)
@given(key=cvc_keys(), code=st.from_regex(r"\A[0-9]{3,4}\Z"),
       outer=st.sampled_from(["card", "paymentMethod", "source", "data"]), nested=st.booleans())
def test_security_codes_under_any_key_spelling_are_hidden(key: str, code: str, outer: str, nested: bool) -> None:
    value: Any = {key: code}
    out = redact({outer: [value] if nested else value})
    assert (out[outer][0] if nested else out[outer]) == {key: REDACTED}


@settings(max_examples=200, deadline=None)
@given(label=st.sampled_from(["cvc", "CVV", "Cvc2", "security code", "Security-Code", "card_cvv"]),
       joiner=st.sampled_from(["=", ": ", " ", ":", '":"', " is "]), code=st.from_regex(r"\A[0-9]{3,4}\Z"),
       before=_before, after=_after)
def test_security_codes_written_inline_never_survive(label: str, joiner: str, code: str, before: str,
                                                     after: str) -> None:
    out = Redactor().scrub_text(before + label + joiner + code + after)
    assert label + joiner + code not in out
    assert label + joiner + REDACTED in out


def _bodies(text: str, key_text: str) -> list[tuple[type[Body], dict[str, Any], str]]:
    """(model, body with `text` in one free-text field, the field path the refusal must name)."""
    card = {"type": "card", "number": VISA, "exp_month": 12, "exp_year": 2030}
    base = {"amount": 1299, "currency": "EUR", "merchant_reference": "order-1", "payment_method": card}
    return [
        (PaymentCreate, {**base, "merchant_reference": text[:128]}, "merchant_reference"),
        (PaymentCreate, {**base, "description": text[:255]}, "description"),
        (PaymentCreate, {**base, "metadata": {"note": text[:500]}}, "metadata.note"),
        (PaymentCreate, {**base, "metadata": {key_text: "x"}}, "metadata"),
        (PaymentCreate, {**base, "payment_method": {**card, "holder_name": text[:100]}}, "payment_method.holder_name"),
        (RefundCreate, {"reason": text[:255]}, "reason"),
        (VoidCreate, {"reason": text[:255]}, "reason"),
    ]


@settings(max_examples=150, deadline=None)
@given(card=pan_forms(), before=_before, after=_after, code=st.from_regex(r"\A[0-9]{3,4}\Z"),
       inline=st.booleans())
def test_the_api_refuses_card_data_in_every_free_text_field(card: tuple[str, str], before: str, after: str,
                                                           code: str, inline: bool) -> None:
    form = f"cvc: {code}" if inline else card[1]
    text = before[-20:] + form + after[:20]
    key_text = before[-4:] + form + after[:4]  # metadata keys hold at most 40 characters
    redactor = Redactor()
    for model, body, field in _bodies(text, key_text):
        with pytest.raises(ApiError) as refused:
            refuse_card_data(model.model_validate(body), redactor)
        # The random text beside the card may spell a secret of its own ("AQE..."): refused either way.
        assert refused.value.code in ("card_data_in_free_text", "secret_in_free_text"), (model.__name__, text)
        assert (refused.value.status, refused.value.field) == (422, field), (model.__name__, field, text)
        assert card[0] not in refused.value.message and code not in refused.value.message


@pytest.mark.parametrize("text", ["42424242 42424242", "4 2 4 2 4 2 4 2 4 2 4 2 4 2 4 2", "5555-55555555-4444",
                                  "note: 37 8282 246310005 ok"])
def test_a_card_in_any_grouping_of_an_issuers_length_is_redacted(text: str) -> None:
    """Not only a card's own grouping (4 first): 8+8, a digit at a time, any split of a number
    with a payment network's prefix and length that passes Luhn (found by the outside attack)."""
    out = Redactor().scrub(text)
    assert out != text and not any(pan in out.replace(" ", "").replace("-", "")
                                   for pan in ("4242424242424242", "5555555555554444", "378282246310005"))
