"""Card numbers, security codes and tokens cannot be printed by accident: not by repr() or str()
of the request model, the domain's Card or PaymentOrder, not in an f-string, not in a
traceback rendered with its locals, not through a JSON serialiser, not into a pickle."""

from __future__ import annotations

import copy
import pickle
import re
import traceback

import orjson
import pytest

from domain.secret import Secret
from domain.types import PaymentOrder
from gateway.http.schemas import CardMethod, PaymentCreate, TokenMethod
from gateway.redaction import REDACTED, Redactor
from tests.conftest import card_payment as _card_payment

PAN = "4111111145551142"
CVC = "737"
TOKEN = "pm_card_visa_3141592653589793"


def card_payment(number: str = PAN, **extra: object) -> dict[str, object]:
    body = _card_payment(number, **extra)
    if body["payment_method"]["type"] == "card":
        body["payment_method"]["cvc"] = CVC
    return body


def leaks(text: str) -> list[str]:
    """The PAN beyond what truncation shows (any 5 of its digits in a row), the CVC, the token."""
    found = [PAN[i : i + 5] for i in range(len(PAN) - 4) if PAN[i : i + 5] in text]
    found += [s for s in (CVC, TOKEN, "3141592653") if s in text]
    return found


def test_nothing_printable_holds_the_card_or_the_token() -> None:
    payload = PaymentCreate.model_validate(card_payment(PAN, description="a gift"))
    assert isinstance(payload.payment_method, CardMethod)
    card = payload.payment_method.to_card()
    token_payload = PaymentCreate.model_validate(card_payment(payment_method={"type": "token", "token": TOKEN}))
    assert isinstance(token_payload.payment_method, TokenMethod)
    order = PaymentOrder(payment_id="pay_x", amount=1299, currency="EUR", capture=True, merchant_reference="order-1",
                         card=card)
    token_order = PaymentOrder(payment_id="pay_y", amount=1299, currency="EUR", capture=True,
                               merchant_reference="order-1", token=token_payload.payment_method.to_secret())
    rendered = [repr(payload), str(payload), repr(token_payload), str(token_payload), repr(card), str(card),
                repr(order), str(order), repr(token_order), str(token_order), f"{card.number} {card.cvc:>8}",
                "%s %r" % (card.number, token_order.token), payload.model_dump_json(), str(payload.model_dump()),
                token_payload.model_dump_json()]

    for text in rendered:
        assert not leaks(text), text
    assert "****1142" in repr(card)  # truncation may show the last four
    # What a provider mapping needs is still there, behind an explicit call.
    assert (card.number.reveal(), card.cvc.reveal() if card.cvc else None) == (PAN, CVC)
    assert token_order.token is not None and token_order.token.reveal() == TOKEN


def _charge(payload: PaymentCreate, order: PaymentOrder) -> None:
    card = order.card
    number, code = (card.number, card.cvc) if card else (None, None)
    raise RuntimeError(f"provider refused the card ({number}, {code})")


def test_a_traceback_with_its_locals_shows_no_card_data() -> None:
    payload = PaymentCreate.model_validate(card_payment(PAN))
    assert isinstance(payload.payment_method, CardMethod)
    order = PaymentOrder(payment_id="pay_x", amount=1299, currency="EUR", capture=True, merchant_reference="order-1",
                         card=payload.payment_method.to_card(), token=Secret(TOKEN))
    with pytest.raises(RuntimeError) as caught:
        _charge(payload, order)

    text = "".join(traceback.TracebackException.from_exception(caught.value, capture_locals=True).format())

    assert "number = " in text and "payload = " in text  # the locals are there, masked
    assert not leaks(text), text


def test_a_secret_refuses_to_be_serialised() -> None:
    secret = Secret(PAN)
    with pytest.raises(TypeError):
        orjson.dumps({"number": secret})
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    assert copy.deepcopy(secret) is secret and secret == Secret(PAN) and secret != Secret(CVC)
    with pytest.raises(TypeError):
        "pan " + secret  # type: ignore[operator]


def test_the_redactor_hides_secret_objects_whole() -> None:
    payload = PaymentCreate.model_validate(card_payment(PAN))
    assert isinstance(payload.payment_method, CardMethod)
    card = payload.payment_method.to_card()
    out = Redactor()(None, "info", {"card": card, "request": payload, "number": card.number})
    assert out["card"]["number"] == out["card"]["cvc"] == REDACTED
    assert not leaks(orjson.dumps(out, default=str).decode())


def test_the_card_number_is_still_validated_behind_the_mask() -> None:
    for number, message in (("4111111145551143", "Luhn"), ("4111 1111 4555 1142", "digits only"),
                            ("41111111455511420000", "at most 19")):
        with pytest.raises(ValueError, match=message) as refused:
            PaymentCreate.model_validate(card_payment(number))
        assert not re.search(r"\d{12}", str(refused.value))
