"""Checkout.com specifics: its idempotency (only 2xx stored), the response-code table, its test
cards, and evidence that the official `checkout-sdk` speaks to our emulator as it would to the
sandbox, over the same paths our mapping uses."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any

import orjson
import pytest
import requests
from checkout_sdk.checkout_sdk import CheckoutSdk
from checkout_sdk.common.enums import Currency
from checkout_sdk.environment import Environment
from checkout_sdk.exception import CheckoutApiException
from checkout_sdk.http_client_interface import HttpClientBuilderInterface
from checkout_sdk.payments.payments import (
    CaptureRequest,
    PaymentRequest,
    PaymentRequestCardSource,
    PaymentsQueryFilter,
    RefundRequest,
    VoidRequest,
)

from domain.outcome import Outcome
from domain.secret import Secret
from domain.types import Card, FollowUp, FollowUpState, Lookup, Operation, PaymentOrder, ProviderResult
from providers.base import ProviderRequest, ProviderResponse
from emulators.checkout import SCENARIO_CARDS, TEST_CARDS, CheckoutEmulator
from providers.checkout.mapping import IDEMPOTENCY_HEADER, CheckoutMapping, decline_outcome
from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from tests.gateway_calls import GatewayCalls, start_client

# Matches the SDK's own key check: ^sk_(sbox_)?[a-z2-7]{26}[a-z2-7*#$=]$
SANDBOX_KEY = "sk_sbox_" + "m2kq7vaxyz3bcdefghijklmnop" + "q"
SANDBOX_KEY_ENV = "CHECKOUT_SANDBOX_KEY"  # where the gateway's config reads it from


@pytest.fixture(autouse=True)
def _sandbox_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SANDBOX_KEY_ENV, SANDBOX_KEY)


@dataclass
class Rig(GatewayCalls):
    server: EmulatorServer
    emulator: CheckoutEmulator

    async def send(self, op: Operation, request: ProviderRequest) -> ProviderResult:
        """A request the gateway never builds (an old-style auth header), sent as is and
        classified by the mapping."""
        return self.mapping.parse(op, await self.transport.send(request, 2.0))


@asynccontextmanager
async def _rig(emulator: CheckoutEmulator) -> AsyncIterator[Rig]:
    server = EmulatorServer(emulator)
    await server.start()
    try:
        r = Rig(await start_client("checkout", server.url, api_key_env=SANDBOX_KEY_ENV), server, emulator)
        try:
            yield r
        finally:
            await r.close()
    finally:
        await server.stop()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with _rig(CheckoutEmulator(api_key=SANDBOX_KEY)) as r:
        yield r


_seq = count(1)


def order(card: str = "4242424242424242", *, amount: int = 1000, capture: bool = True, exp_year: int = 2030,
          pid: str | None = None) -> PaymentOrder:
    pid = pid or f"pay_cko_{next(_seq)}"
    return PaymentOrder(payment_id=pid, amount=amount, currency="eur", capture=capture, merchant_reference=f"ord-{pid}",
                        card=Card(number=Secret(card), exp_month=3, exp_year=exp_year, cvc=Secret("100"), holder_name="J Smith"))


def by_ref(o: PaymentOrder) -> FollowUp:
    return FollowUp(payment_id=o.payment_id, provider_reference=None)


def answer(status: int, doc: Any = None, headers: dict[str, str] | None = None) -> ProviderResponse:
    return ProviderResponse(status=status, headers=headers or {}, body=b"" if doc is None else orjson.dumps(doc))


def luhn(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits)) % 10 == 0


# --- the request shape -------------------------------------------------------------------------


def test_authorize_request_is_checkout_shaped() -> None:
    mapping = CheckoutMapping("checkout", "sk_sbox_x", merchant_account="pc_test")
    o = order(capture=False)
    request = mapping.build(Operation.AUTHORIZE, o, "idem-1")
    assert (request.method, request.path) == ("POST", "/payments")
    assert request.headers["Authorization"] == "Bearer sk_sbox_x"
    assert request.headers[IDEMPOTENCY_HEADER] == "idem-1"
    assert request.headers["Content-Type"] == "application/json"
    body = orjson.loads(request.body or b"")
    assert body["source"] == {"type": "card", "number": "4242424242424242", "expiry_month": 3, "expiry_year": 2030,
                              "cvv": "100", "name": "J Smith"}
    assert (body["amount"], body["currency"], body["reference"], body["capture"]) == (1000, "EUR", o.payment_id, False)
    assert body["processing_channel_id"] == "pc_test"
    stored = PaymentOrder(payment_id="p1", amount=5, currency="EUR", capture=True, merchant_reference="m",
                          token=Secret("src_abc"))
    assert orjson.loads(mapping.build(Operation.AUTHORIZE, stored, "k").body or b"")["source"] == {
        "type": "id", "id": "src_abc"}
    frames = PaymentOrder(payment_id="p2", amount=5, currency="EUR", capture=True, merchant_reference="m",
                          token=Secret("tok_abc"))
    assert orjson.loads(mapping.build(Operation.AUTHORIZE, frames, "k").body or b"")["source"] == {
        "type": "token", "token": "tok_abc"}


def test_follow_up_and_status_paths() -> None:
    mapping = CheckoutMapping("checkout", "sk_sbox_x")
    follow = FollowUp(payment_id="p1", provider_reference="pay_abc", amount=300, follow_up_id="cap-1")
    capture = mapping.build(Operation.CAPTURE, follow, "k-c")
    assert (capture.method, capture.path) == ("POST", "/payments/pay_abc/captures")
    assert orjson.loads(capture.body or b"") == {"amount": 300, "reference": "cap-1"}
    assert mapping.build(Operation.REFUND, follow, "k-r").path == "/payments/pay_abc/refunds"
    void = mapping.build(Operation.VOID, follow, "k-v")
    assert void.path == "/payments/pay_abc/voids" and "amount" not in orjson.loads(void.body or b"")
    status = mapping.build(Operation.STATUS, FollowUp(payment_id="p1", provider_reference="pay_abc"), None)
    assert (status.method, status.path, status.body) == ("GET", "/payments/pay_abc", None)
    assert IDEMPOTENCY_HEADER not in status.headers
    # A status query about a follow-up reads the payment's actions, where the follow-ups are listed.
    assert mapping.build(Operation.STATUS, follow, None).path == "/payments/pay_abc/actions"
    listing = mapping.build(Operation.STATUS, FollowUp(payment_id="p 1", provider_reference=None), None)
    assert listing.path == "/payments?reference=p+1&limit=10&skip=0"
    with pytest.raises(ValueError):
        mapping.build(Operation.CAPTURE, FollowUp(payment_id="p1", provider_reference=None), "k")


# --- the response-code table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("10000", Outcome.APPROVED),
        ("20005", Outcome.SOFT_DECLINE),  # do not honour
        ("20068", Outcome.SOFT_DECLINE),  # issuer timeout
        ("20091", Outcome.SOFT_DECLINE),  # issuer unavailable
        ("20001", Outcome.SOFT_DECLINE),  # refer to issuer
        ("20051", Outcome.HARD_DECLINE),  # insufficient funds
        ("20054", Outcome.HARD_DECLINE),  # expired card
        ("20014", Outcome.HARD_DECLINE),  # invalid card number
        ("20059", Outcome.HARD_DECLINE),  # suspected fraud
        ("20087", Outcome.HARD_DECLINE),  # bad track data
        ("20046", Outcome.HARD_DECLINE),  # account closed
        ("200N7", Outcome.HARD_DECLINE),  # CVV2 failure
        ("30041", Outcome.HARD_DECLINE),  # lost card
        ("30043", Outcome.HARD_DECLINE),  # stolen card
        ("40101", Outcome.HARD_DECLINE),  # risk blocked
        ("20999", Outcome.SOFT_DECLINE),  # unlisted: the 20xxx range is soft
        ("30999", Outcome.HARD_DECLINE),  # unlisted: the 30xxx range is hard
        ("40999", Outcome.HARD_DECLINE),  # unlisted: risk responses are hard
    ],
)
def test_response_code_table(code: str, expected: Outcome) -> None:
    approved = code.startswith("1")
    doc = {"id": "pay_x", "action_id": "act_x", "approved": approved,
           "status": "Authorized" if approved else "Declined", "response_code": code, "response_summary": "summary"}
    result = CheckoutMapping("checkout", "sk_sbox_x").parse(Operation.AUTHORIZE, answer(201, doc))
    assert (result.outcome, result.raw_code, result.reference, result.message) == (expected, code, "pay_x", "summary")
    if not approved:
        assert decline_outcome(code) is expected


@pytest.mark.parametrize(
    ("status", "doc", "headers", "op", "expected"),
    [
        (202, {"id": "pay_p", "status": "Pending", "_links": {"redirect": {"href": "https://3ds"}}}, {},
         Operation.AUTHORIZE, Outcome.ACTION_REQUIRED),  # the shopper authenticates first: never fail over
        (202, {"id": "pay_p", "status": "Pending"}, {},
         Operation.AUTHORIZE, Outcome.UNKNOWN),  # pending with nothing for a shopper: answer pending
        (202, {"action_id": "act_1"}, {}, Operation.CAPTURE, Outcome.APPROVED),  # action accepted
        (202, {"action_id": "act_2"}, {}, Operation.REFUND, Outcome.APPROVED),
        (202, {"action_id": "act_3"}, {}, Operation.VOID, Outcome.APPROVED),
        (401, None, {}, Operation.AUTHORIZE, Outcome.UNAVAILABLE),
        (403, None, {}, Operation.VOID, Outcome.REJECTED),
        (422, {"request_id": "r", "error_type": "request_invalid", "error_codes": ["card_number_invalid"]}, {},
         Operation.AUTHORIZE, Outcome.REJECTED),
        (429, None, {"Retry-After": "3"}, Operation.AUTHORIZE, Outcome.UNAVAILABLE),  # a rate limit
        (429, None, {}, Operation.AUTHORIZE, Outcome.UNKNOWN),  # a concurrent request with our key
        (500, None, {}, Operation.AUTHORIZE, Outcome.UNKNOWN),
        (502, None, {}, Operation.AUTHORIZE, Outcome.UNKNOWN),  # a proxy's answer: may have been processed
        (503, None, {}, Operation.AUTHORIZE, Outcome.UNKNOWN),  # Checkout documents no "not processed" 5xx
        (504, None, {}, Operation.CAPTURE, Outcome.UNKNOWN),
    ],
)
def test_answer_classification(status: int, doc: Any, headers: dict[str, str], op: Operation,
                               expected: Outcome) -> None:
    result = CheckoutMapping("checkout", "sk_sbox_x").parse(op, answer(status, doc, headers))
    assert result.outcome is expected, result


@pytest.mark.parametrize(
    ("status", "doc", "lookup", "expected"),
    [
        (200, {"id": "pay_v", "status": "Voided", "approved": True}, Lookup.FOUND, Outcome.APPROVED),
        (200, {"id": "pay_d", "status": "Declined", "approved": False}, Lookup.FOUND, Outcome.HARD_DECLINE),
        # A 404 by id is no proof of absence (a proxy, a wrong path): only the explicit empty list is.
        (404, None, Lookup.UNKNOWN, Outcome.REJECTED),
        (429, None, Lookup.UNKNOWN, Outcome.UNAVAILABLE),  # reads carry no key: a plain rate limit
    ],
)
def test_status_answer_classification(status: int, doc: Any, lookup: Lookup, expected: Outcome) -> None:
    answered = CheckoutMapping("checkout", "sk_sbox_x").parse_status(answer(status, doc))
    assert (answered.lookup, answered.result.outcome) == (lookup, expected), answered


# --- test cards ---------------------------------------------------------------------------------


def test_scenario_cards_are_public_luhn_valid_test_cards() -> None:
    assert set(SCENARIO_CARDS) == {"approve", "insufficient_funds", "stolen_card", "do_not_honor", "issuer_unavailable"}
    assert all(luhn(number) for number in TEST_CARDS)
    assert {name: TEST_CARDS[number] for name, number in SCENARIO_CARDS.items()} == {
        "approve": None, "insufficient_funds": "20051", "stolen_card": "30043", "do_not_honor": "20005",
        "issuer_unavailable": "20068"}


@pytest.mark.parametrize(("number", "code"), sorted(TEST_CARDS.items()))
async def test_each_test_card_answers_its_response_code(rig: Rig, number: str, code: str | None) -> None:
    o = order(number)
    result = await rig.call(Operation.AUTHORIZE, o, f"{o.payment_id}-k")
    assert result.http_status == 201
    assert result.raw_code == (code or "10000")
    assert result.outcome is (Outcome.APPROVED if code is None else decline_outcome(code))
    assert result.reference and result.reference.startswith("pay_")
    assert len(rig.emulator.ledger.charges()) == (1 if code is None else 0)


async def test_amount_triggers_are_the_previous_platforms_and_off_by_default(rig: Rig) -> None:
    plain = await rig.call(Operation.AUTHORIZE, order(amount=1051), "k-plain")
    assert plain.outcome is Outcome.APPROVED
    async with _rig(CheckoutEmulator(amount_triggers=True)) as legacy:
        cases = {1051: ("20051", Outcome.HARD_DECLINE), 1205: ("20005", Outcome.SOFT_DECLINE),
                 9998: ("20068", Outcome.SOFT_DECLINE), 4001: ("40101", Outcome.HARD_DECLINE),
                 1000: ("10000", Outcome.APPROVED)}
        for amount, (code, outcome) in cases.items():
            result = await legacy.call(Operation.AUTHORIZE, order(amount=amount), f"k-amount-{amount}")
            assert (result.raw_code, result.outcome) == (code, outcome)


async def test_expired_or_invalid_card_is_rejected_not_declined(rig: Rig) -> None:
    expired = await rig.call(Operation.AUTHORIZE, order(exp_year=2001), "k-expired")
    assert (expired.outcome, expired.http_status, expired.raw_code) == (Outcome.REJECTED, 422, "card_expired")
    invalid = await rig.call(Operation.AUTHORIZE, order("4242424242424241"), "k-luhn")
    assert (invalid.outcome, invalid.raw_code) == (Outcome.REJECTED, "card_number_invalid")
    assert rig.emulator.ledger.snapshot()["entries"] == []


# --- idempotency: only 2xx answers are stored ---------------------------------------------------


async def test_retry_after_a_500_that_followed_processing_charges_a_second_time(rig: Rig) -> None:
    """The danger the engine must avoid: Checkout does not store a 5xx answer for the key, so a
    blind retry with the same key is processed as a new payment."""
    rig.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=500, after_processing=True),)))
    o = order()
    first = await rig.call(Operation.AUTHORIZE, o, "k-500")
    assert (first.outcome, first.http_status) == (Outcome.UNKNOWN, 500)
    assert CheckoutMapping.replays_answers is False  # so the engine asks for the status first
    assert len(rig.emulator.ledger.charges()) == 1  # charged, though the answer said 500
    rig.emulator.faults.clear()
    retry = await rig.call(Operation.AUTHORIZE, o, "k-500")
    assert retry.outcome is Outcome.APPROVED
    charges = rig.emulator.ledger.charges()
    assert len(charges) == 2 and {c.idempotency_key for c in charges} == {"k-500"}
    assert retry.reference != charges[0].id
    assert rig.emulator.ledger.duplicates() == {o.payment_id: 2}
    # A status query by reference surfaces both charges, so reconciliation can see the duplicate.
    status = await rig.status(by_ref(o))
    assert (status.lookup, status.charges, status.result.outcome) == (Lookup.FOUND, 2, Outcome.APPROVED)
    assert status.result.reference == retry.reference  # newest first: the duplicate is the one reported


async def test_status_query_after_a_500_finds_the_charge_without_a_retry(rig: Rig) -> None:
    """The safe path: settle the 500 with `GET /payments?reference=` instead of re-sending."""
    rig.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=500, after_processing=True),)))
    o = order()
    assert (await rig.call(Operation.AUTHORIZE, o, "k-500-safe")).outcome is Outcome.UNKNOWN
    rig.emulator.faults.clear()
    status = await rig.status(by_ref(o))
    assert (status.lookup, status.result.outcome, status.result.provider_status) == (
        Lookup.FOUND, Outcome.APPROVED, "Captured")
    assert status.result.reference == rig.emulator.ledger.charges()[0].id
    assert len(rig.emulator.ledger.charges()) == 1


async def test_a_decline_is_a_2xx_and_is_replayed_not_reprocessed(rig: Rig) -> None:
    o = order(SCENARIO_CARDS["insufficient_funds"])
    first = await rig.call(Operation.AUTHORIZE, o, "k-decline")
    second = await rig.call(Operation.AUTHORIZE, o, "k-decline")
    assert first.outcome is second.outcome is Outcome.HARD_DECLINE
    assert first.reference == second.reference
    assert len(rig.emulator.ledger.snapshot()["entries"]) == 1


async def test_a_422_is_not_stored_so_the_key_can_carry_the_corrected_request(rig: Rig) -> None:
    bad = order(exp_year=2001, pid="pay_fixed")
    assert (await rig.call(Operation.AUTHORIZE, bad, "k-fix")).http_status == 422
    fixed = await rig.call(Operation.AUTHORIZE, order(pid="pay_fixed"), "k-fix")
    assert fixed.outcome is Outcome.APPROVED  # not a key/body mismatch: the 422 left nothing behind


async def test_same_key_with_another_body_is_rejected(rig: Rig) -> None:
    await rig.call(Operation.AUTHORIZE, order(pid="pay_same"), "k-reuse")
    other = await rig.call(Operation.AUTHORIZE, order(pid="pay_same", amount=2000), "k-reuse")
    assert (other.outcome, other.http_status, other.raw_code) == (Outcome.REJECTED, 422, "idempotency_key_reused")
    assert len(rig.emulator.ledger.charges()) == 1


async def test_duplicate_while_the_first_is_in_flight_is_429_and_unknown(rig: Rig) -> None:
    rig.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="latency", latency_ms=300, operations=("authorize",)),)))
    o = order()
    results = await asyncio.gather(rig.call(Operation.AUTHORIZE, o, "k-flight"),
                                   rig.call(Operation.AUTHORIZE, o, "k-flight"))
    approved = [r for r in results if r.outcome is Outcome.APPROVED]
    in_flight = [r for r in results if r.outcome is Outcome.UNKNOWN]
    assert len(approved) == 1 and len(in_flight) == 1
    assert (in_flight[0].http_status, in_flight[0].retry_after_s) == (429, None)
    rig.emulator.faults.clear()
    replay = await rig.call(Operation.AUTHORIZE, o, "k-flight")  # the first finished with a 201: stored
    assert (replay.outcome, replay.reference) == (Outcome.APPROVED, approved[0].reference)
    assert len(rig.emulator.ledger.charges()) == 1


async def test_rate_limit_is_429_with_retry_after_and_unavailable(rig: Rig) -> None:
    rig.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="rate_limit", retry_after_s=3),)))
    result = await rig.call(Operation.AUTHORIZE, order(), "k-rl")
    assert (result.outcome, result.http_status, result.retry_after_s) == (Outcome.UNAVAILABLE, 429, 3)


async def test_status_query_during_processing_finds_the_pending_payment(rig: Rig) -> None:
    """The payment exists before the issuer answers, so a failover check sees it and waits."""
    rig.emulator.faults.set(FaultPlan(rules=(
        FaultRule(kind="latency", latency_ms=600, operations=("authorize",)),
        FaultRule(kind="latency", latency_ms=150, operations=("status",)),
    )))
    o = order()
    authorize = asyncio.ensure_future(rig.call(Operation.AUTHORIZE, o, "k-slow"))
    status = await rig.status(by_ref(o))
    assert (status.lookup, status.result.outcome, status.result.provider_status) == (
        Lookup.FOUND, Outcome.UNKNOWN, "Pending")
    assert (await authorize).outcome is Outcome.APPROVED


async def test_unknown_payment_is_not_found_by_reference_or_by_id(rig: Rig) -> None:
    never_sent = FollowUp(payment_id="pay_never_sent", provider_reference=None)
    by_reference = await rig.status(never_sent)
    assert (by_reference.lookup, by_reference.result.raw_code) == (Lookup.NOT_FOUND, "not_found")
    by_id = await rig.status(FollowUp(payment_id="x", provider_reference="pay_missing"))
    # A 404 by id is not proof of absence (a proxy, a wrong path): only the empty list is.
    assert (by_id.lookup, by_id.result.http_status) == (Lookup.UNKNOWN, 404)


# --- status answers -----------------------------------------------------------------------------


def test_status_answer_from_the_actions_list() -> None:
    actions = [
        {"id": "act_4", "type": "Refund", "amount": 200, "approved": True, "response_code": "10000",
         "reference": "k-refund"},
        {"id": "act_3", "type": "Refund", "amount": 100, "approved": False, "response_code": "20005"},
        {"id": "act_2", "type": "Capture", "amount": 600, "approved": True, "response_code": "10000",
         "reference": "k-capture"},
        {"id": "act_1", "type": "Authorization", "amount": 1000, "approved": True, "response_code": "10000"},
    ]
    status = CheckoutMapping("checkout", "sk_sbox_x").parse_status(answer(200, actions, {"Cko-Request-Id": "r1"}))
    assert (status.lookup, status.result.outcome, status.charges, status.follow_ups_listed) == (
        Lookup.FOUND, Outcome.APPROVED, 1, True)
    assert status.result.extra == {"request_id": "r1"}
    assert status.follow_ups == (
        FollowUpState(Operation.REFUND, "k-refund", 200, Outcome.APPROVED),
        FollowUpState(Operation.REFUND, None, 100, Outcome.HARD_DECLINE),
        FollowUpState(Operation.CAPTURE, "k-capture", 600, Outcome.APPROVED),
    )
    declined = [{"id": "act_1", "type": "Authorization", "amount": 1000, "approved": False, "response_code": "30043"}]
    refused = CheckoutMapping("checkout", "sk_sbox_x").parse_status(answer(200, declined))
    assert (refused.result.outcome, refused.result.raw_code, refused.charges) == (Outcome.HARD_DECLINE, "30043", 0)
    pending = CheckoutMapping("checkout", "sk_sbox_x").parse_status(answer(200, []))
    assert (pending.lookup, pending.result.outcome) == (Lookup.FOUND, Outcome.UNKNOWN)  # nothing authorised yet


@pytest.mark.parametrize(("status", "doc", "lookup"), [
    (200, {"limit": 10, "skip": 0, "total_count": 0, "data": []}, Lookup.NOT_FOUND),  # the explicit empty list
    (404, None, Lookup.UNKNOWN),  # a bare 404 is no proof: a proxy, a wrong path
    (500, None, Lookup.UNKNOWN),
    (503, None, Lookup.UNKNOWN),
    (401, None, Lookup.UNKNOWN),
    (200, None, Lookup.UNKNOWN),  # an empty body is no answer
])
def test_only_an_explicit_empty_list_is_not_found(status: int, doc: Any, lookup: Lookup) -> None:
    assert CheckoutMapping("checkout", "sk_sbox_x").parse_status(answer(status, doc)).lookup is lookup


async def test_status_by_id_reports_the_payment_and_its_actions_the_follow_ups(rig: Rig) -> None:
    o = order(capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-a")
    follow = FollowUp(o.payment_id, auth.reference, amount=600, follow_up_id="k-cap")
    await rig.call(Operation.CAPTURE, follow, "k-cap")
    await rig.call(Operation.REFUND, FollowUp(o.payment_id, auth.reference, amount=200, follow_up_id="k-ref"), "k-ref")
    details = await rig.status(FollowUp(o.payment_id, auth.reference))
    assert (details.lookup, details.result.provider_status, details.charges) == (
        Lookup.FOUND, "Partially Refunded", 1)
    assert not details.follow_ups_listed  # the payment's details carry balances, not the actions
    actions = await rig.status(follow)
    assert (actions.result.outcome, actions.charges, actions.follow_ups_listed) == (Outcome.APPROVED, 1, True)
    assert actions.follow_ups == (FollowUpState(Operation.REFUND, "k-ref", 200, Outcome.APPROVED),
                                  FollowUpState(Operation.CAPTURE, "k-cap", 600, Outcome.APPROVED))


# --- auth ---------------------------------------------------------------------------------------


async def test_401_without_bearer_or_with_another_key(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    request = rig.mapping.build(Operation.AUTHORIZE, order(), "k-auth")
    previous_style = ProviderRequest(request.method, request.path,
                                     {**request.headers, "Authorization": SANDBOX_KEY}, request.body)
    result = await rig.send(Operation.AUTHORIZE, previous_style)
    assert (result.outcome, result.http_status, result.raw_code) == (Outcome.UNAVAILABLE, 401, "http_401")
    assert result.extra.get("request_id")
    monkeypatch.setenv("CHECKOUT_OTHER_KEY", "sk_sbox_someoneelse")
    other = GatewayCalls(await start_client("checkout", rig.server.url, api_key_env="CHECKOUT_OTHER_KEY"))
    try:
        assert (await other.call(Operation.AUTHORIZE, order(), "k-auth2")).http_status == 401
    finally:
        await other.close()
    assert rig.emulator.ledger.snapshot()["entries"] == []


# --- follow-ups ---------------------------------------------------------------------------------


async def test_partial_capture_refund_and_void_rules(rig: Rig) -> None:
    o = order(capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-a")
    assert (auth.outcome, auth.provider_status) == (Outcome.APPROVED, "Authorized")
    ref = auth.reference
    capture = await rig.call(Operation.CAPTURE, FollowUp(o.payment_id, ref, amount=600, follow_up_id="cap-1"), "k-c")
    assert (capture.outcome, capture.http_status) == (Outcome.APPROVED, 202)
    assert capture.reference and capture.reference.startswith("act_")
    void = await rig.call(Operation.VOID, FollowUp(o.payment_id, ref), "k-v")
    assert (void.outcome, void.http_status) == (Outcome.REJECTED, 403)  # captured: void not allowed
    too_much = await rig.call(Operation.REFUND, FollowUp(o.payment_id, ref, amount=700), "k-r1")
    assert (too_much.outcome, too_much.raw_code) == (Outcome.REJECTED, "refund_amount_exceeds_balance")
    refund = await rig.call(Operation.REFUND, FollowUp(o.payment_id, ref, amount=200), "k-r2")
    assert refund.outcome is Outcome.APPROVED
    status = await rig.status(FollowUp(o.payment_id, ref))
    assert (status.result.outcome, status.result.provider_status) == (Outcome.APPROVED, "Partially Refunded")
    entry = rig.emulator.ledger.get(ref)
    assert entry is not None and (entry.captured, entry.refunded) == (600, 200)


# --- evidence: the official SDK against the emulator ----------------------------------------------


class _DirectSession(HttpClientBuilderInterface):
    """A requests session that ignores proxy settings from the environment: loopback only."""

    def __init__(self) -> None:
        self.session = requests.Session()
        self.session.trust_env = False

    def get_client(self) -> requests.Session:
        return self.session


def _sdk(base_uri: str, key: str, http: _DirectSession) -> Any:
    environment = Environment(base_uri=base_uri, authorization_uri=base_uri + "connect/token", files_uri=base_uri,
                              transfers_uri=base_uri, balances_uri=base_uri, forward_uri=base_uri,
                              identity_uri=base_uri, is_sandbox=True)
    builder = CheckoutSdk.builder().secret_key(key).environment(environment).http_client_builder(http)
    # The SDK wants a merchant subdomain prepended to the host, which a loopback address cannot
    # take, so it is told to use the shared host (deprecated); building also warns about its own
    # risk module. Both are the SDK's notices, not ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return builder.use_legacy_domain().build()


def _card(number: str) -> PaymentRequestCardSource:
    source = PaymentRequestCardSource()
    source.number, source.expiry_month, source.expiry_year, source.cvv, source.name = number, 6, 2030, "100", "SDK"
    return source


def _payment_request(number: str, reference: str, *, capture: bool) -> PaymentRequest:
    request = PaymentRequest()
    request.source, request.amount, request.currency = _card(number), 1000, Currency.EUR
    request.reference, request.capture = reference, capture
    return request


@pytest.fixture
def sdk_http() -> Iterator[_DirectSession]:
    http = _DirectSession()
    try:
        yield http
    finally:
        http.session.close()


async def test_official_checkout_sdk_against_the_emulator(rig: Rig, sdk_http: _DirectSession) -> None:
    api = _sdk(rig.server.url + "/", SANDBOX_KEY, sdk_http)
    payments = api.payments

    def sdk_flow() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        auth = payments.request_payment(_payment_request("4242424242424242", "pay_sdk_1", capture=False), "sdk-k1")
        replay = payments.request_payment(_payment_request("4242424242424242", "pay_sdk_1", capture=False), "sdk-k1")
        seen["auth"] = (auth.http_metadata.status_code, auth.approved, auth.status, auth.response_code, auth.id)
        seen["replay_id"] = replay.id
        seen["details"] = payments.get_payment_details(auth.id).status
        listing = payments.get_payments_list(_query("pay_sdk_1"))
        seen["list"] = (listing.total_count, [p.id for p in listing.data])
        capture = CaptureRequest()
        capture.amount, capture.reference = 1000, "cap-sdk"
        captured = payments.capture_payment(auth.id, capture, "sdk-k2")
        seen["capture"] = (captured.http_metadata.status_code, captured.action_id)
        refund = RefundRequest()
        refund.amount = 400
        refunded = payments.refund_payment(auth.id, refund, "sdk-k3")
        seen["refund"] = refunded.http_metadata.status_code
        seen["actions"] = [(a.type, a.response_code) for a in payments.get_payment_actions(auth.id).items]
        declined = payments.request_payment(
            _payment_request(SCENARIO_CARDS["insufficient_funds"], "pay_sdk_2", capture=True), "sdk-k4")
        seen["declined"] = (declined.http_metadata.status_code, declined.approved, declined.response_code)
        to_void = payments.request_payment(_payment_request("5436031030606378", "pay_sdk_3", capture=False), "sdk-k5")
        seen["void"] = payments.void_payment(to_void.id, VoidRequest(), "sdk-k6").http_metadata.status_code
        seen["void_id"] = to_void.id
        seen["paths"] = [payments.build_path("payments", auth.id, s) for s in ("captures", "refunds", "voids")]
        try:
            _sdk(rig.server.url + "/", "sk_sbox_" + "a" * 27, sdk_http).payments.get_payment_details(auth.id)
        except CheckoutApiException as exc:
            seen["wrong_key"] = exc.http_metadata.status_code
        return seen

    seen = await asyncio.to_thread(sdk_flow)
    status, approved, state, code, payment_id = seen["auth"]
    assert (status, approved, state, code) == (201, True, "Authorized", "10000")
    assert seen["replay_id"] == payment_id  # Cko-Idempotency-Key replayed the stored 201
    assert seen["details"] == "Authorized"
    assert seen["list"] == (1, [payment_id])
    assert seen["capture"][0] == 202 and seen["capture"][1].startswith("act_")
    assert seen["refund"] == 202
    assert seen["actions"] == [("Refund", "10000"), ("Capture", "10000"), ("Authorization", "10000")]
    assert seen["declined"] == (201, False, "20051")
    assert seen["void"] == 202
    assert seen["wrong_key"] == 401

    # The SDK used exactly the paths our mapping builds...
    follow = FollowUp(payment_id="pay_sdk_1", provider_reference=payment_id, amount=100)
    assert [rig.mapping.build(op, follow, "k").path for op in (Operation.CAPTURE, Operation.REFUND, Operation.VOID)] \
        == ["/" + p for p in seen["paths"]]
    # ...and our mapping reads what the SDK created, by reference and by id.
    by_reference = await rig.status(FollowUp("pay_sdk_1", None))
    assert (by_reference.lookup, by_reference.result.reference, by_reference.result.provider_status) == (
        Lookup.FOUND, payment_id, "Partially Refunded")
    voided = await rig.status(FollowUp("pay_sdk_3", seen["void_id"]))
    assert (voided.result.outcome, voided.result.provider_status) == (Outcome.APPROVED, "Voided")
    declined = await rig.status(FollowUp("pay_sdk_2", None))
    assert (declined.result.outcome, declined.charges) == (Outcome.HARD_DECLINE, 0)
    # And an order our mapping authorises is captured and refunded through the SDK.
    o = order(capture=False, pid="pay_sdk_4")
    ours = await rig.call(Operation.AUTHORIZE, o, "k-ours")
    assert ours.reference

    def sdk_follow_ups(pid: str) -> tuple[int, int]:
        return (payments.capture_payment(pid, None, "sdk-k7").http_metadata.status_code,
                payments.refund_payment(pid, None, "sdk-k8").http_metadata.status_code)

    assert await asyncio.to_thread(sdk_follow_ups, ours.reference) == (202, 202)
    entry = rig.emulator.ledger.get(ours.reference)
    assert entry is not None and (entry.status, entry.captured, entry.refunded) == ("Refunded", 1000, 1000)
    assert rig.emulator.ledger.duplicates() == {}


def _query(reference: str) -> PaymentsQueryFilter:
    query = PaymentsQueryFilter()
    query.reference, query.limit, query.skip = reference, 10, 0
    return query
