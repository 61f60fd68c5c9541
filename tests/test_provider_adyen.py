"""Adyen specifics: Adyen's retry verdicts, its test triggers, the refusal tables, the absence of
any payment lookup (what Adyen holds is read from the emulator's ledger), and evidence that the
official `Adyen` SDK drives the emulator through the same paths and bodies our mapping uses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import orjson
import pytest

import Adyen
from domain.cards import luhn_valid
from domain.outcome import Outcome
from emulators.adyen import SCENARIO_CARDS, TEST_CARDS, AdyenEmulator
from providers.adyen.mapping import ERROR_STATUS, REFUSAL_REASONS, AdyenMapping, classify_refusal
from domain.secret import Secret
from domain.types import Card, FollowUp, Lookup, Operation, PaymentOrder, ProviderResult
from emulators.ledger import LedgerEntry
from providers.base import Probing, ProviderRequest, ProviderResponse, reachability_probe
from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from tests.conftest import PROVIDER_KEYS
from tests.gateway_calls import GatewayCalls, start_client

API_KEY = PROVIDER_KEYS["adyen"]  # what the autouse fixture puts in ADYEN_API_KEY
MERCHANT = "GatewayTestECOM"
VISA = "4111111145551142"


@dataclass
class Rig(GatewayCalls):
    server: EmulatorServer
    emulator: AdyenEmulator

    async def send(self, op: Operation, request: ProviderRequest) -> ProviderResult:
        """A request the gateway never builds (Adyen's test triggers in additionalData, a
        stripped API key), sent as is and classified by the mapping."""
        return self.mapping.parse(op, await self.transport.send(request, 2.0))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    emulator = AdyenEmulator(api_key=API_KEY, merchant_account=MERCHANT)
    server = EmulatorServer(emulator)
    await server.start()
    try:
        r = Rig(await start_client("adyen", server.url, merchant_account=MERCHANT), server, emulator)
        try:
            yield r
        finally:
            await r.close()
    finally:
        await server.stop()


_seq = iter(range(1, 1_000_000))


def order(card: str = VISA, *, holder: str = "J Smith", amount: int = 1000, capture: bool = True) -> PaymentOrder:
    pid = f"pay_adyen_{next(_seq)}"
    return PaymentOrder(payment_id=pid, amount=amount, currency="EUR", capture=capture, merchant_reference=f"ord-{pid}",
                        card=Card(number=Secret(card), exp_month=3, exp_year=2030, cvc=Secret("737"), holder_name=holder))


def with_additional_data(request: ProviderRequest, **fields: str) -> ProviderRequest:
    """Adyen's test triggers travel in additionalData, which PaymentOrder does not model."""
    doc = orjson.loads(request.body or b"{}")
    doc["additionalData"] = {**doc.get("additionalData", {}), **fields}
    return replace(request, body=orjson.dumps(doc))


def held(rig: Rig, o: PaymentOrder) -> list[LedgerEntry]:
    """What Adyen holds for our payment: its ledger (Adyen has no lookup to ask)."""
    return rig.emulator.ledger.find_by_ref(o.payment_id)


# --- request shape ------------------------------------------------------------------------------

def test_payment_request_has_adyen_shape() -> None:
    mapping = AdyenMapping("adyen", API_KEY, merchant_account=MERCHANT)
    o = order(capture=False)
    request = mapping.build(Operation.AUTHORIZE, o, "idem-1")
    assert (request.method, request.path) == ("POST", "/v71/payments")
    assert request.headers["X-API-Key"] == API_KEY
    assert request.headers["Idempotency-Key"] == "idem-1"
    assert request.headers["Content-Type"] == "application/json"
    body = orjson.loads(request.body or b"")
    assert body["reference"] == o.payment_id
    assert body["merchantAccount"] == MERCHANT
    assert body["amount"] == {"value": 1000, "currency": "EUR"}
    assert body["paymentMethod"] == {"type": "scheme", "number": VISA, "expiryMonth": "03", "expiryYear": "2030",
                                     "cvc": "737", "holderName": "J Smith"}
    assert body["additionalData"] == {"manualCapture": "true"}
    assert "captureDelayHours" not in body
    assert body["returnUrl"]
    auto = orjson.loads(mapping.build(Operation.AUTHORIZE, order(), "idem-2").body or b"")
    assert auto["captureDelayHours"] == 0 and "additionalData" not in auto
    assert API_KEY not in repr(mapping)
    long_key = f"{o.payment_id}-adyen-auth-{'f' * 60}"
    sent = mapping.build(Operation.AUTHORIZE, o, long_key).headers["Idempotency-Key"]
    assert len(sent) == 64 and sent == mapping.build(Operation.AUTHORIZE, o, long_key).headers["Idempotency-Key"]


def test_follow_up_paths() -> None:
    mapping = AdyenMapping("adyen", API_KEY, merchant_account=MERCHANT)
    follow = FollowUp(payment_id="pay_1", provider_reference="EMUA000000000007", amount=500, currency="eur",
                      follow_up_id="cap_1")
    capture = mapping.build(Operation.CAPTURE, follow, "k")
    assert capture.path == "/v71/payments/EMUA000000000007/captures"
    assert orjson.loads(capture.body or b"") == {"merchantAccount": MERCHANT, "reference": "cap_1",
                                                 "amount": {"value": 500, "currency": "EUR"}}
    assert mapping.build(Operation.REFUND, follow, "k").path.endswith("/refunds")
    assert mapping.build(Operation.VOID, follow, "k").path.endswith("/cancels")
    with pytest.raises(ValueError):
        mapping.build(Operation.REFUND, replace(follow, amount=None), "k")
    technical = mapping.build(Operation.VOID, replace(follow, provider_reference=None, follow_up_id="exp_1"), "k")
    assert technical.path == "/v71/cancels"  # no pspReference: the technical cancel, by our reference
    assert orjson.loads(technical.body or b"") == {"merchantAccount": MERCHANT, "paymentReference": "pay_1",
                                                   "reference": "exp_1"}
    with pytest.raises(ValueError):
        mapping.build(Operation.CAPTURE, replace(follow, provider_reference=None), "k")


def test_adyen_has_no_status_query_and_is_probed_with_its_payment_methods() -> None:
    """The real Adyen has no payment lookup: STATUS is refused like any operation it lacks, by
    either reference, and preflight's probe is `POST /paymentMethods`, a read Adyen has."""
    mapping = AdyenMapping("adyen", API_KEY, merchant_account=MERCHANT)
    assert not mapping.has_status_lookup
    for subject in (FollowUp(payment_id="pay_1", provider_reference=None),
                    FollowUp(payment_id="pay_1", provider_reference="EMUA000000000007", follow_up_id="cap_1")):
        with pytest.raises(ValueError, match="Adyen has no payment lookup"):
            mapping.build(Operation.STATUS, subject, None)
    with pytest.raises(ValueError, match="Adyen has no payment lookup"):
        mapping.parse_status(ProviderResponse(200, {}, b'{"payments": []}'))
    assert isinstance(mapping, Probing)
    probe = reachability_probe(mapping, "preflight_x")
    assert (probe.method, probe.path) == ("POST", "/v71/paymentMethods")
    assert orjson.loads(probe.body or b"") == {"merchantAccount": MERCHANT}
    assert probe.headers["X-API-Key"] == API_KEY and "Idempotency-Key" not in probe.headers


async def test_a_status_query_through_the_gateways_client_never_reaches_adyen(rig: Rig) -> None:
    """Whatever asks (executor, reconciler), the call is refused before a byte is sent."""
    await rig.call(Operation.AUTHORIZE, order(holder="PENDING"), "k-no-lookup")
    answered = await rig.status(FollowUp(payment_id="pay_x", provider_reference=None))
    assert (answered.lookup, answered.result.raw_code) == (Lookup.UNKNOWN, "request_not_buildable")
    assert "Adyen has no payment lookup" in (answered.result.message or "")
    assert dict(rig.emulator.requests) == {"authorize": 1}


async def test_payment_methods_answers_like_adyen_with_its_checks(rig: Rig) -> None:
    probe = rig.mapping.probe()
    answer = await rig.transport.send(probe, 2.0)
    assert answer.status == 200
    assert orjson.loads(answer.body) == {"paymentMethods": [{"name": "Cards", "type": "scheme",
                                                             "brands": ["visa", "mc", "amex", "maestro"]}]}
    no_key = replace(probe, headers={k: v for k, v in probe.headers.items() if k != "X-API-Key"})
    assert (await rig.transport.send(no_key, 2.0)).status == 401
    other = replace(probe, body=orjson.dumps({"merchantAccount": "SomeoneElseECOM"}))
    refused = await rig.transport.send(other, 2.0)
    assert (refused.status, orjson.loads(refused.body)["errorCode"]) == (403, "901")
    assert rig.emulator.ledger.entries() == [] and dict(rig.emulator.requests) == {"payment_methods": 3}


# --- classification of Adyen's error answers ------------------------------------------------------

def _error(status: int, code: str, headers: dict[str, str] | None = None) -> ProviderResponse:
    body = orjson.dumps({"status": status, "errorCode": code, "message": "m", "errorType": "internal"})
    return ProviderResponse(status=status, headers=headers or {}, body=body)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # 704 stays unknown even when marked transient: the first request may still charge.
        (_error(409, "704", {"transient-error": "true"}), Outcome.UNKNOWN),
        (_error(422, "704"), Outcome.UNKNOWN),
        # The transient header means "nothing processed, same key processes afresh", a 500 included.
        (_error(500, "701", {"transient-error": "true"}), Outcome.UNAVAILABLE),
        (_error(500, "701"), Outcome.UNKNOWN),
        (_error(503, "000", {"transient-error": "true"}), Outcome.UNAVAILABLE),
        (_error(503, "000"), Outcome.UNKNOWN),  # 00_503 "our servers are unavailable" is no "not processed"
        (_error(401, "000"), Outcome.UNAVAILABLE),
        (_error(403, "901"), Outcome.UNAVAILABLE),
        (_error(422, "101"), Outcome.REJECTED),
        (_error(400, "702"), Outcome.REJECTED),
        (_error(429, "000", {"Retry-After": "3"}), Outcome.UNAVAILABLE),
    ],
)
def test_error_answers_classify(response: ProviderResponse, expected: Outcome) -> None:
    result = AdyenMapping("adyen", API_KEY, merchant_account=MERCHANT).parse(Operation.AUTHORIZE, response)
    assert result.outcome is expected
    assert result.raw_code == orjson.loads(response.body)["errorCode"]
    # Adyen's transient header is its "retry with the same key" verdict, 704 duplicates included.
    assert result.retry_hint is (True if "transient-error" in response.headers else None)
    if "Retry-After" in response.headers:
        assert result.retry_after_s == 3


async def test_transient_error_is_unavailable_and_the_key_processes_afresh(rig: Rig) -> None:
    o = order()
    plain = rig.mapping.build(Operation.AUTHORIZE, o, "k-transient")
    transient = with_additional_data(plain, RequestedTestErrorResponseCode="NO_CONNECTION_AVAILABLE")
    first = await rig.send(Operation.AUTHORIZE, transient)
    assert first.outcome is Outcome.UNAVAILABLE and first.extra["transient"] == "true"
    assert first.http_status == 500
    assert rig.emulator.ledger.charges() == []
    assert [e.extra.get("transient") for e in held(rig, o)] == [True]  # nothing reached an issuer
    # Adyen did not keep the key: the gateway's retry with the same key (and the plain body) is
    # a first request, not a 422.
    second = await rig.call(Operation.AUTHORIZE, o, "k-transient")
    assert second.outcome is Outcome.APPROVED
    assert len(rig.emulator.ledger.charges()) == 1


async def test_ioexception_is_unknown_kept_for_the_key_and_charged_once(rig: Rig) -> None:
    o = order()
    request = with_additional_data(rig.mapping.build(Operation.AUTHORIZE, o, "k-io"),
                                   RequestedTestErrorResponseCode="IOEXCEPTION_RECEIVED")
    first = await rig.send(Operation.AUTHORIZE, request)
    assert first.outcome is Outcome.UNKNOWN and "transient" not in first.extra
    replay = await rig.send(Operation.AUTHORIZE, request)
    assert (replay.outcome, replay.http_status) == (Outcome.UNKNOWN, 500)
    [entry] = held(rig, o)
    assert entry.approved and rig.emulator.ledger.charges() == [entry]
    # An error's pspReference names the failed request, so it is logged, never followed up by.
    assert first.reference is None and entry.id == first.extra["pspReference"]


async def test_in_progress_duplicate_is_704_and_unknown(rig: Rig) -> None:
    rig.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="latency", latency_ms=300, operations=("authorize",)),)))
    o = order()
    results = await asyncio.gather(*(rig.call(Operation.AUTHORIZE, o, "k-dup") for _ in range(2)))
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == sorted([Outcome.APPROVED, Outcome.UNKNOWN])
    duplicate = next(r for r in results if r.outcome is Outcome.UNKNOWN)
    assert (duplicate.http_status, duplicate.raw_code) == (409, "704")
    assert duplicate.message == "request already processed or in progress"
    assert len(rig.emulator.ledger.charges()) == 1


async def test_requests_without_or_with_a_wrong_api_key_are_401(rig: Rig) -> None:
    request = rig.mapping.build(Operation.AUTHORIZE, order(), "k-auth")
    no_key = replace(request, headers={k: v for k, v in request.headers.items() if k != "X-API-Key"})
    result = await rig.send(Operation.AUTHORIZE, no_key)
    assert (result.outcome, result.http_status, result.raw_code) == (Outcome.UNAVAILABLE, 401, "000")
    assert result.extra["errorType"] == "security"
    wrong = replace(request, headers={**request.headers, "X-API-Key": "not-the-key"})
    assert (await rig.send(Operation.AUTHORIZE, wrong)).http_status == 401
    assert rig.emulator.ledger.snapshot()["entries"] == []


async def test_wrong_merchant_account_is_403_unavailable(rig: Rig) -> None:
    other = GatewayCalls(await start_client("adyen", rig.server.url, merchant_account="SomeoneElseECOM"))
    try:
        result = await other.call(Operation.AUTHORIZE, order(), "k-ma")
    finally:
        await other.close()
    assert (result.outcome, result.raw_code) == (Outcome.UNAVAILABLE, "901")


async def test_invalid_card_number_is_rejected(rig: Rig) -> None:
    result = await rig.call(Operation.AUTHORIZE, order("4111111145551143"), "k-luhn")
    assert (result.outcome, result.http_status, result.raw_code) == (Outcome.REJECTED, 422, "101")


# --- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("holder", "expected", "raw_code"),
    [
        ("NOT_ENOUGH_BALANCE", Outcome.HARD_DECLINE, "12"),
        ("BLOCK_CARD", Outcome.HARD_DECLINE, "5"),
        ("CARD_EXPIRED", Outcome.HARD_DECLINE, "6"),
        ("INVALID_CARD_NUMBER", Outcome.HARD_DECLINE, "8"),
        ("ACQUIRER_FRAUD", Outcome.HARD_DECLINE, "14"),
        ("ISSUER_UNAVAILABLE", Outcome.SOFT_DECLINE, "9"),
        ("ERROR", Outcome.SOFT_DECLINE, "4"),
        ("DECLINED", Outcome.SOFT_DECLINE, "2"),
        # Adyen's "<code> : <scheme code> : <raw>" form: the raw scheme code refines "Refused".
        ("DECLINED : 05 : Do not honor", Outcome.SOFT_DECLINE, "2:05"),
        ("DECLINED : 43 : Stolen card", Outcome.HARD_DECLINE, "2:43"),
        ("DECLINED : 51 : Insufficient funds", Outcome.HARD_DECLINE, "2:51"),
        ("APPROVED", Outcome.APPROVED, "Authorised"),
    ],
)
async def test_holder_name_triggers(rig: Rig, holder: str, expected: Outcome, raw_code: str) -> None:
    result = await rig.call(Operation.AUTHORIZE, order(holder=holder), f"k-{holder}")
    assert (result.outcome, result.raw_code) == (expected, raw_code), result
    assert len(rig.emulator.ledger.charges()) == (1 if expected is Outcome.APPROVED else 0)


@pytest.mark.parametrize(
    ("code", "expected", "raw_code"),
    [("24", Outcome.HARD_DECLINE, "24"), ("Issuer Suspected Fraud", Outcome.HARD_DECLINE, "31"),
     ("FRAUD", Outcome.HARD_DECLINE, "20"), ("Refused", Outcome.SOFT_DECLINE, "2"),
     ("Not enough balance", Outcome.HARD_DECLINE, "12"), ("27", Outcome.SOFT_DECLINE, "27")],
)
async def test_forced_declines_by_code_or_reason(rig: Rig, code: str, expected: Outcome, raw_code: str) -> None:
    rig.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="decline", decline_code=code),)))
    result = await rig.call(Operation.AUTHORIZE, order(), f"k-forced-{code}")
    assert (result.outcome, result.raw_code) == (expected, raw_code)


async def test_acquirer_response_code_trigger(rig: Rig) -> None:
    request = with_additional_data(rig.mapping.build(Operation.AUTHORIZE, order(), "k-acq"),
                                   RequestedTestAcquirerResponseCode="12")
    result = await rig.send(Operation.AUTHORIZE, request)
    assert (result.outcome, result.raw_code, result.message) == (Outcome.HARD_DECLINE, "12", "Not enough balance")


async def test_pending_is_unknown_until_it_settles(rig: Rig) -> None:
    o = order(holder="PENDING")
    result = await rig.call(Operation.AUTHORIZE, o, "k-pending")
    assert (result.outcome, result.provider_status) == (Outcome.UNKNOWN, "Received")
    [entry] = held(rig, o)
    assert (entry.status, entry.approved) == ("received", False)  # in flight: neither charged nor declined


def test_refusal_table_classes() -> None:
    for code, (reason, outcome) in REFUSAL_REASONS.items():
        assert outcome.is_decline, code
        assert classify_refusal(None, reason, None) == (outcome, code)  # reason text alone suffices
    assert classify_refusal("2", "Refused", "41 : Lost card") == (Outcome.HARD_DECLINE, "2:41")
    assert classify_refusal("2", "Refused", "5 : Do not honor") == (Outcome.SOFT_DECLINE, "2:05")
    # A specific reason is never overridden by the raw response.
    assert classify_refusal("9", "Issuer Unavailable", "51 : Insufficient funds") == (Outcome.SOFT_DECLINE, "9")
    assert classify_refusal("99", "Something new", None) == (Outcome.SOFT_DECLINE, "99")
    assert ERROR_STATUS[422] is Outcome.REJECTED


def test_scenario_and_test_cards_are_luhn_valid() -> None:
    assert set(SCENARIO_CARDS) == {"approve", "insufficient_funds", "stolen_card", "do_not_honor", "issuer_unavailable"}
    assert all(luhn_valid(number) for number in TEST_CARDS)
    assert set(SCENARIO_CARDS.values()) <= set(TEST_CARDS)


async def test_modifications_are_validated(rig: Rig) -> None:
    o = order(capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-mod")
    follow = FollowUp(payment_id=o.payment_id, provider_reference=auth.reference, amount=1000, currency="EUR")
    early_refund = await rig.call(Operation.REFUND, follow, "k-mod-refund")
    assert (early_refund.outcome, early_refund.http_status) == (Outcome.REJECTED, 422)
    too_much = await rig.call(Operation.CAPTURE, replace(follow, amount=1001), "k-mod-cap-big")
    assert too_much.outcome is Outcome.REJECTED
    captured = await rig.call(Operation.CAPTURE, follow, "k-mod-cap")
    assert (captured.outcome, captured.provider_status, captured.http_status) == (Outcome.APPROVED, "received", 201)
    assert captured.reference and captured.reference != auth.reference
    [entry] = held(rig, o)
    assert (entry.id, entry.status, entry.captured) == (auth.reference, "captured", 1000)


async def test_modifications_carry_our_references(rig: Rig) -> None:
    """Each modification sends our follow-up id as its `reference`: it is how its notification
    names the follow-up (`providers.adyen.webhook`)."""
    o = order(capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-refs")
    follow = FollowUp(payment_id=o.payment_id, provider_reference=auth.reference, amount=1000, currency="EUR",
                      follow_up_id="k-refs-cap")
    await rig.call(Operation.CAPTURE, follow, "k-refs-cap")
    await rig.call(Operation.REFUND, replace(follow, amount=400, follow_up_id="k-refs-ref"), "k-refs-ref")
    assert [(m["kind"], m["paymentPspReference"], m["reference"], m["amount"]["value"])
            for m in rig.emulator.modifications] == [("capture", auth.reference, "k-refs-cap", 1000),
                                                     ("refund", auth.reference, "k-refs-ref", 400)]
    [entry] = held(rig, o)
    assert (entry.captured, entry.refunded, entry.status) == (1000, 400, "partially_refunded")


async def test_a_technical_cancel_finds_the_payment_by_our_reference(rig: Rig) -> None:
    """`POST /cancels` with `paymentReference`: for a payment whose pspReference we never got."""
    o = order(capture=False)
    await rig.call(Operation.AUTHORIZE, o, "k-tech")
    follow = FollowUp(payment_id=o.payment_id, provider_reference=None, follow_up_id="k-tech-cancel")
    cancelled = await rig.call(Operation.VOID, follow, "k-tech-cancel")
    assert (cancelled.outcome, cancelled.provider_status, cancelled.settles_later) == (Outcome.APPROVED, "received",
                                                                                       True)
    [entry] = held(rig, o)
    assert (entry.status, entry.voided) == ("cancelled", True)
    assert [(m["kind"], m["paymentReference"]) for m in rig.emulator.modifications] == [
        ("technical_cancel", o.payment_id)]
    unknown = await rig.call(Operation.VOID, replace(follow, payment_id="pay_never_sent"), "k-tech-none")
    assert unknown.outcome is Outcome.REJECTED  # nothing of ours there: nothing cancelled


# --- evidence: the official SDK against the emulator ----------------------------------------------

async def test_official_sdk_pays_captures_and_refunds_through_our_paths(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = Adyen.Adyen(xapikey=API_KEY, platform="test", http_timeout=5)
    checkout = client.checkout
    # The SDK's services carry their base URL (checkout-test.adyen.com/v72 in v16); point them at
    # the emulator with the API version our mapping uses.
    for service in (checkout.payments_api, checkout.modifications_api):
        service.baseUrl = f"{rig.server.url}/v71"

    o = order(capture=False, amount=2500)
    ours = rig.mapping.build(Operation.AUTHORIZE, o, "sdk-auth")
    assert ours.path == "/v71/payments"
    paid = await asyncio.to_thread(checkout.payments_api.payments, orjson.loads(ours.body or b""),
                                   idempotency_key="sdk-auth")
    assert paid.status_code == 200 and paid.message["resultCode"] == "Authorised"
    parsed = rig.mapping.parse(Operation.AUTHORIZE, ProviderResponse(paid.status_code, {}, paid.raw_response.encode()))
    assert parsed.outcome is Outcome.APPROVED and parsed.reference == paid.psp

    follow = FollowUp(payment_id=o.payment_id, provider_reference=paid.psp, amount=2500, currency="EUR",
                      follow_up_id="cap-sdk")
    capture = rig.mapping.build(Operation.CAPTURE, follow, "sdk-cap")
    assert capture.path == f"/v71/payments/{paid.psp}/captures"
    captured = await asyncio.to_thread(checkout.modifications_api.capture_authorised_payment,
                                       orjson.loads(capture.body or b""), paid.psp, idempotency_key="sdk-cap")
    assert captured.status_code == 201 and captured.message["status"] == "received"

    refund = rig.mapping.build(Operation.REFUND, replace(follow, amount=1000, follow_up_id="ref-sdk"), "sdk-ref")
    refunded = await asyncio.to_thread(checkout.modifications_api.refund_captured_payment,
                                       orjson.loads(refund.body or b""), paid.psp, idempotency_key="sdk-ref")
    assert refunded.status_code == 201 and refunded.message["paymentPspReference"] == paid.psp

    # A retry through the SDK with the same key replays rather than charging again.
    again = await asyncio.to_thread(checkout.payments_api.payments, orjson.loads(ours.body or b""),
                                    idempotency_key="sdk-auth")
    assert again.psp == paid.psp

    [entry] = rig.emulator.ledger.charges()
    assert (entry.payment_ref, entry.idempotency_key) == (o.payment_id, "sdk-auth")
    assert (entry.captured, entry.refunded) == (2500, 1000)
    assert [m["kind"] for m in rig.emulator.modifications] == ["capture", "refund"]

    # The SDK reads our error shape: a wrong key surfaces as its authentication error with errorCode.
    intruder = Adyen.Adyen(xapikey="wrong-key", platform="test", http_timeout=5)
    intruder.checkout.payments_api.baseUrl = f"{rig.server.url}/v71"
    with pytest.raises(Adyen.AdyenAPIAuthenticationError) as info:
        await asyncio.to_thread(intruder.checkout.payments_api.payments, orjson.loads(ours.body or b""),
                                idempotency_key="sdk-intruder")
    assert (info.value.status_code, info.value.error_code) == (401, "000")
