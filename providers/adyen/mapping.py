"""Adyen Checkout API v71 mapping: request building and answer classification, no I/O.

Facts from Adyen's Checkout API v71 (OpenAPI `CheckoutService-v71.json`) and its docs:
JSON bodies, `X-API-Key`, `Idempotency-Key` (at most 64 characters), `POST /payments` answering
HTTP 200 with a `resultCode` (a refusal is a 200 with `resultCode: Refused`, `refusalReason` and
`refusalReasonCode`; with "raw acquirer result" enabled `additionalData.refusalReasonRaw` carries
the scheme's own `"NN : text"`), modifications under `/payments/{pspReference}/captures|refunds|
cancels` answering 201 `{"status": "received"}`, and errors as
`{"status", "errorCode", "message", "errorType", "pspReference"}`.

Two provider verdicts take part in classification, in this order:
1. errorCode 704 ("request already processed or in progress") is UNKNOWN whatever else the
   answer says: *this* request was not processed, but the first one with the key may still
   charge, so neither a failover nor a "no charge" conclusion is safe.
2. The `transient-error: true` header is UNAVAILABLE, a 500 included: Adyen documents it as
   "no messaging could be initiated to an issuing system … a subsequent request using the same
   idempotency key will be processed as if it was the first request". A 500 *without* the header
   stays UNKNOWN: Adyen stores such an answer as final for the key because the issuer "could have
   received and acted upon" the message (and Adyen also uses 500 for some bad requests).

Status: Adyen's Checkout API has no payment lookup (results arrive by webhook; `/payments/details`
only submits a shopper's action result), so `has_status_lookup` is False and building STATUS
raises like any operation Adyen does not have: nothing asks Adyen for a payment. An unknown or
pending Adyen payment, and every modification answered `received`, is settled by its
notification (`providers.adyen.webhook`, `gateway.webhooks`). A void of a payment whose
pspReference we never got (an unknown answer) is Adyen's technical cancel, `POST /cancels` with
`paymentReference` (our payment id), reported by a TECHNICAL_CANCEL notification. `gateway preflight` reaches Adyen
with `probe`, `POST /paymentMethods` for the merchant account: a read the real Adyen answers for
a valid key, with no side effect.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import orjson

from domain.outcome import Outcome
from domain.types import (
    FollowUp,
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
    json_object,
    parse_retry_after,
    reject_status_query,
    status_outcome,
)

API_VERSION = "v71"
BASE_PATH = f"/{API_VERSION}"
# Why STATUS is not built (see the module docstring).
NO_LOOKUP = "Adyen has no payment lookup: its outcomes arrive by notification (webhook)"
# Preflight's harmless read: the merchant account's payment methods.
PROBE_PATH = f"{BASE_PATH}/paymentMethods"
# The details a shopper's return brings back, as `/payments/details` takes them.
RETURN_DETAILS = ("redirectResult", "threeDSResult")
# /payments requires `returnUrl` in v71 even for card payments that never redirect.
DEFAULT_RETURN_URL = "https://gateway.invalid/adyen/return"
TRANSIENT_ERROR_HEADER = "transient-error"
MAX_IDEMPOTENCY_KEY = 64  # Adyen: "a unique identifier … with a maximum of 64 characters"

# refusalReasonCode -> (refusalReason, class), from Adyen's "Refusal reasons" table. Hard: the
# card or shopper will not pass anywhere (lost/stolen/fraud/blocked/funds/invalid card, Visa's
# never-retry set); soft: the issuer or acquirer could not decide now.
REFUSAL_REASONS: Mapping[str, tuple[str, Outcome]] = MappingProxyType(
    {
        "0": ("Unknown", Outcome.SOFT_DECLINE),  # resultCode Error; a final state, nothing charged
        "2": ("Refused", Outcome.SOFT_DECLINE),  # generic: refined by the raw scheme code below
        "3": ("Referral", Outcome.SOFT_DECLINE),
        "4": ("Acquirer Error", Outcome.SOFT_DECLINE),
        "5": ("Blocked Card", Outcome.HARD_DECLINE),
        "6": ("Expired Card", Outcome.HARD_DECLINE),
        "7": ("Invalid Amount", Outcome.HARD_DECLINE),
        "8": ("Invalid Card Number", Outcome.HARD_DECLINE),
        "9": ("Issuer Unavailable", Outcome.SOFT_DECLINE),
        "10": ("Not supported", Outcome.HARD_DECLINE),
        "11": ("3D Not Authenticated", Outcome.SOFT_DECLINE),
        "12": ("Not enough balance", Outcome.HARD_DECLINE),
        "14": ("Acquirer Fraud", Outcome.HARD_DECLINE),
        "15": ("Cancelled", Outcome.SOFT_DECLINE),
        "16": ("Shopper Cancelled", Outcome.HARD_DECLINE),  # the shopper's own choice: never cascade
        "17": ("Invalid Pin", Outcome.HARD_DECLINE),
        "18": ("Pin tries exceeded", Outcome.HARD_DECLINE),
        "19": ("Pin validation not possible", Outcome.SOFT_DECLINE),
        "20": ("FRAUD", Outcome.HARD_DECLINE),
        "21": ("Not Submitted", Outcome.SOFT_DECLINE),
        "22": ("FRAUD-CANCELLED", Outcome.HARD_DECLINE),
        "23": ("Transaction Not Permitted", Outcome.HARD_DECLINE),
        "24": ("CVC Declined", Outcome.HARD_DECLINE),
        "25": ("Restricted Card", Outcome.HARD_DECLINE),
        "26": ("Revocation Of Auth", Outcome.HARD_DECLINE),
        "27": ("Declined Non Generic", Outcome.SOFT_DECLINE),  # generic: refined by the raw code
        "28": ("Withdrawal amount exceeded", Outcome.SOFT_DECLINE),
        "29": ("Withdrawal count exceeded", Outcome.SOFT_DECLINE),
        "31": ("Issuer Suspected Fraud", Outcome.HARD_DECLINE),
        "32": ("AVS Declined", Outcome.HARD_DECLINE),
        "38": ("Authentication required", Outcome.SOFT_DECLINE),
        "42": ("3DS Authentication Error", Outcome.SOFT_DECLINE),
        "46": ("Transaction blocked by Adyen to prevent excessive retry fees", Outcome.HARD_DECLINE),
    }
)
UNLISTED_DECLINE = Outcome.SOFT_DECLINE
# Adyen's catch-all reasons: the scheme's raw response code says more.
GENERIC_REFUSALS = frozenset({"2", "27"})

# Visa/Mastercard raw response code (the "NN" of refusalReasonRaw "NN : text") -> class, used
# only to refine a generic refusal. Visa: never retry lost/stolen/pick-up/closed-account.
RAW_SCHEME_CODES: Mapping[str, Outcome] = MappingProxyType(
    {
        "01": Outcome.SOFT_DECLINE,  # refer to card issuer
        "04": Outcome.HARD_DECLINE,  # pick up card
        "05": Outcome.SOFT_DECLINE,  # do not honor
        "06": Outcome.SOFT_DECLINE,  # error
        "07": Outcome.HARD_DECLINE,  # pick up card, special condition
        "12": Outcome.HARD_DECLINE,  # invalid transaction
        "14": Outcome.HARD_DECLINE,  # invalid card number
        "41": Outcome.HARD_DECLINE,  # lost card
        "43": Outcome.HARD_DECLINE,  # stolen card
        "46": Outcome.HARD_DECLINE,  # closed account
        "51": Outcome.HARD_DECLINE,  # insufficient funds
        "54": Outcome.HARD_DECLINE,  # expired card
        "57": Outcome.HARD_DECLINE,  # not permitted to cardholder
        "59": Outcome.HARD_DECLINE,  # suspected fraud
        "61": Outcome.SOFT_DECLINE,  # exceeds withdrawal amount limit
        "62": Outcome.HARD_DECLINE,  # restricted card
        "65": Outcome.SOFT_DECLINE,  # exceeds withdrawal count / authentication required
        "91": Outcome.SOFT_DECLINE,  # issuer unavailable
        "96": Outcome.SOFT_DECLINE,  # system malfunction
        "N7": Outcome.HARD_DECLINE,  # CVV2 failure
        "R0": Outcome.HARD_DECLINE,  # stop payment order
        "R1": Outcome.HARD_DECLINE,  # revocation of authorisation
        "R3": Outcome.HARD_DECLINE,  # revocation of all authorisations
    }
)
_RAW_CODE = re.compile(r"^\s*([0-9A-Z]{1,3})\s*:")

# resultCode -> class; None means "a decline, classified by the refusal tables".
RESULT_CODES: Mapping[str, Outcome | None] = MappingProxyType(
    {
        "Authorised": Outcome.APPROVED,
        "Refused": None,
        "Error": None,  # a final state: "an error when the payment was being processed"
        "Cancelled": None,
        "Received": Outcome.UNKNOWN,  # accepted, not yet processed: it may still charge
        "Pending": Outcome.UNKNOWN,  # final status not obtainable now
        "PartiallyAuthorised": Outcome.UNKNOWN,  # we never ask for partial auth: reconcile by hand
        # The shopper must act (the `action`), then `/payments/details` finishes the payment.
        "RedirectShopper": Outcome.ACTION_REQUIRED,
        "IdentifyShopper": Outcome.ACTION_REQUIRED,  # 3DS2 device fingerprint
        "ChallengeShopper": Outcome.ACTION_REQUIRED,  # native 3DS2 challenge
        "PresentToShopper": Outcome.ACTION_REQUIRED,  # a voucher or QR code
    }
)

# errorCode -> class, checked before the transient header and the HTTP status.
ERROR_CODES: Mapping[str, Outcome] = MappingProxyType(
    {
        "704": Outcome.UNKNOWN,  # "request already processed or in progress": the first may charge
    }
)

# HTTP status of an error answer -> class, when neither errorCode nor the transient header decides.
# Adyen's statuses mean what the shared table says (403 is 901 "Invalid Merchant Account" or 010
# "Not allowed": our configuration; 422 validation; a 500 without the transient header may have
# reached the issuer, and Adyen 00_503 is "our servers are unavailable", no "not processed"): no
# row differs. The not-processed signal is the header, read before this table.
ERROR_STATUS: Mapping[int, Outcome] = error_status_table()


class AdyenMapping:
    """Build and classify Adyen Checkout calls for one merchant account."""

    # Adyen replays the first answer for a key (and says 704 while it is still in progress).
    replays_answers = True
    # Real Adyen has no lookup: results come by webhook (`providers.adyen.webhook`) and nothing
    # asks (STATUS is never built); preflight reaches Adyen with `probe`.
    status_query_consistent = False
    has_status_lookup = False
    redirects = True

    def __init__(self, name: str, api_key: str, *, merchant_account: str | None = None,
                 return_url: str = DEFAULT_RETURN_URL) -> None:
        if not merchant_account:
            raise ValueError(f"{name}: Adyen needs a merchant_account on every request")
        self.name = name
        self.merchant_account = merchant_account
        self.return_url = return_url
        self._api_key = api_key

    def __repr__(self) -> str:  # never the API key
        return f"AdyenMapping({self.name!r}, merchant_account={self.merchant_account!r})"

    def _headers(self, idempotency_key: str | None) -> dict[str, str]:
        headers = {"X-API-Key": self._api_key, "Accept": "application/json", "Content-Type": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = adyen_idempotency_key(idempotency_key)
        return headers

    def build(self, op: Operation, subject: PaymentOrder | FollowUp, idempotency_key: str | None) -> ProviderRequest:
        if op is Operation.AUTHORIZE:
            assert isinstance(subject, PaymentOrder)
            return ProviderRequest("POST", f"{BASE_PATH}/payments", self._headers(idempotency_key),
                                   orjson.dumps(self._payment_body(subject)))
        assert isinstance(subject, FollowUp)
        if op is Operation.COMPLETE:
            details = {k: subject.return_params[k] for k in RETURN_DETAILS if subject.return_params.get(k)}
            if not details:
                raise ValueError("Adyen's /payments/details needs the return's redirectResult or threeDSResult")
            return ProviderRequest("POST", f"{BASE_PATH}/payments/details", self._headers(idempotency_key),
                                   orjson.dumps({"details": details}))
        if op is Operation.STATUS:  # Adyen has none: see the module docstring
            raise ValueError(f"{op}: {NO_LOOKUP}")
        if op is Operation.VOID and not subject.provider_reference:
            # The technical cancel: by our reference, for a payment whose pspReference an unknown
            # answer never gave us (Adyen "Cancel an authorisation using your reference").
            doc = {"merchantAccount": self.merchant_account, "paymentReference": subject.payment_id,
                   "reference": subject.follow_up_id or subject.payment_id}
            return ProviderRequest("POST", f"{BASE_PATH}/cancels", self._headers(idempotency_key), orjson.dumps(doc))
        if not subject.provider_reference:
            raise ValueError(f"{op}: Adyen modifications need the payment's pspReference")
        base = f"{BASE_PATH}/payments/{quote(subject.provider_reference, safe='')}"
        doc: dict[str, Any] = {"merchantAccount": self.merchant_account,
                               "reference": subject.follow_up_id or subject.payment_id}
        if op is Operation.VOID:
            return ProviderRequest("POST", f"{base}/cancels", self._headers(idempotency_key), orjson.dumps(doc))
        if op in (Operation.CAPTURE, Operation.REFUND):
            if subject.amount is None or not subject.currency:
                raise ValueError(f"{op}: Adyen requires the amount and currency of a {op}")
            doc["amount"] = {"value": subject.amount, "currency": subject.currency.upper()}
            suffix = "captures" if op is Operation.CAPTURE else "refunds"
            return ProviderRequest("POST", f"{base}/{suffix}", self._headers(idempotency_key), orjson.dumps(doc))
        raise ValueError(f"unsupported operation {op}")

    def _payment_body(self, order: PaymentOrder) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "amount": {"value": order.amount, "currency": order.currency.upper()},
            # Our payment id is the reference: it is what a status query looks the payment up by.
            "reference": order.payment_id,
            "merchantOrderReference": order.merchant_reference,
            "merchantAccount": self.merchant_account,
            "returnUrl": order.return_url or self.return_url,
        }
        if order.three_ds is not ThreeDS.AUTOMATIC:
            doc["authenticationData"] = {"attemptAuthentication": "always"}
            if order.three_ds is ThreeDS.CHALLENGE:
                doc["threeDS2RequestData"] = {"threeDSRequestorChallengeInd": "04"}  # challenge mandated
        if order.card is not None:
            card = order.card
            method: dict[str, Any] = {
                "type": "scheme",
                "number": card.number.reveal(),
                "expiryMonth": f"{card.exp_month:02d}",
                "expiryYear": str(card.exp_year),
            }
            if card.cvc:
                method["cvc"] = card.cvc.reveal()
            if card.holder_name:
                method["holderName"] = card.holder_name
            doc["shopperInteraction"] = "Ecommerce"
        elif order.token:
            # A stored token: Adyen also expects the shopperReference it was stored under, which
            # PaymentOrder does not carry yet.
            method = {"type": "scheme", "storedPaymentMethodId": order.token.reveal()}
            doc["shopperInteraction"] = "ContAuth"
            doc["recurringProcessingModel"] = "CardOnFile"
        else:
            raise ValueError("an Adyen payment needs a card or a stored token")
        doc["paymentMethod"] = method
        if order.capture:
            doc["captureDelayHours"] = 0  # immediate automatic capture, whatever the account default
        else:
            doc["additionalData"] = {"manualCapture": "true"}
        if order.country:
            doc["countryCode"] = order.country.upper()
        return doc

    def parse(self, op: Operation, response: ProviderResponse) -> ProviderResult:
        reject_status_query(op)
        doc = json_object(response.body)
        if response.status < 300:
            return _parse_success(op, response.status, doc)
        return _parse_error(op, response, doc)

    def parse_status(self, response: ProviderResponse) -> StatusAnswer:
        """Never reached: no status query is built (`build` refuses STATUS)."""
        raise ValueError(NO_LOOKUP)

    def probe(self) -> ProviderRequest:
        """`POST /paymentMethods` for our merchant account: what preflight sends to prove the
        path, the TLS session, the API key and the account. It lists the account's payment
        methods and changes nothing (Checkout API v71, "Get a list of available payment methods")."""
        return ProviderRequest("POST", PROBE_PATH, self._headers(None),
                               orjson.dumps({"merchantAccount": self.merchant_account}))


def adyen_idempotency_key(key: str) -> str:
    """Our key, or its SHA-256 hex digest (exactly 64 characters) when it is longer than Adyen
    accepts: deterministic, so every retry still sends the key Adyen saw first."""
    return key if len(key) <= MAX_IDEMPOTENCY_KEY else hashlib.sha256(key.encode()).hexdigest()


def classify_refusal(code: str | None, reason: str | None, raw: str | None,
                     fallback: str = "Refused") -> tuple[Outcome, str]:
    """A refusal's class and the code to log (and to list in a route's `cascade_on`):
    `refusalReasonCode`, or `code:scheme` (e.g. `2:05`, Refused with raw "05 : Do not honor")
    when the raw scheme response refined one of Adyen's generic reasons."""
    if not code and reason:
        code = _CODE_BY_REASON.get(reason.strip().lower())
    entry = REFUSAL_REASONS.get(code or "")
    outcome = entry[1] if entry else UNLISTED_DECLINE
    label = code or reason or fallback
    if (code is None or code in GENERIC_REFUSALS) and raw:
        match = _RAW_CODE.match(raw)
        if match is not None:
            scheme = match[1].zfill(2) if match[1].isdigit() else match[1]
            if scheme in RAW_SCHEME_CODES:
                return RAW_SCHEME_CODES[scheme], f"{label}:{scheme}"
    return outcome, label


_CODE_BY_REASON = {text.lower(): code for code, (text, _) in REFUSAL_REASONS.items()}


def _classify_payment(doc: dict, status: int) -> ProviderResult:
    result_code = str(doc.get("resultCode", ""))
    outcome = RESULT_CODES.get(result_code, Outcome.UNKNOWN)
    raw = result_code or None
    message = doc.get("refusalReason")
    extra: dict[str, str] = {}
    additional = doc.get("additionalData") if isinstance(doc.get("additionalData"), dict) else {}
    if outcome is None:
        code = doc.get("refusalReasonCode")
        raw_reason = additional.get("refusalReasonRaw")
        outcome, raw = classify_refusal(str(code) if code is not None else None, message, raw_reason,
                                        fallback=result_code)
        if raw_reason:
            extra["refusalReasonRaw"] = str(raw_reason)
    if doc.get("status"):
        extra["lifecycle"] = str(doc["status"])
    return ProviderResult(outcome, raw_code=raw, http_status=status, reference=doc.get("pspReference"),
                          provider_status=result_code or None, message=message, extra=extra,
                          action=_action(doc) if outcome is Outcome.ACTION_REQUIRED else None)


def _action(doc: dict) -> ShopperAction | None:
    """Adyen's `action`: `redirect` (url, method, and form `data` for a POST) is followed by
    the browser; anything else (`threeDS2`, `voucher`, `qrCode`) is for Adyen's client component."""
    action = doc.get("action")
    if not isinstance(action, dict):
        return None
    if action.get("type") == "redirect" and action.get("url"):
        data = action.get("data") if isinstance(action.get("data"), dict) else {}
        return ShopperAction("redirect", str(action["url"]), str(action.get("method") or "GET"),
                             {str(k): str(v) for k, v in data.items()}, action)
    return ShopperAction("sdk", str(action.get("url") or ""), provider_action=action)


def _parse_success(op: Operation, status: int, doc: dict) -> ProviderResult:
    if op in (Operation.AUTHORIZE, Operation.COMPLETE):
        return _classify_payment(doc, status)
    # Modifications: 201 {"status": "received"}: accepted, and the outcome itself (CAPTURE with
    # success true, or false, or CAPTURE_FAILED days later) arrives by webhook.
    mod_status = str(doc.get("status", ""))
    received = mod_status == "received"
    return ProviderResult(Outcome.APPROVED if received else Outcome.UNKNOWN, raw_code=mod_status or f"http_{status}",
                          http_status=status, reference=doc.get("pspReference"), provider_status=mod_status or None,
                          settles_later=received)


def _parse_error(op: Operation, response: ProviderResponse, doc: dict) -> ProviderResult:
    code = str(doc.get("errorCode") or "") or None
    transient = response.headers.get(TRANSIENT_ERROR_HEADER, "").strip().lower() == "true"
    if code in ERROR_CODES:
        outcome = ERROR_CODES[code]
    elif transient:
        outcome = Outcome.UNAVAILABLE
    else:
        outcome = status_outcome(ERROR_STATUS, response.status)
    extra = {"errorType": str(doc["errorType"])} if doc.get("errorType") else {}
    if transient:
        extra["transient"] = "true"
    if doc.get("pspReference"):
        # The failed *request's* reference, not a payment's: a status query by it would find
        # nothing and wrongly conclude "no charge", so it is kept for the log only.
        extra["pspReference"] = str(doc["pspReference"])
    return ProviderResult(
        outcome,
        raw_code=code or f"http_{response.status}",
        http_status=response.status,
        retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
        message=doc.get("message"),
        extra=extra,
        # Adyen: after a transient error the same key is "processed as if it was the first
        # request", and a 704 duplicate can be retried once the first has finished.
        retry_hint=True if transient else None,
    )
