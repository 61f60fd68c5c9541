"""The rules that decide when an unknown outcome is settled: pure functions, checked directly
with the real provider mappings."""

from __future__ import annotations

import pytest

from gateway.executor import _still_unsettled, settle_with_status
from domain.outcome import Outcome
from domain.types import ProviderResult
from providers.checkout.mapping import CheckoutMapping
from providers.stripe.mapping import StripeMapping

TIMEOUT = ProviderResult(Outcome.UNKNOWN, raw_code="read_timeout")
SERVER_500 = ProviderResult(Outcome.UNKNOWN, raw_code="processing_error", http_status=500)
NOT_FOUND = ProviderResult(Outcome.APPROVED, raw_code="not_found", found=False)
CHECKOUT = CheckoutMapping("checkout", "sk_sbox_x")
STRIPE = StripeMapping("stripe", "sk_test_x")


@pytest.mark.parametrize("later", [
    ProviderResult(Outcome.REJECTED, raw_code="http_408", http_status=408),    # a proxy's 4xx
    ProviderResult(Outcome.UNAVAILABLE, raw_code="breaker_open"),               # refused before sending
    ProviderResult(Outcome.UNAVAILABLE, raw_code="connect_failed"),
])
def test_an_answer_that_says_nothing_about_the_first_call_keeps_it_unsettled(later: ProviderResult) -> None:
    assert _still_unsettled(TIMEOUT, later) is TIMEOUT


@pytest.mark.parametrize("later", [
    ProviderResult(Outcome.APPROVED, raw_code="succeeded"),
    ProviderResult(Outcome.HARD_DECLINE, raw_code="stolen_card"),
    ProviderResult(Outcome.UNAVAILABLE, raw_code="read_timeout", found=False),  # proven: no such payment
])
def test_an_answer_that_settles_it(later: ProviderResult) -> None:
    assert _still_unsettled(TIMEOUT, later) is None


def test_not_found_proves_nothing_right_after_a_timeout_even_where_the_lookup_is_consistent() -> None:
    """The request may still be on its way or in progress at the provider."""
    assert settle_with_status(TIMEOUT, NOT_FOUND, CHECKOUT).outcome is Outcome.UNKNOWN


def test_not_found_after_the_providers_own_500_allows_failover_where_the_lookup_is_consistent() -> None:
    settled = settle_with_status(SERVER_500, NOT_FOUND, CHECKOUT)
    assert settled.outcome is Outcome.UNAVAILABLE and not settled.found


def test_not_found_never_settles_a_lagging_lookup_but_a_replaying_provider_may_resend() -> None:
    settled = settle_with_status(SERVER_500, NOT_FOUND, STRIPE)
    assert settled.outcome is Outcome.UNKNOWN and settled.replay_safe


def test_a_payment_we_hold_a_provider_id_for_is_never_not_found() -> None:
    with_id = ProviderResult(Outcome.UNKNOWN, raw_code="processing", http_status=500, reference="pay_123")
    assert settle_with_status(with_id, NOT_FOUND, CHECKOUT).outcome is Outcome.UNKNOWN
