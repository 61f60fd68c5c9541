"""Each provider's webhook signature scheme, as the providers' own SDKs sign and verify it, the
events parsed from their documented shapes (pure: providers/<kind>/webhook.py), and the
payment's state machine deciding what an event does (pure: gateway/webhooks/rules.py)."""

from __future__ import annotations

import time

import orjson
import pytest
import stripe
from Adyen.util import generate_notification_sig, is_valid_hmac_notification

from domain.outcome import Outcome, PaymentStatus
from domain.types import Operation
from domain.webhook import EventKind, MalformedEvent, ProviderEvent, SignatureInvalid
from gateway.journal.records import PaymentRecord, PendingFollowUp
from gateway.orchestrator import apply_follow_up
from gateway.webhooks.rules import Effect, decide
from providers.adyen import webhook as adyen
from providers.checkout import webhook as checkout
from providers.stripe import webhook as stripe_hooks
from tests.webhook_shapes import (
    ADYEN_HMAC,
    ADYEN_OLD_HMAC,
    CHECKOUT_SECRET,
    STRIPE_OLD_SECRET,
    STRIPE_SECRET,
    adyen_item,
    adyen_notification,
    checkout_event,
    checkout_headers,
    stripe_event,
    stripe_headers,
)

INTENT = {"id": "pi_1", "object": "payment_intent", "amount": 1299, "currency": "eur", "capture_method": "automatic",
          "status": "succeeded", "metadata": {"gateway_payment_id": "pay_abc"}}


def test_stripe_signature_is_the_one_stripes_sdk_verifies_and_ours_verifies_stripes() -> None:
    body = stripe_event("payment_intent.succeeded", INTENT)
    now = int(time.time())
    header = stripe_hooks.sign(body, STRIPE_SECRET, now)
    assert stripe.Webhook.construct_event(body.decode(), header, STRIPE_SECRET).id == orjson.loads(body)["id"]
    sdk_header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET, now)
    stripe_hooks.verify(body, {"Stripe-Signature": sdk_header}, [STRIPE_SECRET], now)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode().replace("1299", "1298"), header, STRIPE_SECRET)


@pytest.mark.parametrize("case", ["tampered", "expired", "unknown_secret", "missing", "no_v1", "garbled",
                                  "not_ascii"])
def test_stripe_signature_refusals(case: str) -> None:
    body = stripe_event("payment_intent.succeeded", INTENT)
    now = time.time()
    headers = stripe_headers(body)
    if case == "tampered":
        body = body.replace(b"1299", b"9999")
    elif case == "expired":
        headers = stripe_headers(body, timestamp=int(now) - 301)
    elif case == "unknown_secret":
        headers = stripe_headers(body, secret="whsec_someone_else")
    elif case == "missing":
        headers = {}
    elif case == "no_v1":
        headers = {"Stripe-Signature": f"t={int(now)},v0=abc"}
    elif case == "not_ascii":  # compare_digest refuses non-ASCII str: never a 500
        headers = {"Stripe-Signature": f"t={int(now)},v1=\u00e9\ud800"}
    else:
        headers = {"Stripe-Signature": "t=12a,v1="}
    with pytest.raises(SignatureInvalid):
        stripe_hooks.verify(body, headers, [STRIPE_SECRET], now)


def test_stripe_accepts_any_configured_secret_during_a_rotation() -> None:
    body = stripe_event("payment_intent.succeeded", INTENT)
    stripe_hooks.verify(body, stripe_headers(body, secret=STRIPE_OLD_SECRET), [STRIPE_SECRET, STRIPE_OLD_SECRET],
                        time.time())
    with pytest.raises(SignatureInvalid):
        stripe_hooks.verify(body, stripe_headers(body, secret=STRIPE_OLD_SECRET), [STRIPE_SECRET], time.time())


def test_adyen_item_signature_is_the_one_adyens_library_computes_and_validates() -> None:
    item = adyen_item("AUTHORISATION", "PSP0001", "pay_abc", 1299)
    body = adyen_notification(item)
    unsigned = {k: v for k, v in item.items() if k != "additionalData"}
    assert generate_notification_sig(unsigned, ADYEN_HMAC).decode() == item["additionalData"]["hmacSignature"]
    assert adyen.item_signature(item, bytes.fromhex(ADYEN_HMAC)) == item["additionalData"]["hmacSignature"]
    assert is_valid_hmac_notification(orjson.loads(body), ADYEN_HMAC)
    adyen.verify(body, {}, [ADYEN_HMAC], time.time())
    tampered = body.replace(b'"value":1299', b'"value":1')
    assert not is_valid_hmac_notification(orjson.loads(tampered), ADYEN_HMAC)
    with pytest.raises(SignatureInvalid):
        adyen.verify(tampered, {}, [ADYEN_HMAC], time.time())


def test_a_stripe_timestamp_further_ahead_than_the_tolerance_is_refused() -> None:
    """A correctly signed `t` 115 days ahead (or of 400 digits) was accepted: only the past was
    bounded. Within the tolerance ahead (clock skew) it is still taken."""
    body = b'{"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": {}}}'
    now = time.time()
    for ahead in (10**7, 10**400):
        headers = {"Stripe-Signature": stripe_hooks.sign(body, STRIPE_SECRET, int(now) + ahead)}
        with pytest.raises(SignatureInvalid, match="ahead"):
            stripe_hooks.verify(body, headers, [STRIPE_SECRET], now)
    skewed = {"Stripe-Signature": stripe_hooks.sign(body, STRIPE_SECRET, int(now) + 60)}
    stripe_hooks.verify(body, skewed, [STRIPE_SECRET], now)


def test_adyen_one_forged_item_refuses_the_whole_delivery_and_rotation_accepts_old_keys() -> None:
    good = adyen_item("AUTHORISATION", "PSP0001", "pay_abc", 1299)
    old = adyen_item("CAPTURE", "PSP0002", "pay_abc-adyen-capture-x", 1299, original="PSP0001", key=ADYEN_OLD_HMAC)
    adyen.verify(adyen_notification(good, old), {}, [ADYEN_HMAC, ADYEN_OLD_HMAC], time.time())
    with pytest.raises(SignatureInvalid):
        adyen.verify(adyen_notification(good, old), {}, [ADYEN_HMAC], time.time())
    for additional in ({}, {"hmacSignature": "\u00e9"}, {"hmacSignature": 7}):
        with pytest.raises(SignatureInvalid):
            adyen.verify(adyen_notification({**good, "additionalData": additional}), {}, [ADYEN_HMAC], time.time())
    with pytest.raises(SignatureInvalid):
        adyen.verify(b'{"live": "false"}', {}, [ADYEN_HMAC], time.time())


def test_checkout_signature_and_refusals() -> None:
    body = checkout_event("payment_captured", {"id": "pay_1", "reference": "pay_abc-checkout-capture-x",
                                               "amount": 1299})
    checkout.verify(body, checkout_headers(body), [CHECKOUT_SECRET], time.time())
    for headers, sent in ((checkout_headers(body, "other"), body), ({}, body),
                          (checkout_headers(body), body + b" "), ({"Cko-Signature": "\u00e9\ud800"}, body)):
        with pytest.raises(SignatureInvalid):
            checkout.verify(sent, headers, [CHECKOUT_SECRET], time.time())


def test_events_parse_into_one_domain_type() -> None:
    manual = {**INTENT, "capture_method": "manual",
              "metadata": {"gateway_payment_id": "pay_abc", "gateway_capture": "pay_abc-stripe-capture-k"}}
    [captured] = stripe_hooks.parse(stripe_event("payment_intent.succeeded", manual, "evt_1"))
    assert (captured.kind, captured.success, captured.follow_up_reference) == (
        EventKind.CAPTURE, True, "pay_abc-stripe-capture-k")
    refund = {"id": "re_1", "object": "refund", "amount": 500, "status": "failed", "payment_intent": "pi_1",
              "metadata": {"gateway_follow_up": "pay_abc-stripe-refund-k"}, "failure_reason": "expired_or_canceled_card"}
    [refused] = stripe_hooks.parse(stripe_event("refund.failed", refund))
    assert (refused.kind, refused.success, refused.amount, refused.reason) == (
        EventKind.REFUND, False, 500, "expired_or_canceled_card")
    failed = adyen.parse(adyen_notification(adyen_item("CAPTURE_FAILED", "PSP2", "pay_abc-adyen-capture-k", 10,
                                                        original="PSP1")))
    assert (failed[0].kind, failed[0].success, failed[0].provider_reference) == (EventKind.CAPTURE, False, "PSP1")
    [declined] = checkout.parse(checkout_event("payment_declined", {"id": "pay_1", "reference": "pay_abc",
                                                                    "response_code": "20051", "amount": True}))
    assert (declined.kind, declined.success, declined.payment_reference, declined.reason, declined.amount) == (
        EventKind.AUTHORISATION, False, "pay_abc", "20051", None)  # a bool is no amount
    [other] = checkout.parse(checkout_event("dispute_opened", {"id": "dsp_1"}))
    assert other.kind is EventKind.OTHER


@pytest.mark.parametrize("parse, body", [
    (stripe_hooks.parse, b"[]"), (stripe_hooks.parse, b'{"id": "evt_1", "type": "x"}'),
    (adyen.parse, b'{"notificationItems": [{"NotificationRequestItem": {"eventCode": "AUTHORISATION"}}]}'),
    (checkout.parse, b"not json"), (checkout.parse, b'{"id": "' + b"e" * 300 + b'", "type": "payment_approved"}'),
    # Signed, yet not readable: answered 400 like Stripe's, not journalled as `unchanged` (outside tester).
    (checkout.parse, b'{"id": "evt_1", "type": "payment_approved", "data": "x"}'),
    (checkout.parse, b'{"id": "evt_1", "type": "payment_approved"}'),
])
def test_unreadable_events_are_malformed_never_a_crash(parse, body) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedEvent):
        parse(body)


def _record(status: PaymentStatus, **extra: object) -> PaymentRecord:
    return PaymentRecord(id="pay_abc", client="checkout", amount=1299, currency="EUR",
                         merchant_reference="o-1", status=status, provider="adyen",
                         **{"capture": True, **extra})  # type: ignore[arg-type]


def _auth(success: bool) -> ProviderEvent:
    return ProviderEvent("e", EventKind.AUTHORISATION, "AUTHORISATION", success, "pay_abc", provider_reference="PSP")


def _refund(key: str, success: bool, *, reverses: bool = False, amount: int = 300,
            event_id: str = "e") -> ProviderEvent:
    return ProviderEvent(event_id, EventKind.REFUND, "REFUND_FAILED" if reverses else "REFUND", success, "pay_abc",
                         follow_up_reference=key, amount=amount, reverses=reverses)


def _pending_refund(record: PaymentRecord, key: str, amount: int) -> None:
    record.follow_up = PendingFollowUp("refund", amount, key, "checkout", f"front-{key}", record.status.value,
                                       started_at=0.0, deadline_s=5.0, answered=True)
    record.status = PaymentStatus.REFUND_PENDING


def test_a_late_failure_of_an_earlier_refund_while_another_is_pending_takes_its_amount_off() -> None:
    """Outside attack: Adyen's REFUND_FAILED for the first refund came while a second was
    pending; it was dropped as "another refund than the one pending", and the journal kept
    counting 300 the ledger never refunded."""
    record = _record(PaymentStatus.CAPTURED, captured_amount=1299)
    _pending_refund(record, "k-first", 300)
    assert decide(record, "adyen", _refund("k-first", True)).effect is Effect.FOLLOW_UP
    assert record.refunded_amount == 300
    _pending_refund(record, "k-second", 200)
    undone = decide(record, "adyen", _refund("k-first", False, reverses=True))
    assert (undone.effect, undone.provider_key, record.refunded_amount) == (Effect.FOLLOW_UP, "k-first", 0)
    assert record.follow_up is not None and record.follow_up.provider_key == "k-second", "still pending"
    assert decide(record, "adyen", _refund("k-second", True, amount=200)).effect is Effect.FOLLOW_UP
    assert (record.refunded_amount, record.status) == (200, PaymentStatus.REFUNDED)
    again = decide(record, "adyen", _refund("k-first", False, reverses=True, event_id="e2"))  # another delivery
    assert (again.effect, record.refunded_amount) == (Effect.NONE, 200)


def test_a_late_failure_of_a_refund_settled_as_not_made_changes_nothing() -> None:
    """Outside attack: a lookup settled the pending refund as failed (never counted), then the
    delayed `refund.failed` was applied as "failed after it succeeded" and took 200 off again."""
    record = _record(PaymentStatus.REFUNDED, captured_amount=1299, refunded_amount=300)
    _pending_refund(record, "k-second", 200)
    apply_follow_up(record, Operation.REFUND, Outcome.HARD_DECLINE)  # the reconciler's lookup: it failed
    assert record.refunded_amount == 300
    late = decide(record, "adyen", _refund("k-second", False, reverses=True, amount=200))
    assert (late.effect, record.refunded_amount, record.status) == (Effect.NONE, 300, PaymentStatus.REFUNDED)


def test_a_reversal_that_matches_no_follow_up_of_ours_changes_nothing() -> None:
    """Re-attack: a signed REFUNDED_REVERSED (or CAPTURE_FAILED) naming only the payment, for
    an amount none of our refunds had, took it off (one for 1000 wiped two refunds of 300 and
    200): a reversal of a refund we never made is not ours to apply."""
    record = _record(PaymentStatus.CAPTURED, captured_amount=1299)
    _pending_refund(record, "k-first", 300)
    decide(record, "adyen", _refund("k-first", True))
    stray = ProviderEvent("e9", EventKind.REFUND, "REFUNDED_REVERSED", False, "pay_abc",
                          follow_up_reference="pay_abc", amount=1000, reverses=True)
    assert (decide(record, "adyen", stray).effect, record.refunded_amount) == (Effect.NONE, 300)
    ours = ProviderEvent("e10", EventKind.REFUND, "REFUNDED_REVERSED", False, "pay_abc",
                         follow_up_reference="pay_abc", amount=300, reverses=True)
    assert (decide(record, "adyen", ours).effect, record.refunded_amount) == (Effect.FOLLOW_UP, 0)


def test_a_failure_for_a_payment_journalled_before_settled_follow_ups_were_kept_uses_the_amounts() -> None:
    record = _record(PaymentStatus.REFUNDED, captured_amount=1299, refunded_amount=300)
    assert decide(record, "adyen", _refund("k-old", False, reverses=True)).effect is Effect.FOLLOW_UP
    assert (record.refunded_amount, record.status) == (0, PaymentStatus.CAPTURED)


def test_the_state_machine_never_undoes_a_final_state_and_waits_for_a_live_request() -> None:
    captured = _record(PaymentStatus.CAPTURED, captured_amount=1299)
    assert decide(captured, "adyen", _auth(False)).effect is Effect.NONE
    assert (captured.status, captured.captured_amount) == (PaymentStatus.CAPTURED, 1299)
    assert decide(_record(PaymentStatus.ATTEMPTING), "adyen", _auth(True)).effect is Effect.WAIT
    pending = _record(PaymentStatus.PENDING)
    assert decide(pending, "adyen", _auth(True)).effect is Effect.PAYMENT
    assert (pending.status, pending.captured_amount, pending.provider_reference) == (PaymentStatus.APPROVED, 1299,
                                                                                      "PSP")
    declined = _record(PaymentStatus.DECLINED)
    alarm = decide(declined, "adyen", _auth(True))  # never applied over the final answer, but flagged
    assert (alarm.effect, alarm.alarm, declined.status) == (Effect.SUSPECT, True, PaymentStatus.DECLINED)
    assert declined.duplicate_charge_suspected
    assert (decide(declined, "adyen", _auth(True)).effect, declined.status) == (Effect.NONE, PaymentStatus.DECLINED)
    voided = _record(PaymentStatus.FAILED, error_code="expired", capture=False)  # the expiry's cancel voided it
    assert decide(voided, "adyen", _auth(True)).effect is Effect.NONE and not voided.duplicate_charge_suspected
    elsewhere = _record(PaymentStatus.APPROVED)
    assert decide(elsewhere, "stripe", _auth(True)).effect is Effect.SUSPECT and elsewhere.duplicate_charge_suspected
