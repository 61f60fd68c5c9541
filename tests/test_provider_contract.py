"""One contract, every provider: each outcome class through a real HTTP call to the emulator,
made by the gateway's own `ProviderClient` (`tests/gateway_calls.py`), so the contract holds for
what the gateway actually runs. Status queries are checked where the provider has a lookup
(`lookup_rig`); what a provider without one (Adyen) holds is read from its emulator's ledger."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from domain.outcome import Outcome
from domain.secret import Secret
from domain.types import Card, FollowUp, FollowUpState, Lookup, Operation, PaymentOrder, ProviderResult
from emulators.faults import FaultPlan, FaultRule
from emulators.registry import EMULATORS
from emulators.server import EmulatorServer
from providers.base import ProviderResponse
from providers.registry import KINDS
from tests.gateway_calls import GatewayCalls, start_client


@dataclass
class Rig(GatewayCalls):
    kind: str
    server: EmulatorServer
    cards: dict[str, str]

    async def follow_up(self, op: Operation, o: PaymentOrder, reference: str | None, key: str,
                        amount: int | None = None) -> ProviderResult:
        """A follow-up as the engine sends it: the provider key is also the follow-up's id."""
        subject = FollowUp(payment_id=o.payment_id, provider_reference=reference, amount=amount, currency="EUR",
                           follow_up_id=key)
        return await self.call(op, subject, key)


# The kinds whose provider has a payment lookup (Adyen has none: its outcomes arrive by webhook).
LOOKUP_KINDS = sorted(k for k in KINDS if KINDS[k].mapping(k, "key", merchant_account="m").has_status_lookup)


@contextlib.asynccontextmanager
async def _rig(kind: str) -> AsyncIterator[Rig]:
    emulated = EMULATORS[kind]
    server = EmulatorServer(emulated.emulator())
    await server.start()
    try:
        client = await start_client(kind, server.url, merchant_account="GatewayTestECOM")
        r = Rig(client, kind, server, emulated.scenario_cards())
        try:
            yield r
        finally:
            await r.close()
    finally:
        await server.stop()


@pytest.fixture(params=sorted(KINDS))
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    async with _rig(request.param) as r:
        yield r


@pytest.fixture(params=LOOKUP_KINDS)
async def lookup_rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    async with _rig(request.param) as r:
        yield r


def test_every_provider_but_adyen_has_a_lookup() -> None:
    assert LOOKUP_KINDS == sorted(set(KINDS) - {"adyen"})


_seq = iter(range(1, 1_000_000))


def order(card: str, *, amount: int = 1000, capture: bool = True) -> PaymentOrder:
    pid = f"pay_contract_{next(_seq)}"
    return PaymentOrder(payment_id=pid, amount=amount, currency="EUR", capture=capture, merchant_reference=f"ref-{pid}",
                        card=Card(number=Secret(card), exp_month=3, exp_year=2030, cvc=Secret("737"), holder_name="J Smith"))


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("approve", Outcome.APPROVED),
        ("insufficient_funds", Outcome.HARD_DECLINE),
        ("stolen_card", Outcome.HARD_DECLINE),
        ("do_not_honor", Outcome.SOFT_DECLINE),
        ("issuer_unavailable", Outcome.SOFT_DECLINE),
    ],
)
async def test_test_cards_reach_each_decline_class(rig: Rig, scenario: str, expected: Outcome) -> None:
    o = order(rig.cards[scenario])
    result = await rig.call(Operation.AUTHORIZE, o, f"{o.payment_id}-k")
    assert result.outcome is expected, result
    assert result.raw_code
    charges = rig.server.emulator.ledger.charges()
    assert len(charges) == (1 if expected is Outcome.APPROVED else 0)


async def test_retry_with_same_key_charges_once(rig: Rig) -> None:
    o = order(rig.cards["approve"])
    first = await rig.call(Operation.AUTHORIZE, o, "same-key-1")
    second = await rig.call(Operation.AUTHORIZE, o, "same-key-1")
    assert first.outcome is second.outcome is Outcome.APPROVED
    assert first.reference == second.reference
    assert len(rig.server.emulator.ledger.charges()) == 1


async def test_same_key_other_body_is_rejected(rig: Rig) -> None:
    o = order(rig.cards["approve"])
    await rig.call(Operation.AUTHORIZE, o, "reused-key")
    other = order(rig.cards["approve"], amount=2000)
    result = await rig.call(Operation.AUTHORIZE, other, "reused-key")
    assert result.outcome is Outcome.REJECTED
    assert len(rig.server.emulator.ledger.charges()) == 1


async def test_outage_is_unavailable(rig: Rig) -> None:
    await rig.server.set_outage(True)
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-outage")
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.raw_code == "connect_failed"
    await rig.server.set_outage(False)
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-back")
    assert result.outcome is Outcome.APPROVED


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_unknown_without_the_providers_not_processed_signal(rig: Rig, status: int) -> None:
    """No provider documents a 5xx as "not processed": even one sent before processing is
    unknown to us, since nothing in the answer says so."""
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=status),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), f"k-{status}")
    assert (result.outcome, result.http_status) == (Outcome.UNKNOWN, status)
    assert rig.server.emulator.ledger.charges() == []


async def test_only_a_documented_signal_makes_a_503_unavailable(rig: Rig) -> None:
    """Adyen's `transient-error: true` says the request was not processed and the same key will
    be processed afresh; Stripe's `Stripe-Should-Retry: true` only says a retry can succeed;
    Checkout.com has no such signal."""
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=503, transient=True),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-503-signal")
    expected = {"adyen": (Outcome.UNAVAILABLE, True), "stripe": (Outcome.UNKNOWN, True),
                "checkout": (Outcome.UNKNOWN, None)}[rig.kind]
    assert (result.outcome, result.retry_hint) == expected
    assert rig.server.emulator.ledger.charges() == []


async def test_429_is_unavailable_with_retry_after(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="rate_limit", retry_after_s=2),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-429")
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.retry_after_s == 2


async def test_timeout_after_processing_is_unknown_and_the_charge_stands(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="timeout_after", hang_s=5),)))
    o = order(rig.cards["approve"])
    result = await rig.call(Operation.AUTHORIZE, o, "k-timeout", timeout_s=0.3)
    assert result.outcome is Outcome.UNKNOWN
    assert result.raw_code == "read_timeout"
    assert [c.payment_ref for c in rig.server.emulator.ledger.charges()] == [o.payment_id]


async def test_reset_after_processing_is_unknown(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="reset_after"),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-reset")
    assert result.outcome is Outcome.UNKNOWN
    assert len(rig.server.emulator.ledger.charges()) == 1


async def test_status_query_of_unknown_payment_is_not_found(lookup_rig: Rig) -> None:
    rig = lookup_rig
    answered = await rig.status(FollowUp(payment_id="pay_never_sent", provider_reference=None))
    assert (answered.lookup, answered.charges, answered.follow_ups) == (Lookup.NOT_FOUND, 0, ())


async def test_a_status_query_is_a_lookup_never_a_call(rig: Rig) -> None:
    """A status answer is a `StatusAnswer`: `call` and every mapping's `parse` refuse
    `Operation.STATUS`, so no caller can read one as an outcome."""
    with pytest.raises(ValueError, match="lookup"):
        await rig.call(Operation.STATUS, FollowUp(payment_id="pay_never_sent", provider_reference=None), None)
    with pytest.raises(ValueError, match="parse_status"):
        rig.mapping.parse(Operation.STATUS, ProviderResponse(200, {}, b"{}"))


async def test_status_answer_after_a_timeout_finds_the_one_charge(lookup_rig: Rig) -> None:
    rig = lookup_rig
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="timeout_after", hang_s=5),)))
    o = order(rig.cards["approve"])
    assert (await rig.call(Operation.AUTHORIZE, o, "k-timeout-status", timeout_s=0.3)).outcome is Outcome.UNKNOWN
    rig.server.emulator.faults.clear()
    status = await rig.status(FollowUp(payment_id=o.payment_id, provider_reference=None))
    assert (status.lookup, status.result.outcome, status.charges) == (Lookup.FOUND, Outcome.APPROVED, 1)
    assert status.result.reference == rig.server.emulator.ledger.charges()[0].id


async def test_status_answer_of_a_decline_holds_no_charge(lookup_rig: Rig) -> None:
    rig = lookup_rig
    o = order(rig.cards["stolen_card"])
    await rig.call(Operation.AUTHORIZE, o, "k-declined-status")
    status = await rig.status(FollowUp(payment_id=o.payment_id, provider_reference=None))
    assert (status.lookup, status.result.outcome, status.charges) == (Lookup.FOUND, Outcome.HARD_DECLINE, 0)


async def test_status_answer_is_unknown_when_the_lookup_fails(lookup_rig: Rig) -> None:
    rig = lookup_rig
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=503, operations=("status",)),)))
    status = await rig.status(FollowUp(payment_id="pay_whatever", provider_reference=None))
    assert (status.lookup, status.result.http_status) == (Lookup.UNKNOWN, 503)
    await rig.server.set_outage(True)
    down = await rig.status(FollowUp(payment_id="pay_whatever", provider_reference=None))
    assert (down.lookup, down.result.raw_code) == (Lookup.UNKNOWN, "connect_failed")


async def test_same_key_retry_after_a_500_that_charged_counts_every_charge(rig: Rig) -> None:
    """Stripe and Adyen replay the stored 500 (one charge); Checkout.com stores only 2xx, so the
    retry charges again, and its `GET /payments?reference=` lists both: `charges == 2`, the
    duplicate the engine must flag (Adyen has no lookup: its ledger is the evidence)."""
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=500, after_processing=True,
                                                              operations=("authorize",)),)))
    o = order(rig.cards["approve"])
    assert (await rig.call(Operation.AUTHORIZE, o, "k-500-twice")).outcome is Outcome.UNKNOWN
    rig.server.emulator.faults.clear()
    await rig.call(Operation.AUTHORIZE, o, "k-500-twice")
    expected = 1 if rig.mapping.replays_answers else 2
    assert len(rig.server.emulator.ledger.charges()) == expected
    if rig.mapping.has_status_lookup:
        status = await rig.status(FollowUp(payment_id=o.payment_id, provider_reference=None))
        assert (status.lookup, status.result.outcome, status.charges) == (Lookup.FOUND, Outcome.APPROVED, expected)


async def test_capture_and_partial_refund_then_lookup_shows_both(lookup_rig: Rig) -> None:
    rig = lookup_rig
    o = order(rig.cards["approve"], capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-auth-lookup")
    assert auth.outcome is Outcome.APPROVED and auth.reference
    capture_key, refund_key = f"{o.payment_id}-{rig.kind}-capture", f"{o.payment_id}-{rig.kind}-refund"
    assert (await rig.follow_up(Operation.CAPTURE, o, auth.reference, capture_key, 1000)).outcome is Outcome.APPROVED
    assert (await rig.follow_up(Operation.REFUND, o, auth.reference, refund_key, 400)).outcome is Outcome.APPROVED
    status = await rig.status(FollowUp(payment_id=o.payment_id, provider_reference=auth.reference,
                                       follow_up_id=refund_key))
    assert (status.lookup, status.result.outcome, status.charges) == (Lookup.FOUND, Outcome.APPROVED, 1)
    assert status.follow_ups_listed
    assert sorted(status.follow_ups, key=lambda f: f.operation) == [
        FollowUpState(Operation.CAPTURE, capture_key, 1000, Outcome.APPROVED),
        FollowUpState(Operation.REFUND, refund_key, 400, Outcome.APPROVED),
    ]


async def test_void_then_lookup_shows_the_void(lookup_rig: Rig) -> None:
    rig = lookup_rig
    o = order(rig.cards["approve"], capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-auth-void-lookup")
    void_key = f"{o.payment_id}-{rig.kind}-void"
    assert (await rig.follow_up(Operation.VOID, o, auth.reference, void_key)).outcome is Outcome.APPROVED
    status = await rig.status(FollowUp(payment_id=o.payment_id, provider_reference=auth.reference,
                                       follow_up_id=void_key))
    assert (status.result.outcome, status.charges, status.follow_ups_listed) == (Outcome.APPROVED, 1, True)
    # Stripe's cancel takes no metadata: its void is known by the intent alone (an intent cancels once).
    echoed = None if rig.kind == "stripe" else void_key
    assert status.follow_ups == (FollowUpState(Operation.VOID, echoed, 1000, Outcome.APPROVED),)


async def test_manual_capture_then_refund(rig: Rig) -> None:
    o = order(rig.cards["approve"], capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-auth")
    assert auth.outcome is Outcome.APPROVED and auth.reference
    follow = FollowUp(payment_id=o.payment_id, provider_reference=auth.reference, amount=1000, currency="EUR")
    captured = await rig.call(Operation.CAPTURE, follow, "k-capture")
    assert captured.outcome is Outcome.APPROVED, captured
    refunded = await rig.call(Operation.REFUND, follow, "k-refund")
    assert refunded.outcome is Outcome.APPROVED, refunded


async def test_void_of_authorisation(rig: Rig) -> None:
    o = order(rig.cards["approve"], capture=False)
    auth = await rig.call(Operation.AUTHORIZE, o, "k-auth-v")
    voided = await rig.call(Operation.VOID, FollowUp(payment_id=o.payment_id, provider_reference=auth.reference,
                                                     amount=1000, currency="EUR"), "k-void")
    assert voided.outcome is Outcome.APPROVED, voided


async def test_forced_decline_fault(rig: Rig) -> None:
    code = {"stripe": "do_not_honor", "adyen": "Refused", "checkout": "20005"}[rig.kind]
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="decline", decline_code=code),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-forced")
    assert result.outcome.is_decline


async def test_concurrent_duplicates_charge_once(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="latency", latency_ms=100),)))
    o = order(rig.cards["approve"])
    results = await asyncio.gather(*(rig.call(Operation.AUTHORIZE, o, "k-race") for _ in range(5)))
    assert sum(r.outcome is Outcome.APPROVED for r in results) >= 1
    assert len(rig.server.emulator.ledger.charges()) == 1
