"""Checkout.com Unified Payments mapping: request building and answer classification, no I/O.

Facts from Checkout.com's API reference and docs:
- `POST /payments` with a JSON body, `Authorization: Bearer sk_…` (sandbox keys `sk_sbox_…`) and
  `Cko-Idempotency-Key`. Our payment id goes into `reference`, which `GET /payments?reference=`
  ("Get a list of payments") finds again when we never learnt the provider's `pay_…` id.
- A processed payment is `201` whether approved or not: `approved` (bool), `status`,
  `response_code` (five digits: 10xxx approved, 20xxx soft decline, 30xxx hard decline, 40xxx
  risk), `response_summary`, `id` (`pay_…`), `action_id`. `202` with `status: Pending` means the
  payment exists but is not finished (a 3DS redirect, an asynchronous method).
- Captures, refunds and voids (`POST /payments/{id}/captures|refunds|voids`) answer `202
  Accepted` with an `action_id`: the action was accepted and is processed asynchronously.
- Errors: `401` (our key), `403` (action not allowed in the payment's state), `404`, `422`
  `{request_id, error_type, error_codes}` (invalid request), `429`, `500`, `502`.

Status queries come in three shapes: `GET /payments?reference=` by our payment id (every payment
with that reference: more than one charged is a suspected duplicate), `GET /payments/{id}` by the
provider's id (the payment's state and balances), and `GET /payments/{id}/actions` ("Get payment
actions": every Authorization, Capture, Refund and Void with its `amount`, `approved`,
`response_code` and our `reference`) when the query names a follow-up. The actions list holds the
actions processed so far; one accepted (`202`) but not yet processed is not in it yet.

Idempotency, as the "Idempotency" page documents it, is where Checkout.com differs: only a
request that was processed successfully is stored for its key. After a 5xx the same key is
processed as a new attempt, so retrying a 500 with the same key can charge twice: this mapping
says so (`replays_answers = False`), and the engine settles such an unknown with a status query
before anything is sent again. Concurrent requests with one key get `429 Too many requests` for all but the first, the
same status a rate limit uses; see `_classify_429`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlencode

import orjson

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
    json_value,
    lookup_failed,
    not_found,
    parse_retry_after,
    reject_status_query,
    status_outcome,
)

IDEMPOTENCY_HEADER = "Cko-Idempotency-Key"
REQUEST_ID_HEADER = "Cko-Request-Id"
ACTION_PATHS: Mapping[Operation, str] = MappingProxyType(
    {Operation.CAPTURE: "captures", Operation.REFUND: "refunds", Operation.VOID: "voids"}
)
STATUS_LIST_LIMIT = 10  # payments sharing one reference; more than one means a retry created another
# Action `type` (GET /payments/{id}/actions) -> the follow-up it is; the authorisation is the payment itself.
ACTION_TYPES: Mapping[str, Operation] = MappingProxyType(
    {"Capture": Operation.CAPTURE, "Refund": Operation.REFUND, "Void": Operation.VOID}
)
AUTHORIZATION_TYPES = frozenset({"Authorization", "Card Verification"})

# response_code -> class, for declined payments. Visa's rules: lost, stolen and closed-account
# declines are never retried; fraud, insufficient funds and invalid or expired cards are not
# cascaded either. Codes not listed fall back on Checkout's documented ranges (CODE_RANGES).
RESPONSE_CODES: Mapping[str, Outcome] = MappingProxyType(
    {
        # 20xxx that need the cardholder or issuer to act before anything can succeed
        "20004": Outcome.HARD_DECLINE,  # Pick up card
        "20012": Outcome.HARD_DECLINE,  # Invalid transaction
        "20014": Outcome.HARD_DECLINE,  # Invalid card number
        "20041": Outcome.HARD_DECLINE,  # Lost card (usually reported as 30041)
        "20043": Outcome.HARD_DECLINE,  # Stolen card (usually reported as 30043)
        "20046": Outcome.HARD_DECLINE,  # Account closed
        "20051": Outcome.HARD_DECLINE,  # Insufficient funds
        "20054": Outcome.HARD_DECLINE,  # Expired card
        "20056": Outcome.HARD_DECLINE,  # No card record
        "20057": Outcome.HARD_DECLINE,  # Transaction not permitted to cardholder
        "20059": Outcome.HARD_DECLINE,  # Suspected fraud
        "20062": Outcome.HARD_DECLINE,  # Restricted card
        "20063": Outcome.HARD_DECLINE,  # Security violation
        "20078": Outcome.HARD_DECLINE,  # Blocked, first use: the cardholder must unblock the card
        "20082": Outcome.HARD_DECLINE,  # No security model (negative CVV results)
        "20087": Outcome.HARD_DECLINE,  # Bad track data (invalid CVV and/or expiry date)
        "200N7": Outcome.HARD_DECLINE,  # Decline for CVV2 failure
        "200R1": Outcome.HARD_DECLINE,  # Issuer stop payment (revocation order), this authorization
        "200R3": Outcome.HARD_DECLINE,  # Issuer stop payment (revocation order), all authorizations
        "20154": Outcome.HARD_DECLINE,  # 3DS authentication required: no other acquirer avoids it
        # 20xxx where a later attempt, or another acquirer, may succeed
        "20001": Outcome.SOFT_DECLINE,  # Refer to card issuer
        "20002": Outcome.SOFT_DECLINE,  # Refer to card issuer, special conditions
        "20005": Outcome.SOFT_DECLINE,  # Declined - Do not honour
        "20019": Outcome.SOFT_DECLINE,  # Re-enter transaction
        "20020": Outcome.SOFT_DECLINE,  # Invalid response
        "20022": Outcome.SOFT_DECLINE,  # Suspected malfunction
        "20061": Outcome.SOFT_DECLINE,  # Activity amount limit exceeded
        "20065": Outcome.SOFT_DECLINE,  # Activity count limit exceeded
        "20068": Outcome.SOFT_DECLINE,  # Response received too late / timeout
        "20091": Outcome.SOFT_DECLINE,  # Issuer unavailable
        "20092": Outcome.SOFT_DECLINE,  # Destination cannot be found for routing
        "20096": Outcome.SOFT_DECLINE,  # System malfunction
        "20099": Outcome.SOFT_DECLINE,  # Other / unidentified
        "20153": Outcome.SOFT_DECLINE,  # 3DS system malfunction
        # 30xxx hard declines
        "30004": Outcome.HARD_DECLINE,  # Pick up card
        "30007": Outcome.HARD_DECLINE,  # Pick up card, special conditions
        "30015": Outcome.HARD_DECLINE,  # No such issuer
        "30033": Outcome.HARD_DECLINE,  # Expired card - pick up
        "30034": Outcome.HARD_DECLINE,  # Suspected fraud - pick up
        "30041": Outcome.HARD_DECLINE,  # Lost card - pick up
        "30043": Outcome.HARD_DECLINE,  # Stolen card - pick up
        # 40xxx risk responses: our own risk rules blocked it; another provider must not bypass them
        "40101": Outcome.HARD_DECLINE,  # Risk blocked transaction
        "40108": Outcome.HARD_DECLINE,  # Gateway reject - post code failed
    }
)
# First digit of an unlisted code -> class: the ranges Checkout documents.
CODE_RANGES: Mapping[str, Outcome] = MappingProxyType(
    {
        "2": Outcome.SOFT_DECLINE,  # "declined, though subsequent attempts may be successful"
        "3": Outcome.HARD_DECLINE,  # "most hard declines require the issuer or cardholder to rectify"
        "4": Outcome.HARD_DECLINE,  # risk responses
        "5": Outcome.HARD_DECLINE,  # declined by Checkout.com
    }
)
UNLISTED_DECLINE = Outcome.SOFT_DECLINE
# Payment details (status queries) carry no response_code. A reconciled decline whose reason we
# never saw is treated as hard, so it is never cascaded to another provider.
DECLINE_WITHOUT_CODE = Outcome.HARD_DECLINE

# Payment `status` -> class, for 2xx answers and status queries.
PAYMENT_STATUS: Mapping[str, Outcome] = MappingProxyType(
    {
        "Authorized": Outcome.APPROVED,
        "Card Verified": Outcome.APPROVED,
        "Captured": Outcome.APPROVED,
        "Partially Captured": Outcome.APPROVED,
        "Refunded": Outcome.APPROVED,
        "Partially Refunded": Outcome.APPROVED,
        "Voided": Outcome.APPROVED,  # it was authorised, then a void succeeded
        "Expired": Outcome.APPROVED,  # it was authorised, the authorisation lapsed uncaptured
        "Paid": Outcome.APPROVED,
        "Pending": Outcome.UNKNOWN,  # exists, not finished: answer pending and reconcile
        "Retry Scheduled": Outcome.UNKNOWN,
        "Declined": DECLINE_WITHOUT_CODE,  # refined by response_code when the answer has one
        "Canceled": DECLINE_WITHOUT_CODE,  # final, nothing charged, reason unknown
    }
)
CHARGED_STATUSES = frozenset(s for s, o in PAYMENT_STATUS.items() if o is Outcome.APPROVED)

# HTTP status of an error answer -> class: the shared table, with Checkout.com's differences.
# 429 is decided by `_classify_429` (a rate limit or a concurrent request with our key); 5xx stay
# unknown, and after one the key was not stored, so only a status query may settle it.
ERROR_STATUS: Mapping[int, Outcome] = error_status_table(
    {
        403: Outcome.REJECTED,  # "Capture/Void/Refund not allowed" in the payment's current state: our request
    }
)


def decline_outcome(response_code: str | None) -> Outcome:
    """Class of a declined payment's response_code: the table, else the documented range."""
    if not response_code:
        return DECLINE_WITHOUT_CODE
    listed = RESPONSE_CODES.get(response_code)
    if listed is not None:
        return listed
    return CODE_RANGES.get(response_code[:1], UNLISTED_DECLINE)


class CheckoutMapping:
    """Build and classify Checkout.com Unified Payments calls for one account.

    `merchant_account`, when given, is sent as `processing_channel_id` (`pc_…`).
    """

    # Only 2xx answers are stored for a key: after a 5xx the same key is processed again.
    replays_answers = False
    # GET /payments?reference= lists what Checkout.com holds for our reference.
    status_query_consistent = True
    has_status_lookup = True
    redirects = True

    def __init__(self, name: str, api_key: str, *, merchant_account: str | None = None) -> None:
        self.name = name
        self._auth = f"Bearer {api_key}"
        self._processing_channel = merchant_account

    def _headers(self, idempotency_key: str | None, *, body: bool = True) -> dict[str, str]:
        headers = {"Authorization": self._auth}
        if body:
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        return headers

    def build(self, op: Operation, subject: PaymentOrder | FollowUp, idempotency_key: str | None) -> ProviderRequest:
        if op is Operation.AUTHORIZE:
            assert isinstance(subject, PaymentOrder)
            return ProviderRequest("POST", "/payments", self._headers(idempotency_key),
                                   orjson.dumps(self._payment_body(subject)))
        assert isinstance(subject, FollowUp)
        if op is Operation.COMPLETE:
            # "Get payment details" by the session id the shopper came back with (or by ours).
            wanted = subject.return_params.get("cko-session-id") or subject.provider_reference or ""
            return ProviderRequest("GET", f"/payments/{quote(wanted, safe='')}", self._headers(None, body=False))
        if op is Operation.STATUS:
            if subject.provider_reference:
                path = f"/payments/{quote(subject.provider_reference, safe='')}"
                if subject.follow_up_id:
                    path += "/actions"  # the follow-ups are listed apart from the payment
            else:
                query = urlencode({"reference": subject.payment_id, "limit": STATUS_LIST_LIMIT, "skip": 0})
                path = f"/payments?{query}"
            return ProviderRequest("GET", path, self._headers(None, body=False))
        suffix = ACTION_PATHS.get(op)
        if suffix is None:
            raise ValueError(f"unsupported operation {op}")
        if not subject.provider_reference:
            raise ValueError(f"{op} needs the provider's payment id (follow-ups stay with their provider)")
        action: dict[str, Any] = {}
        if op is not Operation.VOID and subject.amount is not None:
            action["amount"] = subject.amount  # omitted: the full remaining amount
        action["reference"] = subject.follow_up_id or subject.payment_id
        path = f"/payments/{quote(subject.provider_reference, safe='')}/{suffix}"
        return ProviderRequest("POST", path, self._headers(idempotency_key), orjson.dumps(action))

    def _payment_body(self, order: PaymentOrder) -> dict[str, Any]:
        source: dict[str, Any]
        if order.card is not None:
            card = order.card
            source = {"type": "card", "number": card.number.reveal(), "expiry_month": card.exp_month,
                      "expiry_year": card.exp_year}
            if card.cvc:
                source["cvv"] = card.cvc.reveal()
            if card.holder_name:
                source["name"] = card.holder_name
        elif order.token and order.token.reveal().startswith("tok_"):
            source = {"type": "token", "token": order.token.reveal()}  # a one-time Frames token
        elif order.token:
            source = {"type": "id", "id": order.token.reveal()}  # a stored source or instrument (src_…)
        else:
            raise ValueError("a payment needs a card or a token")
        body: dict[str, Any] = {
            "source": source,
            "amount": order.amount,
            "currency": order.currency.upper(),
            "reference": order.payment_id,
            "capture": order.capture,
            "payment_type": "Regular",
            "metadata": {"merchant_reference": order.merchant_reference},
        }
        if order.description:
            body["description"] = order.description
        if self._processing_channel:
            body["processing_channel_id"] = self._processing_channel
        if order.return_url:
            # 3-D Secure only when asked for, and only with somewhere to send the shopper back;
            # success and failure both come back to the return URL, whose /complete reads the result.
            indicator = {ThreeDS.AUTOMATIC: "no_preference", ThreeDS.ANY: "no_preference",
                         ThreeDS.CHALLENGE: "challenge_requested"}[order.three_ds]
            body["3ds"] = {"enabled": True, "challenge_indicator": indicator}
            body["success_url"] = body["failure_url"] = order.return_url
        return body

    def parse(self, op: Operation, response: ProviderResponse) -> ProviderResult:
        reject_status_query(op)
        doc = json_object(response.body)
        if response.status < 300:
            return _parse_success(op, response, doc)
        return _parse_error(op, response, doc)

    def parse_status(self, response: ProviderResponse) -> StatusAnswer:
        if response.status >= 300:
            # Only an explicit empty list proves absence: a 404 may be a proxy or a wrong path.
            return lookup_failed(_parse_error(Operation.STATUS, response, json_object(response.body)))
        doc = json_value(response.body)
        extra = _request_id(response, doc if isinstance(doc, dict) else {})
        if isinstance(doc, list):
            return _actions_status(response.status, json_list(doc), extra)
        if not isinstance(doc, dict):
            return lookup_failed(ProviderResult(Outcome.UNKNOWN, raw_code="unreadable_answer",
                                                http_status=response.status, extra=extra))
        if isinstance(doc.get("data"), list):
            payments = json_list(doc["data"])
            if not payments:
                return not_found(response.status, extra)
            charged = [p for p in payments if _is_charged(p)]
            result = _parse_payment(response.status, _chosen(payments, charged), extra)
            return StatusAnswer(Lookup.FOUND, result, charges=len(charged))
        return StatusAnswer(Lookup.FOUND, _parse_payment(response.status, doc, extra),
                            charges=1 if _is_charged(doc) else 0)


def _request_id(response: ProviderResponse, doc: dict) -> dict[str, str]:
    request_id = response.headers.get(REQUEST_ID_HEADER) or doc.get("request_id")
    return {"request_id": str(request_id)} if request_id else {}


def _parse_success(op: Operation, response: ProviderResponse, doc: dict) -> ProviderResult:
    extra = _request_id(response, doc)
    if op in (Operation.CAPTURE, Operation.REFUND, Operation.VOID):
        # 202 Accepted: the action is queued with the payment (its id is the action's reference)
        # and processed asynchronously: `payment_captured` or `payment_capture_declined` follows.
        return ProviderResult(Outcome.APPROVED, raw_code="accepted", http_status=response.status,
                              reference=doc.get("action_id"), provider_status="Accepted", extra=extra,
                              settles_later=True)
    return _parse_payment(response.status, doc, extra)


def _parse_payment(http_status: int, doc: dict, extra: dict[str, str]) -> ProviderResult:
    status = str(doc.get("status") or "")
    code = doc.get("response_code")
    links = doc.get("_links") if isinstance(doc.get("_links"), dict) else {}
    redirect = links.get("redirect") if isinstance(links.get("redirect"), dict) else {}
    if doc.get("approved") is True:
        outcome = Outcome.APPROVED
    elif status == "Pending" and redirect.get("href"):
        # 202 Pending with a redirect link: the shopper authenticates (3-D Secure) first.
        return ProviderResult(Outcome.ACTION_REQUIRED, raw_code=status, http_status=http_status,
                              reference=doc.get("id"), provider_status=status, extra=extra,
                              action=ShopperAction("redirect", str(redirect["href"]), provider_action=redirect))
    elif PAYMENT_STATUS.get(status) is Outcome.UNKNOWN:
        # Pending (202: a 3DS redirect or an asynchronous method): the payment exists but is not
        # finished, so the engine answers pending and reconciles; it never fails over.
        outcome = Outcome.UNKNOWN
    elif status == "Declined" or (doc.get("approved") is False and code):
        outcome = decline_outcome(code)
    else:
        outcome = PAYMENT_STATUS.get(status, Outcome.UNKNOWN)  # unrecognised: settle by status query
    return ProviderResult(outcome, raw_code=code or status or f"http_{http_status}", http_status=http_status,
                          reference=doc.get("id"), provider_status=status or None,
                          message=doc.get("response_summary"), extra=extra)


def _is_charged(payment: dict) -> bool:
    return payment.get("status") in CHARGED_STATUSES or payment.get("approved") is True


def _chosen(payments: list[dict], charged: list[dict]) -> dict:
    """Which of the payments under one reference the answer reports (newest first): a charge
    anywhere in the list decides, then one still in flight, then the latest."""
    pending = [p for p in payments if PAYMENT_STATUS.get(str(p.get("status"))) is Outcome.UNKNOWN]
    return (charged or pending or payments)[0]


def _actions_status(http_status: int, actions: list[dict], extra: dict[str, str]) -> StatusAnswer:
    """`GET /payments/{id}/actions`, newest first: the authorisation gives the payment's state,
    the captures, refunds and voids its follow-ups. The list names no payment id, so the
    result's `reference` stays empty: the caller asked by it."""
    authorization = next((a for a in actions if a.get("type") in AUTHORIZATION_TYPES), None)
    if authorization is None:
        # A payment still pending (a 3DS redirect, an asynchronous method) has no authorisation yet.
        result = ProviderResult(Outcome.UNKNOWN, raw_code="Pending", http_status=http_status, extra=extra)
    else:
        code = authorization.get("response_code")
        outcome = Outcome.APPROVED if authorization.get("approved") is True else decline_outcome(code)
        result = ProviderResult(outcome, raw_code=code or str(authorization.get("type")), http_status=http_status,
                                provider_status=str(authorization.get("type")),
                                message=authorization.get("response_summary"), extra=extra)
    follow_ups = tuple(
        FollowUpState(ACTION_TYPES[str(a["type"])], a.get("reference"), a.get("amount"), _action_outcome(a))
        for a in actions if a.get("type") in ACTION_TYPES
    )
    return StatusAnswer(Lookup.FOUND, result, charges=1 if result.outcome is Outcome.APPROVED else 0,
                        follow_ups=follow_ups, follow_ups_listed=True)


def _action_outcome(action: dict) -> Outcome:
    approved = action.get("approved")
    if approved is True:
        return Outcome.APPROVED
    return Outcome.HARD_DECLINE if approved is False else Outcome.UNKNOWN


def _classify_429(op: Operation, response: ProviderResponse) -> Outcome:
    """Checkout answers a concurrent request with an idempotency key still in flight with a bare
    `429 Too many requests`: the first request may yet charge, so failing over would risk a double
    charge. A 429 is read as a plain rate limit (unavailable) only when it says when to come back
    (`Retry-After`) or when it answers a read, which carries no key."""
    if op is Operation.STATUS or response.headers.get("Retry-After"):
        return Outcome.UNAVAILABLE
    return Outcome.UNKNOWN


def _parse_error(op: Operation, response: ProviderResponse, doc: dict) -> ProviderResult:
    error_codes = doc.get("error_codes") if isinstance(doc.get("error_codes"), list) else []
    code = (str(error_codes[0]) if error_codes else None) or doc.get("error_type") or f"http_{response.status}"
    if response.status == 429:
        outcome = _classify_429(op, response)
    else:
        outcome = status_outcome(ERROR_STATUS, response.status)
    extra = _request_id(response, doc)
    message = doc.get("error_type")
    if error_codes:
        message = f"{message}: {', '.join(map(str, error_codes))}"
    return ProviderResult(
        outcome,
        raw_code=code,
        http_status=response.status,
        retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
        message=message,
        extra=extra,
    )
