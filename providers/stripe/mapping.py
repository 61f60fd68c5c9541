"""Stripe PaymentIntents mapping: request building and answer classification, no I/O.

Facts from Stripe's API reference: form-encoded bodies, `Authorization: Bearer sk_…`,
`Idempotency-Key`, errors as `{"error": {"type", "code", "decline_code", "message"}}` with
HTTP 402 for card errors, and the `Stripe-Should-Retry` header as the provider's own verdict
on whether a retry can succeed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
import re
from functools import lru_cache
from urllib.parse import quote, quote_plus, urlencode


from domain.outcome import Outcome
from domain.types import FollowUp, Operation, PaymentOrder, ProviderResult
from providers.base import ProviderRequest, ProviderResponse
from providers.classify import json_object, parse_retry_after

API_VERSION = "2024-06-20"
METADATA_KEY = "gateway_payment_id"

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

# PaymentIntent.status -> class, for 2xx answers and status queries.
INTENT_STATUS: Mapping[str, Outcome] = MappingProxyType(
    {
        "succeeded": Outcome.APPROVED,
        "requires_capture": Outcome.APPROVED,
        "canceled": Outcome.APPROVED,  # a void succeeded; for any other operation see _parse_success
        "processing": Outcome.UNKNOWN,
        "requires_payment_method": Outcome.SOFT_DECLINE,
        "requires_action": Outcome.SOFT_DECLINE,
        "requires_confirmation": Outcome.UNKNOWN,
    }
)

# HTTP status of an error answer -> class, when no decline code decides it.
ERROR_STATUS: Mapping[int, Outcome] = MappingProxyType(
    {
        400: Outcome.REJECTED,
        401: Outcome.UNAVAILABLE,  # our credentials: nothing was processed, another provider can serve
        403: Outcome.UNAVAILABLE,
        404: Outcome.REJECTED,
        409: Outcome.UNKNOWN,  # idempotency key in use: the first request may still charge
        429: Outcome.UNAVAILABLE,
        500: Outcome.UNKNOWN,
        502: Outcome.UNKNOWN,  # a proxy's answer: the provider behind it may have processed it
        503: Outcome.UNAVAILABLE,
        504: Outcome.UNKNOWN,
    }
)


class StripeMapping:
    """Build and classify Stripe PaymentIntents calls for one account."""

    # Stripe stores the first answer for a key, a 500 included, and replays it.
    replays_answers = True
    # Search is eventually consistent (Stripe: "typically under a minute" behind): an empty
    # result does not prove that a payment made seconds ago does not exist.
    status_query_consistent = False

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
        if op is Operation.STATUS:
            if subject.provider_reference:
                path = f"/v1/payment_intents/{quote(subject.provider_reference, safe='')}"
            else:
                query = urlencode({"query": f"metadata['{METADATA_KEY}']:'{subject.payment_id}'"})
                path = f"/v1/payment_intents/search?{query}"
            headers = self._headers(None)
            del headers["Content-Type"]
            return ProviderRequest("GET", path, headers)
        ref = quote(subject.provider_reference or "", safe="")
        if op is Operation.CAPTURE:
            form = {"amount_to_capture": subject.amount} if subject.amount is not None else {}
            return ProviderRequest(
                "POST", f"/v1/payment_intents/{ref}/capture", self._headers(idempotency_key), urlencode(form).encode()
            )
        if op is Operation.VOID:
            return ProviderRequest("POST", f"/v1/payment_intents/{ref}/cancel", self._headers(idempotency_key), b"")
        if op is Operation.REFUND:
            form = {"payment_intent": subject.provider_reference or ""}
            if subject.amount is not None:
                form["amount"] = str(subject.amount)
            return ProviderRequest("POST", "/v1/refunds", self._headers(idempotency_key), urlencode(form).encode())
        raise ValueError(f"unsupported operation {op}")

    def parse(self, op: Operation, response: ProviderResponse) -> ProviderResult:
        doc = json_object(response.body)
        if response.status < 300:
            return _parse_success(op, response.status, doc)
        return _parse_error(response, doc)


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
    if op is Operation.STATUS and doc.get("object") == "search_result":
        items = doc.get("data") or []
        if not items:
            return ProviderResult(Outcome.APPROVED, raw_code="not_found", http_status=status, found=False)
        doc = items[0]
    if doc.get("object") == "refund":
        outcome = Outcome.APPROVED if doc.get("status") in ("succeeded", "pending") else Outcome.SOFT_DECLINE
        return ProviderResult(outcome, raw_code=doc.get("status"), http_status=status, reference=doc.get("id"),
                              provider_status=doc.get("status"))
    intent_status = str(doc.get("status", ""))
    outcome = INTENT_STATUS.get(intent_status, Outcome.UNKNOWN)
    if intent_status == "canceled" and op is not Operation.VOID:
        outcome = Outcome.HARD_DECLINE  # an intent canceled before capture holds no charge
    raw = intent_status
    error = doc.get("last_payment_error") or {}
    if outcome is Outcome.SOFT_DECLINE and error:
        raw = error.get("decline_code") or error.get("code") or raw
        outcome = DECLINE_CODES.get(raw, UNLISTED_DECLINE)
    return ProviderResult(outcome, raw_code=raw, http_status=status, reference=doc.get("id"), provider_status=intent_status)


def _parse_error(response: ProviderResponse, doc: dict) -> ProviderResult:
    error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    err_type = error.get("type")
    code = error.get("decline_code") or error.get("code") or err_type or f"http_{response.status}"
    intent = error.get("payment_intent") if isinstance(error.get("payment_intent"), dict) else {}
    reference = intent.get("id")
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if err_type == "card_error":  # every card error is the issuer's or the card's answer
        outcome = DECLINE_CODES.get(code, UNLISTED_DECLINE)
    elif err_type == "idempotency_error":
        # In use (409): the first request may still succeed, so unknown; reused with other
        # parameters (400): our bug, rejected.
        outcome = Outcome.UNKNOWN if response.status == 409 else Outcome.REJECTED
    else:
        outcome = ERROR_STATUS.get(response.status, Outcome.UNKNOWN if response.status >= 500 else Outcome.REJECTED)
        # Stripe's own verdict: `true` on a 4xx (a lock timeout, say) means nothing was
        # processed and a retry with the same key can succeed.
        if response.headers.get("Stripe-Should-Retry") == "true" and outcome is Outcome.REJECTED:
            outcome = Outcome.UNAVAILABLE
    return ProviderResult(
        outcome,
        raw_code=code,
        http_status=response.status,
        reference=reference,
        retry_after_s=retry_after,
        message=error.get("message"),
        found=response.status != 404,
    )
