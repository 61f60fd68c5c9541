"""The rules that decide when an unknown outcome is settled: pure functions, checked directly
with the real provider mappings."""

from __future__ import annotations

import pytest

from domain.outcome import LocalRefusal, Outcome
from domain.types import Lookup, Operation, ProviderResult, StatusAnswer
from gateway.policy import settles_possible_charge
from gateway.settlement import settle_unknown
from providers.checkout.mapping import CheckoutMapping
from providers.stripe.mapping import StripeMapping

TIMEOUT = ProviderResult(Outcome.UNKNOWN, raw_code="read_timeout")
SERVER_500 = ProviderResult(Outcome.UNKNOWN, raw_code="processing_error", http_status=500)
NOT_FOUND = StatusAnswer(Lookup.NOT_FOUND, ProviderResult(Outcome.UNAVAILABLE, raw_code="not_found", http_status=200))
CHECKOUT = CheckoutMapping("checkout", "sk_sbox_x")
STRIPE = StripeMapping("stripe", "sk_test_x")


@pytest.mark.parametrize("later", [
    ProviderResult(Outcome.REJECTED, raw_code="http_408", http_status=408),    # a proxy's 4xx
    ProviderResult.refused(LocalRefusal.BREAKER_OPEN),                          # refused before sending
    ProviderResult(Outcome.UNAVAILABLE, raw_code="connect_failed"),
])
def test_an_answer_that_says_nothing_about_the_first_call_keeps_it_unsettled(later: ProviderResult) -> None:
    assert not settles_possible_charge(later)


@pytest.mark.parametrize("later", [
    ProviderResult(Outcome.APPROVED, raw_code="succeeded"),
    ProviderResult(Outcome.HARD_DECLINE, raw_code="stolen_card"),
    ProviderResult(Outcome.UNAVAILABLE, raw_code="read_timeout", proven_absent=True),  # proven: no such payment
])
def test_an_answer_that_settles_it(later: ProviderResult) -> None:
    assert settles_possible_charge(later)


def test_not_found_proves_nothing_right_after_a_timeout_even_where_the_lookup_is_consistent() -> None:
    """The request may still be on its way or in progress at the provider."""
    assert settle_unknown(Operation.AUTHORIZE, TIMEOUT, NOT_FOUND, CHECKOUT).outcome is Outcome.UNKNOWN


def test_not_found_after_the_providers_own_500_allows_failover_where_the_lookup_is_consistent() -> None:
    settled = settle_unknown(Operation.AUTHORIZE, SERVER_500, NOT_FOUND, CHECKOUT)
    assert settled.outcome is Outcome.UNAVAILABLE and settled.proven_absent


def test_not_found_never_settles_a_lagging_lookup_but_a_replaying_provider_may_resend() -> None:
    settled = settle_unknown(Operation.AUTHORIZE, SERVER_500, NOT_FOUND, STRIPE)
    assert settled.outcome is Outcome.UNKNOWN and settled.replay_safe


def test_a_payment_we_hold_a_provider_id_for_is_never_not_found() -> None:
    with_id = ProviderResult(Outcome.UNKNOWN, raw_code="processing", http_status=500, reference="pay_123")
    assert settle_unknown(Operation.AUTHORIZE, with_id, NOT_FOUND, CHECKOUT).outcome is Outcome.UNKNOWN


def test_a_void_listed_without_our_reference_is_ours() -> None:
    """Stripe's cancel takes no metadata, so its void is listed with no reference; a payment is
    cancelled once, so that entry settles our void (a crashed void was marked never made)."""
    from domain.types import FollowUpState
    from gateway.settlement import follow_up_entry

    voided = StatusAnswer(Lookup.FOUND, ProviderResult(Outcome.APPROVED, raw_code="canceled"),
                          follow_ups=(FollowUpState(Operation.VOID, None, 1299, Outcome.APPROVED),),
                          follow_ups_listed=True)
    entry = follow_up_entry(voided, Operation.VOID, "pay_x-stripe-void-abc")
    assert entry is not None and entry.outcome is Outcome.APPROVED
    assert follow_up_entry(voided, Operation.REFUND, "pay_x-stripe-refund-abc") is None
