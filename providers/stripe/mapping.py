"""Stripe PaymentIntents mapping: request building and answer classification, no I/O.

Facts from Stripe's API reference: form-encoded bodies, `Authorization: Bearer sk_…`,
`Idempotency-Key`, errors as `{"error": {"type", "code", "decline_code", "message"}}` with
HTTP 402 for card errors, and the `Stripe-Should-Retry` header as the provider's own verdict
on whether a retry can succeed.

`Stripe-Should-Retry` is read as stripe-python reads it (`_should_retry` in
`stripe/_http_client.py`): `true` means retrying can succeed (a lock timeout, a key still in
use), `false` that it cannot ("we expect the stripe-should-retry header to be false in most
cases when a 500 is returned, since our idempotency framework would typically replay it
anyway"). Neither says whether the request was processed, so neither changes a 5xx from
`unknown` (Stripe: treat a 500's result as indeterminate); the verdict travels as
`ProviderResult.retry_hint`.

Status queries retrieve the PaymentIntent (or search by our payment id in its metadata) with
`latest_charge.refunds` expanded: the charge carries `amount_captured` and the refunds, each
refund its `metadata` with our follow-up key. Since API version 2022-11-15 a Charge no longer
includes its refunds unless they are expanded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

from domain.outcome import Outcome
from domain.types import (
    FollowUp,
    FollowUpState,
    Lookup,
    Operation,
    PaymentOrder,
    ProviderResult,
    ShopperAction,
    StatusAnswer,
    ThreeDS,
)
from providers.base import ProviderRequest, ProviderResponse
from providers.classify import (
    error_status_table,
    json_list,
    json_object,
    lookup_failed,
    not_found,
    parse_retry_after,
    reject_status_query,
    status_outcome,
)

API_VERSION = "2024-06-20"
METADATA_KEY = "gateway_payment_id"
# Our follow-up keys, where Stripe echoes them: a capture's `metadata` is merged into the
# PaymentIntent's (one capture per intent), a refund keeps its own `metadata`. Cancel takes no
# metadata, so a void is known by the intent's `canceled` status alone (an intent cancels once).
CAPTURE_METADATA_KEY = "gateway_capture"
REFUND_METADATA_KEY = "gateway_follow_up"
RETRY_HEADER = "Stripe-Should-Retry"
# Expanded on status queries: the latest charge (captured amount) with its refunds.
STATUS_EXPAND = "latest_charge.refunds"

# decline_code -> class. Visa's rules: lost/stolen/closed-account declines are never retried.
DECLINE_CODES: Mapping[str, Outcome] = MappingProxyType(
    {
        "insufficient_funds": Outcome.HARD_DECLINE,
        "lost_card": Outcome.HARD_DECLINE,
        "stolen_card": Outcome.HARD_DECLINE,
        "pickup_card": Outcome.HARD_DECLINE,
        "fraudulent": Outcome.HARD_DECLINE,
        "merchant_blacklist": Outcome.HARD_DECLINE,
        "invalid_account": Outcome.HARD_DECLINE,
        "card_not_supported": Outcome.HARD_DECLINE,
        "expired_card": Outcome.HARD_DECLINE,
        "incorrect_number": Outcome.HARD_DECLINE,
        "invalid_number": Outcome.HARD_DECLINE,
        "incorrect_cvc": Outcome.HARD_DECLINE,
        "invalid_cvc": Outcome.HARD_DECLINE,
        "restricted_card": Outcome.HARD_DECLINE,
        "security_violation": Outcome.HARD_DECLINE,
        "do_not_honor": Outcome.SOFT_DECLINE,
        "generic_decline": Outcome.SOFT_DECLINE,
        "issuer_not_available": Outcome.SOFT_DECLINE,
        "try_again_later": Outcome.SOFT_DECLINE,
        "processing_error": Outcome.SOFT_DECLINE,
        "reenter_transaction": Outcome.SOFT_DECLINE,
    }
)
UNLISTED_DECLINE = Outcome.SOFT_DECLINE

# PaymentIntent.status -> class, for 2xx answers and status queries. `canceled` is not listed:
# what it means depends on who asks (see `_intent_result`'s callers).
INTENT_STATUS: Mapping[str, Outcome] = MappingProxyType(
    {
        "succeeded": Outcome.APPROVED,
        "requires_capture": Outcome.APPROVED,
        "processing": Outcome.UNKNOWN,
        "requires_payment_method": Outcome.SOFT_DECLINE,
        "requires_action": Outcome.ACTION_REQUIRED,  # the shopper authenticates first (3-D Secure)
        "requires_confirmation": Outcome.UNKNOWN,
    }
)

# Refund.status -> class of the refund as a listed follow-up.
REFUND_STATUS: Mapping[str, Outcome] = MappingProxyType(
    {
        "succeeded": Outcome.APPROVED,
        "pending": Outcome.UNKNOWN,  # accepted, not yet final
        "requires_action": Outcome.UNKNOWN,  # waits for the customer (some non-card methods)
        "failed": Outcome.HARD_DECLINE,
        "canceled": Outcome.HARD_DECLINE,
    }
)
# HTTP status of an error answer -> class, when no decline code decides it. Stripe's statuses
# mean what the shared table says (400 bad request, 401 bad key, 402 card errors decided above
# this table, 403 key without permission, 404 no such object, 409 key in use, 429 rate limit or
# lock timeout, 5xx "something went wrong on Stripe's end"): no row differs.
ERROR_STATUS: Mapping[int, Outcome] = error_status_table()


class StripeMapping:
    """Build and classify Stripe PaymentIntents calls for one account."""

    # Stripe stores the first answer for a key, a 500 included, and replays it.
    replays_answers = True
    has_status_lookup = True
    # Search is eventually consistent (Stripe: "typically under a minute" behind): an empty
    # result does not prove that a payment made seconds ago does not exist.
    status_query_consistent = False
    redirects = True

    def __init__(self, name: str, api_key: str, *, merchant_account: str | None = None) -> None:
        self.name = name
        self._auth = f"Bearer {api_key}"

    def _headers(self, idempotency_key: str | None) -> dict[str, str]:
        headers = {
            "Authorization": self._auth,
            "Stripe-Version": API_VERSION,
            "Content-Type": "application/x-www-form-urlencoded",
        }
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return headers

    def build(self, op: Operation, subject: PaymentOrder | FollowUp, idempotency_key: str | None) -> ProviderRequest:
        if op is Operation.AUTHORIZE:
            assert isinstance(subject, PaymentOrder)
            return ProviderRequest("POST", "/v1/payment_intents", self._headers(idempotency_key), _intent_form(subject))
        assert isinstance(subject, FollowUp)
        if op is Operation.COMPLETE:
            # After the redirect, Stripe has already confirmed the intent: retrieving it reads
            # the result. The browser's `payment_intent` must be this payment's.
            returned = subject.return_params.get("payment_intent")
            if returned is not None and returned != subject.provider_reference:
                raise ValueError("the return's payment_intent is not this payment's")
            headers = self._headers(None)
            del headers["Content-Type"]
            return ProviderRequest("GET", f"/v1/payment_intents/{quote(subject.provider_reference or '', safe='')}",
                                   headers)
        if op is Operation.STATUS:
            if subject.provider_reference:
                query = urlencode({"expand[]": STATUS_EXPAND})
                path = f"/v1/payment_intents/{quote(subject.provider_reference, safe='')}?{query}"
            else:
                query = urlencode({"query": f"metadata['{METADATA_KEY}']:'{subject.payment_id}'",
                                   "expand[]": f"data.{STATUS_EXPAND}"})
                path = f"/v1/payment_intents/search?{query}"
            headers = self._headers(None)
            del headers["Content-Type"]
            return ProviderRequest("GET", path, headers)
        ref = quote(subject.provider_reference or "", safe="")
        form: dict[str, str] = {}
        if op is Operation.CAPTURE:
            if subject.amount is not None:
                form["amount_to_capture"] = str(subject.amount)
            if subject.follow_up_id:
                form[f"metadata[{CAPTURE_METADATA_KEY}]"] = subject.follow_up_id
            return ProviderRequest(
                "POST", f"/v1/payment_intents/{ref}/capture", self._headers(idempotency_key), urlencode(form).encode()
            )
        if op is Operation.VOID:
            return ProviderRequest("POST", f"/v1/payment_intents/{ref}/cancel", self._headers(idempotency_key), b"")
        if op is Operation.REFUND:
            form["payment_intent"] = subject.provider_reference or ""
            if subject.amount is not None:
                form["amount"] = str(subject.amount)
            if subject.follow_up_id:
                form[f"metadata[{REFUND_METADATA_KEY}]"] = subject.follow_up_id
            return ProviderRequest("POST", "/v1/refunds", self._headers(idempotency_key), urlencode(form).encode())
        raise ValueError(f"unsupported operation {op}")

    def parse(self, op: Operation, response: ProviderResponse) -> ProviderResult:
        reject_status_query(op)
        doc = json_object(response.body)
        if response.status < 300:
            return _parse_success(op, response.status, doc)
        return _parse_error(response, doc)

    def parse_status(self, response: ProviderResponse) -> StatusAnswer:
        doc = json_object(response.body)
        if response.status >= 300:
            # 5xx and auth errors say nothing about the payment. Nor does a 404: we ask by id
            # only for an intent Stripe gave us, so "no such payment_intent" means another
            # account or key mode, not that nothing was charged.
            return lookup_failed(_parse_error(response, doc))
        if doc.get("object") == "search_result":
            intents = json_list(doc.get("data"))
            if not intents:
                # Proof of absence only as far as search is current: it lags ("typically under
                # a minute"), which `status_query_consistent = False` tells the engine.
                return not_found(response.status)
        else:
            intents = [doc]
        states = [(intent, _intent_state(intent, response.status)) for intent in intents]
        charged = [pair for pair in states if _charged(pair[0])]
        in_flight = [pair for pair in states if pair[1].outcome is Outcome.UNKNOWN]
        intent, result = (charged or in_flight or states)[0]
        follow_ups, listed = _follow_ups(intent)
        return StatusAnswer(Lookup.FOUND, result, charges=len(charged), follow_ups=follow_ups,
                            follow_ups_listed=listed)


def _intent_form(order: PaymentOrder) -> bytes:
    fields: list[tuple[str, str]] = [
        ("amount", str(order.amount)),
        ("currency", order.currency.lower()),
        ("confirm", "true"),
        ("capture_method", "automatic" if order.capture else "manual"),
        ("payment_method_types[]", "card"),
        (f"metadata[{METADATA_KEY}]", order.payment_id),
        ("metadata[merchant_reference]", order.merchant_reference),
    ]
    if order.description:
        fields.append(("description", order.description))
    if order.return_url:
        fields.append(("return_url", order.return_url))  # else Stripe answers `use_stripe_sdk`
    if order.three_ds is not ThreeDS.AUTOMATIC:
        fields.append(("payment_method_options[card][request_three_d_secure]", order.three_ds.value))
    if order.card is not None:
        card = order.card
        fields += [
            ("payment_method_data[type]", "card"),
            ("payment_method_data[card][number]", card.number.reveal()),
            ("payment_method_data[card][exp_month]", str(card.exp_month)),
            ("payment_method_data[card][exp_year]", str(card.exp_year)),
        ]
        if card.cvc:
            fields.append(("payment_method_data[card][cvc]", card.cvc.reveal()))
    elif order.token:
        fields.append(("payment_method", order.token.reveal()))
    return _form_encode(fields)


_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.\-~]*")


def _form_encode(fields: list[tuple[str, str]]) -> bytes:
    """`urlencode` for the hot path: most keys and values need no escaping, and checking
    that with one regex is several times cheaper than quoting every character."""
    return "&".join(
        f"{_quoted_key(k)}={v if _SAFE_VALUE.fullmatch(v) else quote_plus(v)}" for k, v in fields
    ).encode()


@lru_cache(maxsize=64)
def _quoted_key(key: str) -> str:
    return quote_plus(key)


def _parse_success(op: Operation, status: int, doc: dict) -> ProviderResult:
    if doc.get("object") == "refund":
        outcome = Outcome.APPROVED if doc.get("status") in ("succeeded", "pending") else Outcome.SOFT_DECLINE
        return ProviderResult(outcome, raw_code=doc.get("status"), http_status=status, reference=doc.get("id"),
                              provider_status=doc.get("status"), settles_later=doc.get("status") == "pending")
    # An answer to our own call: `canceled` is our void succeeding; after an authorisation or a
    # capture it is an intent canceled before capture, which holds no charge.
    return _intent_result(doc, status, canceled=Outcome.APPROVED if op is Operation.VOID else Outcome.HARD_DECLINE)


def _intent_result(intent: dict, http_status: int, *, canceled: Outcome) -> ProviderResult:
    """A PaymentIntent's state as an outcome, `canceled` being what a canceled intent means to
    the caller; a declined intent is refined by its `last_payment_error`."""
    intent_status = str(intent.get("status", ""))
    outcome = canceled if intent_status == "canceled" else INTENT_STATUS.get(intent_status, Outcome.UNKNOWN)
    raw = intent_status
    error = intent.get("last_payment_error") or {}
    if outcome is Outcome.SOFT_DECLINE and error:
        raw = error.get("decline_code") or error.get("code") or raw
        outcome = DECLINE_CODES.get(raw, UNLISTED_DECLINE)
    return ProviderResult(outcome, raw_code=raw, http_status=http_status, reference=intent.get("id"),
                          provider_status=intent_status,
                          action=_action(intent) if outcome is Outcome.ACTION_REQUIRED else None)


def _action(intent: dict) -> ShopperAction | None:
    """`next_action`: `redirect_to_url` (we sent a return_url), or `use_stripe_sdk` (Stripe.js
    runs it in the shopper's browser)."""
    action = intent.get("next_action")
    if not isinstance(action, dict):
        return None
    redirect = action.get("redirect_to_url")
    if action.get("type") == "redirect_to_url" and isinstance(redirect, dict) and redirect.get("url"):
        return ShopperAction("redirect", str(redirect["url"]), provider_action=action)
    sdk = action.get("use_stripe_sdk") if isinstance(action.get("use_stripe_sdk"), dict) else {}
    return ShopperAction("sdk", str(sdk.get("stripe_js") or ""), provider_action=action)


def _retry_hint(response: ProviderResponse) -> bool | None:
    """`Stripe-Should-Retry` exactly as stripe-python reads it: only "true" and "false" count."""
    value = response.headers.get(RETRY_HEADER)
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def _parse_error(response: ProviderResponse, doc: dict) -> ProviderResult:
    error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    err_type = error.get("type")
    code = error.get("decline_code") or error.get("code") or err_type or f"http_{response.status}"
    intent = error.get("payment_intent") if isinstance(error.get("payment_intent"), dict) else {}
    reference = intent.get("id")
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    retry_hint = _retry_hint(response)
    if err_type == "card_error":  # every card error is the issuer's or the card's answer
        outcome = DECLINE_CODES.get(code, UNLISTED_DECLINE)
    elif err_type == "idempotency_error":
        # In use (409): the first request may still succeed, so unknown; reused with other
        # parameters (400): our bug, rejected.
        outcome = Outcome.UNKNOWN if response.status == 409 else Outcome.REJECTED
    else:
        outcome = status_outcome(ERROR_STATUS, response.status)
        # `true` on a 4xx that is otherwise our fault means the request was turned away before
        # any endpoint ran (Stripe stores the result of every request that began executing, so
        # a retry could not succeed otherwise): nothing was processed.
        if retry_hint is True and outcome is Outcome.REJECTED:
            outcome = Outcome.UNAVAILABLE
    return ProviderResult(
        outcome,
        raw_code=code,
        http_status=response.status,
        reference=reference,
        retry_after_s=retry_after,
        message=error.get("message"),
        retry_hint=retry_hint,
    )


def _charge(intent: dict) -> dict[str, Any] | None:
    """The intent's latest charge, when expanded (the id alone says nothing about its state)."""
    charge = intent.get("latest_charge")
    return charge if isinstance(charge, dict) else None


def _charged(intent: dict) -> bool:
    """Whether the intent holds (or held) an authorised charge."""
    charge = _charge(intent)
    if charge is not None:
        return charge.get("status") == "succeeded"
    return intent.get("status") in ("succeeded", "requires_capture")


def _intent_state(intent: dict, http_status: int) -> ProviderResult:
    """The payment's state as a status query sees it. Unlike an answer to our own call, a
    `canceled` intent that holds a charge was authorised and then voided: an approval whose
    void is listed among the follow-ups; one without a charge never charged anything."""
    return _intent_result(intent, http_status,
                          canceled=Outcome.APPROVED if _charged(intent) else Outcome.HARD_DECLINE)


def _follow_ups(intent: dict) -> tuple[tuple[FollowUpState, ...], bool]:
    """The intent's capture, refunds and void, and whether that list is complete: it is when
    the charge and its refunds were expanded and no refund page was left out."""
    charge = _charge(intent)
    if charge is None:
        # No charge to capture or refund (a decline), or one we were not shown (not expanded).
        return (), intent.get("latest_charge") is None
    metadata = intent.get("metadata") if isinstance(intent.get("metadata"), dict) else {}
    states: list[FollowUpState] = []
    if charge.get("captured"):
        states.append(FollowUpState(Operation.CAPTURE, metadata.get(CAPTURE_METADATA_KEY),
                                    charge.get("amount_captured"), Outcome.APPROVED))
    refunds = charge.get("refunds") if isinstance(charge.get("refunds"), dict) else None
    for refund in json_list((refunds or {}).get("data")):
        refund_metadata = refund.get("metadata") if isinstance(refund.get("metadata"), dict) else {}
        states.append(FollowUpState(Operation.REFUND, refund_metadata.get(REFUND_METADATA_KEY), refund.get("amount"),
                                    REFUND_STATUS.get(str(refund.get("status")), Outcome.UNKNOWN)))
    if intent.get("status") == "canceled" and charge.get("status") == "succeeded":
        states.append(FollowUpState(Operation.VOID, None, intent.get("amount"), Outcome.APPROVED))
    listed = refunds is not None and refunds.get("has_more") is False
    return tuple(states), listed
