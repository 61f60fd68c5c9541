"""Stripe mapping: the answers whose class depends on more than the status code, its status
answers, and evidence that stripe-python reads our emulator's `Stripe-Should-Retry` as it
would Stripe's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import requests
import stripe

from domain.outcome import Outcome
from domain.secret import Secret
from domain.types import Card, FollowUp, FollowUpState, Lookup, Operation, PaymentOrder
from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from emulators.stripe import StripeEmulator
from providers.base import ProviderResponse
from providers.stripe.mapping import StripeMapping
from tests.conftest import PROVIDER_KEYS
from tests.gateway_calls import GatewayCalls, start_client

API_KEY = PROVIDER_KEYS["stripe"]  # what the autouse fixture puts in STRIPE_API_KEY
MAPPING = StripeMapping("stripe", API_KEY)


def answer(status: int, doc: dict, headers: dict[str, str] | None = None) -> ProviderResponse:
    return ProviderResponse(status=status, headers=headers or {}, body=orjson.dumps(doc))


CANCELED = {"object": "payment_intent", "id": "pi_1", "status": "canceled"}


@pytest.mark.parametrize(("op", "expected"), [
    (Operation.VOID, Outcome.APPROVED),           # our cancel succeeded
    (Operation.AUTHORIZE, Outcome.HARD_DECLINE),  # an intent canceled before capture holds no charge
    (Operation.CAPTURE, Outcome.HARD_DECLINE),
])
def test_a_canceled_intent_is_an_approval_only_for_a_void(op: Operation, expected: Outcome) -> None:
    result = MAPPING.parse(op, answer(200, CANCELED))
    assert (result.outcome, result.raw_code, result.provider_status) == (expected, "canceled", "canceled")


def test_a_status_query_of_a_canceled_intent_without_a_charge_is_a_decline() -> None:
    status = MAPPING.parse_status(answer(200, CANCELED))
    assert (status.lookup, status.result.outcome, status.charges) == (Lookup.FOUND, Outcome.HARD_DECLINE, 0)


def test_parse_refuses_a_status_answer() -> None:
    """A status answer is `parse_status`'s `StatusAnswer`, never an outcome with a flag."""
    with pytest.raises(ValueError, match="parse_status"):
        MAPPING.parse(Operation.STATUS, answer(200, {"object": "search_result", "data": []}))


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
    (503, {}, Outcome.UNKNOWN),  # Stripe: a 5xx's result is indeterminate
    (503, {"Stripe-Should-Retry": "true"}, Outcome.UNKNOWN),  # "retrying can succeed" is not "not processed"
    (504, {}, Outcome.UNKNOWN),
    (429, {"Retry-After": "2"}, Outcome.UNAVAILABLE),
    (401, {}, Outcome.UNAVAILABLE),
])
def test_error_statuses(status: int, headers: dict[str, str], expected: Outcome) -> None:
    err_type = "idempotency_error" if status == 409 else "api_error"
    result = MAPPING.parse(Operation.AUTHORIZE, answer(status, {"error": {"type": err_type}}, headers))
    assert result.outcome is expected


def test_an_empty_search_is_not_found_but_not_proof() -> None:
    status = MAPPING.parse_status(answer(200, {"object": "search_result", "data": []}))
    assert (status.lookup, status.result.raw_code) == (Lookup.NOT_FOUND, "not_found")
    assert StripeMapping.status_query_consistent is False  # search lags: the engine re-sends instead


@pytest.mark.parametrize(("status", "error", "header", "outcome", "hint"), [
    (500, {"type": "api_error"}, "false", Outcome.UNKNOWN, False),  # a stored 500: retrying only replays it
    (503, {"type": "api_error"}, "true", Outcome.UNKNOWN, True),
    (503, {"type": "api_error"}, None, Outcome.UNKNOWN, None),
    (409, {"type": "idempotency_error", "code": "idempotency_key_in_use"}, "true", Outcome.UNKNOWN, True),
    (429, {"type": "invalid_request_error", "code": "lock_timeout"}, "true", Outcome.UNAVAILABLE, True),
    (400, {"type": "invalid_request_error"}, "true", Outcome.UNAVAILABLE, True),  # turned away before any endpoint ran
    (400, {"type": "invalid_request_error"}, "false", Outcome.REJECTED, False),
    (402, {"type": "card_error", "decline_code": "do_not_honor"}, "false", Outcome.SOFT_DECLINE, False),
    (500, {"type": "api_error"}, "TRUE", Outcome.UNKNOWN, None),  # stripe-python compares exactly
])
def test_stripe_should_retry_is_the_retry_hint_both_ways(status: int, error: dict, header: str | None,
                                                         outcome: Outcome, hint: bool | None) -> None:
    headers = {"Stripe-Should-Retry": header} if header is not None else {}
    result = MAPPING.parse(Operation.AUTHORIZE, answer(status, {"error": error}, headers))
    assert (result.outcome, result.retry_hint) == (outcome, hint)


# --- status answers ------------------------------------------------------------------------------


def _intent(pid: str = "pay_1", status: str = "succeeded", *, charge: Any = "expand", refunds: list | None = None,
            metadata: dict | None = None, **extra: Any) -> dict:
    doc: dict[str, Any] = {"object": "payment_intent", "id": f"pi_{pid}", "amount": 1000, "status": status,
                           "capture_method": "manual", "metadata": {"gateway_payment_id": pid, **(metadata or {})}}
    if charge == "expand":
        charge = {"object": "charge", "id": f"ch_{pid}", "status": "succeeded", "captured": status == "succeeded",
                  "amount_captured": 1000 if status == "succeeded" else 0,
                  "refunds": {"object": "list", "data": refunds or [], "has_more": False}}
    doc["latest_charge"] = charge
    return {**doc, **extra}


def test_status_answer_lists_capture_and_refunds_with_our_keys() -> None:
    refunds = [{"object": "refund", "id": "re_2", "amount": 300, "status": "pending", "metadata": {}},
               {"object": "refund", "id": "re_1", "amount": 200, "status": "succeeded",
                "metadata": {"gateway_follow_up": "k-refund"}}]
    status = MAPPING.parse_status(answer(200, _intent(refunds=refunds, metadata={"gateway_capture": "k-capture"})))
    assert (status.lookup, status.result.outcome, status.result.reference, status.charges) == (
        Lookup.FOUND, Outcome.APPROVED, "pi_pay_1", 1)
    assert status.follow_ups_listed
    assert status.follow_ups == (
        FollowUpState(Operation.CAPTURE, "k-capture", 1000, Outcome.APPROVED),
        FollowUpState(Operation.REFUND, None, 300, Outcome.UNKNOWN),  # pending: Stripe is still on it
        FollowUpState(Operation.REFUND, "k-refund", 200, Outcome.APPROVED),
    )


def test_status_answer_of_a_canceled_intent_depends_on_its_charge() -> None:
    voided = MAPPING.parse_status(answer(200, _intent(status="canceled")))
    assert (voided.result.outcome, voided.charges) == (Outcome.APPROVED, 1)  # authorised, then voided
    assert voided.follow_ups == (FollowUpState(Operation.VOID, None, 1000, Outcome.APPROVED),)
    never = MAPPING.parse_status(answer(200, _intent(status="canceled", charge=None)))
    assert (never.result.outcome, never.charges, never.follow_ups) == (Outcome.HARD_DECLINE, 0, ())


def test_status_answer_counts_charged_intents_and_reports_the_charge() -> None:
    declined = _intent("pay_1", "requires_payment_method", charge=None,
                       last_payment_error={"type": "card_error", "decline_code": "stolen_card"})
    doc = {"object": "search_result", "data": [declined, _intent("pay_1"), _intent("pay_1", id="pi_second")],
           "has_more": False}
    status = MAPPING.parse_status(answer(200, doc))
    assert (status.lookup, status.charges, status.result.outcome) == (Lookup.FOUND, 2, Outcome.APPROVED)
    alone = MAPPING.parse_status(answer(200, {"object": "search_result", "data": [declined]}))
    assert (alone.result.outcome, alone.result.raw_code, alone.charges) == (Outcome.HARD_DECLINE, "stolen_card", 0)


@pytest.mark.parametrize(("status", "doc", "lookup"), [
    (200, {"object": "search_result", "data": [], "has_more": False}, Lookup.NOT_FOUND),
    (404, {"error": {"type": "invalid_request_error", "code": "resource_missing"}}, Lookup.UNKNOWN),
    (500, {"error": {"type": "api_error"}}, Lookup.UNKNOWN),
    (503, {}, Lookup.UNKNOWN),
    (401, {"error": {"type": "invalid_request_error"}}, Lookup.UNKNOWN),
])
def test_only_an_empty_search_is_not_found(status: int, doc: dict, lookup: Lookup) -> None:
    answered = MAPPING.parse_status(answer(status, doc))
    assert (answered.lookup, answered.charges, answered.follow_ups) == (lookup, 0, ())


def test_an_unexpanded_charge_leaves_the_follow_ups_unlisted() -> None:
    status = MAPPING.parse_status(answer(200, _intent(charge="ch_1")))
    assert (status.result.outcome, status.charges, status.follow_ups_listed) == (Outcome.APPROVED, 1, False)


def test_follow_ups_send_our_key_where_stripe_echoes_it() -> None:
    follow = FollowUp(payment_id="pay_1", provider_reference="pi_1", amount=300, follow_up_id="k-1")
    capture = parse_qs((MAPPING.build(Operation.CAPTURE, follow, "k-1").body or b"").decode())
    assert capture == {"amount_to_capture": ["300"], "metadata[gateway_capture]": ["k-1"]}
    refund = parse_qs((MAPPING.build(Operation.REFUND, follow, "k-1").body or b"").decode())
    assert refund == {"payment_intent": ["pi_1"], "amount": ["300"], "metadata[gateway_follow_up]": ["k-1"]}
    by_id = urlsplit(MAPPING.build(Operation.STATUS, follow, None).path)
    assert (by_id.path, parse_qs(by_id.query)) == ("/v1/payment_intents/pi_1", {"expand[]": ["latest_charge.refunds"]})
    search = parse_qs(urlsplit(MAPPING.build(Operation.STATUS, FollowUp("pay_1", None), None).path).query)
    assert search["expand[]"] == ["data.latest_charge.refunds"]


# --- the emulator: Stripe-Should-Retry where Stripe sends it, read by stripe-python --------------


@pytest.fixture
async def server() -> AsyncIterator[EmulatorServer]:
    srv = EmulatorServer(StripeEmulator(api_key=API_KEY))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def gateway(server: EmulatorServer) -> AsyncIterator[GatewayCalls]:
    calls = GatewayCalls(await start_client("stripe", server.url))
    try:
        yield calls
    finally:
        await calls.close()


def _order(pid: str) -> PaymentOrder:
    return PaymentOrder(payment_id=pid, amount=1000, currency="EUR", capture=True, merchant_reference=f"m-{pid}",
                        card=Card(number=Secret("4242424242424242"), exp_month=3, exp_year=2030, cvc=Secret("123")))


async def test_emulator_marks_a_stored_500_not_retryable_first_and_on_replay(
        server: EmulatorServer, gateway: GatewayCalls) -> None:
    server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=500, after_processing=True),)))
    order = _order("pay_stored_500")
    first = await gateway.call(Operation.AUTHORIZE, order, "k-500")
    server.emulator.faults.clear()
    replay = await gateway.call(Operation.AUTHORIZE, order, "k-500")
    assert (first.outcome, first.retry_hint) == (Outcome.UNKNOWN, False)
    assert (replay.outcome, replay.retry_hint, replay.http_status) == (Outcome.UNKNOWN, False, 500)
    # The wire evidence that the second answer was Stripe's replay, not a new run of the endpoint.
    wire = await gateway.transport.send(gateway.mapping.build(Operation.AUTHORIZE, order, "k-500"), 2.0)
    assert (wire.status, wire.headers["Idempotent-Replayed"]) == (500, "true")
    assert len(server.emulator.ledger.charges()) == 1  # charged: the 500 came after processing


async def test_emulator_marks_an_error_before_processing_retryable(
        server: EmulatorServer, gateway: GatewayCalls) -> None:
    server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=503),)))
    order = _order("pay_503")
    result = await gateway.call(Operation.AUTHORIZE, order, "k-503")
    assert (result.outcome, result.retry_hint) == (Outcome.UNKNOWN, True)
    server.emulator.faults.clear()
    retried = await gateway.call(Operation.AUTHORIZE, order, "k-503")
    assert retried.outcome is Outcome.APPROVED  # nothing was stored for the key: the retry ran
    assert len(server.emulator.ledger.charges()) == 1


class _Session(requests.Session):
    """A loopback session (no proxies from the environment) that records every answer it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self.answers: list[tuple[int, str | None]] = []
        self.hooks["response"].append(self._record)

    def _record(self, response: requests.Response, *_args: Any, **_kwargs: Any) -> None:
        self.answers.append((response.status_code, response.headers.get("Stripe-Should-Retry")))


@pytest.fixture
def session() -> Iterator[_Session]:
    s = _Session()
    try:
        yield s
    finally:
        s.close()


def _sdk_create(url: str, session: _Session, key: str) -> str:
    client = stripe.StripeClient(API_KEY, base_addresses={"api": url}, max_network_retries=1,
                                 http_client=stripe.RequestsClient(session=session))
    params: Any = {"amount": 1000, "currency": "eur", "confirm": True, "payment_method": "pm_card_visa",
                   "metadata": {"gateway_payment_id": key}}
    try:
        return client.v1.payment_intents.create(params, {"idempotency_key": key}).status
    except stripe.APIError as exc:
        return f"error {exc.http_status}"


async def test_stripe_python_retries_on_true_and_stops_on_false(server: EmulatorServer, session: _Session) -> None:
    server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=503),)))
    assert await asyncio.to_thread(_sdk_create, server.url, session, "sdk-503") == "error 503"
    assert session.answers == [(503, "true"), (503, "true")]  # retried once, as max_network_retries allows
    session.answers.clear()
    server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=500, after_processing=True),)))
    assert await asyncio.to_thread(_sdk_create, server.url, session, "sdk-500") == "error 500"
    assert session.answers == [(500, "false")]  # "false": the SDK does not retry a stored 500
    assert len(server.emulator.ledger.charges()) == 1
