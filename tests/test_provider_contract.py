"""One contract, every provider: each outcome class through a real HTTP call to the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from domain.outcome import Outcome
from domain.secret import Secret
from domain.types import Card, FollowUp, Operation, PaymentOrder, ProviderResult
from providers.classify import result_from_transport_error
from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from providers.errors import TransportError
from emulators.registry import EMULATORS
from providers.registry import KINDS
from providers.transport import ProviderTransport

API_KEYS = {"stripe": "sk_test_contract", "adyen": "adyen_test_key", "checkout": "sk_sbox_contract"}


@dataclass
class Rig:
    kind: str
    server: EmulatorServer
    transport: ProviderTransport
    mapping: Any
    cards: dict[str, str]

    async def call(self, op: Operation, subject: PaymentOrder | FollowUp, key: str | None,
                   timeout_s: float = 2.0) -> ProviderResult:
        request = self.mapping.build(op, subject, key)
        try:
            response = await self.transport.send(request, timeout_s)
        except TransportError as exc:
            return result_from_transport_error(exc)
        return self.mapping.parse(op, response)


@pytest.fixture(params=sorted(KINDS))
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    kind = KINDS[request.param]
    emulated = EMULATORS[request.param]
    server = EmulatorServer(emulated.emulator())
    await server.start()
    transport = ProviderTransport(kind.name, server.url, ssl_context=None, connect_timeout_s=1.0, max_connections=10)
    await transport.start()
    mapping = kind.mapping(kind.name, API_KEYS[kind.name], merchant_account="GatewayTestECOM")
    try:
        yield Rig(kind.name, server, transport, mapping, emulated.scenario_cards())
    finally:
        await transport.close()
        await server.stop()


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


async def test_503_before_processing_is_unavailable(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="error", status=503),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-503")
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.http_status == 503
    assert rig.server.emulator.ledger.charges() == []


async def test_429_is_unavailable_with_retry_after(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="rate_limit", retry_after_s=2),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-429")
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.retry_after_s == 2


async def test_timeout_after_processing_is_unknown_and_status_query_finds_the_charge(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="timeout_after", hang_s=5),)))
    o = order(rig.cards["approve"])
    result = await rig.call(Operation.AUTHORIZE, o, "k-timeout", timeout_s=0.3)
    assert result.outcome is Outcome.UNKNOWN
    assert result.raw_code == "read_timeout"
    rig.server.emulator.faults.clear()
    status = await rig.call(Operation.STATUS, FollowUp(payment_id=o.payment_id, provider_reference=None), None)
    assert status.found and status.outcome is Outcome.APPROVED
    assert len(rig.server.emulator.ledger.charges()) == 1


async def test_reset_after_processing_is_unknown(rig: Rig) -> None:
    rig.server.emulator.faults.set(FaultPlan(rules=(FaultRule(kind="reset_after"),)))
    result = await rig.call(Operation.AUTHORIZE, order(rig.cards["approve"]), "k-reset")
    assert result.outcome is Outcome.UNKNOWN
    assert len(rig.server.emulator.ledger.charges()) == 1


async def test_status_query_of_unknown_payment_is_not_found(rig: Rig) -> None:
    status = await rig.call(Operation.STATUS, FollowUp(payment_id="pay_never_sent", provider_reference=None), None)
    assert not status.found


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
