"""Stripe mapping: the answers whose class depends on more than the status code."""

from __future__ import annotations

import orjson
import pytest

from domain.outcome import Outcome
from domain.types import Operation
from providers.base import ProviderResponse
from providers.stripe.mapping import StripeMapping

MAPPING = StripeMapping("stripe", "sk_test_x")


def answer(status: int, doc: dict, headers: dict[str, str] | None = None) -> ProviderResponse:
    return ProviderResponse(status=status, headers=headers or {}, body=orjson.dumps(doc))


@pytest.mark.parametrize(("op", "expected"), [
    (Operation.VOID, Outcome.APPROVED),           # our cancel succeeded
    (Operation.STATUS, Outcome.HARD_DECLINE),     # an intent canceled before capture holds no charge
    (Operation.AUTHORIZE, Outcome.HARD_DECLINE),
])
def test_a_canceled_intent_is_an_approval_only_for_a_void(op: Operation, expected: Outcome) -> None:
    result = MAPPING.parse(op, answer(200, {"object": "payment_intent", "id": "pi_1", "status": "canceled"}))
    assert result.outcome is expected


@pytest.mark.parametrize(("error", "expected"), [
    ({"type": "card_error", "code": "card_declined", "decline_code": "stolen_card"}, Outcome.HARD_DECLINE),
    ({"type": "card_error", "code": "incorrect_number"}, Outcome.HARD_DECLINE),
    ({"type": "card_error", "code": "expired_card"}, Outcome.HARD_DECLINE),
    ({"type": "card_error", "code": "processing_error"}, Outcome.SOFT_DECLINE),
    ({"type": "card_error", "code": "something_new"}, Outcome.SOFT_DECLINE),
    ({"type": "invalid_request_error", "code": "parameter_missing"}, Outcome.REJECTED),
    ({"type": "idempotency_error"}, Outcome.REJECTED),
])
def test_every_card_error_is_a_decline(error: dict, expected: Outcome) -> None:
    status = 402 if error["type"] == "card_error" else 400
    assert MAPPING.parse(Operation.AUTHORIZE, answer(status, {"error": error})).outcome is expected


@pytest.mark.parametrize(("status", "headers", "expected"), [
    (409, {"Stripe-Should-Retry": "true"}, Outcome.UNKNOWN),  # key in use: the first may still charge
    (500, {}, Outcome.UNKNOWN),
    (502, {}, Outcome.UNKNOWN),
    (503, {}, Outcome.UNAVAILABLE),
    (504, {}, Outcome.UNKNOWN),
    (429, {"Retry-After": "2"}, Outcome.UNAVAILABLE),
    (401, {}, Outcome.UNAVAILABLE),
])
def test_error_statuses(status: int, headers: dict[str, str], expected: Outcome) -> None:
    err_type = "idempotency_error" if status == 409 else "api_error"
    result = MAPPING.parse(Operation.AUTHORIZE, answer(status, {"error": {"type": err_type}}, headers))
    assert result.outcome is expected


def test_an_empty_search_is_not_found_but_not_proof() -> None:
    result = MAPPING.parse(Operation.STATUS, answer(200, {"object": "search_result", "data": []}))
    assert not result.found
    assert StripeMapping.status_query_consistent is False  # search lags: the engine re-sends instead
