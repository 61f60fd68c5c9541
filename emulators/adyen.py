"""An Adyen-shaped emulator: Checkout v71 `/payments`, its modifications and Adyen's test triggers.

Behaviour as Adyen documents it for its test environment:
- Refusals come from the card holder name (`DECLINED`, `NOT_ENOUGH_BALANCE`, …, or
  `"<ADYEN CODE> : <scheme code> : <raw text>"` such as `DECLINED : 05 : Do not honor`) or from
  `additionalData.RequestedTestAcquirerResponseCode`; Adyen's own test cards all approve.
  `SCENARIO_CARDS` adds card numbers of this emulator's own (Luhn-valid, not Adyen's) that act as
  those holder names, so drills can pick a behaviour by card alone.
- `additionalData.RequestedTestErrorResponseCode`: `NO_CONNECTION_AVAILABLE` answers an error with
  `transient-error: true`, nothing processed, and the key is *not* kept (the next request with it
  is processed as the first); `IOEXCEPTION_RECEIVED` processes the payment (the issuer "could have
  acted upon" it), answers 500 without the header, and keeps that answer for the key.
- Idempotency: the first answer for a key is replayed (`store_policy = "all"`); a duplicate while
  the first is still processing gets `409 {"errorCode": "704", "message": "request already
  processed or in progress"}` (the answer Adyen integrators report) with `transient-error: true`.
  Adyen documents no distinct error for a key reused with another body; this emulator answers
  that with a 422 validation error under Adyen's catch-all errorCode `000`.

`POST /v71/paymentMethods` answers the merchant account's methods as Adyen does
(`{"paymentMethods": [{"name": "Cards", "type": "scheme", "brands": [...]}]}`), with the same
API-key, mTLS and merchant-account checks as every route: it is what `gateway preflight` sends.

Emulator extensions, not part of Adyen's API:
- `GET /v71/payments?reference=…` and `GET /v71/payments/{pspReference}` (request counter
  operation `status`): a payment lookup the real Adyen does not have. Nothing in the gateway calls
  it; it is kept so that a payment lookup that reached Adyen is counted (`GET /_emulator/requests`,
  the webhook-chaos drill's `lookups_by_provider`) instead of vanishing into a 404/405 no counter
  sees. Each payment lists its modifications as the webhook reports them (`eventCode` CAPTURE,
  REFUND or CANCELLATION, the modification's `pspReference`, our `reference`, `amount`, `success`).
- Modifications are validated synchronously (422) where the request itself is wrong.

Webhooks: standard notifications, one `NotificationRequestItem` per POST
(`{"live": "false", "notificationItems": [{"NotificationRequestItem": {…}}]}`), with eventCode
AUTHORISATION (success true/false), CAPTURE, CAPTURE_FAILED, REFUND, REFUND_FAILED, CANCELLATION,
each signed in `additionalData.hmacSignature`: base64 HMAC-SHA256, under the hex HMAC key, of
`pspReference:originalReference:merchantAccountCode:merchantReference:value:currency:eventCode:success`
("Verify HMAC signatures"; the Adyen libraries' `is_valid_hmac_notification`). A modification
answers 201 `received` and its outcome comes only by notification: `fail_by_notification` makes it
`CAPTURE`/`REFUND`/`CANCELLATION` with `success: "false"` ("refused"), or for captures and
refunds `success: "true"` then `CAPTURE_FAILED`/`REFUND_FAILED` ("failed_later"); either way the
ledger never counts it. Retries: at 9 s, 18 s and 27 s after the first failure, then the retry
queue: 2 m, 5 m, 10 m, 15 m, 30 m, 1 h, 2 h, 4 h, 8 h, then every 8 hours up to 30 days
("Troubleshoot webhooks").

3-D Secure (Adyen's 3D Secure 2 test cards, `THREEDS_CARDS`): a challenge card answers
`resultCode: RedirectShopper` with `action: {type: "redirect", paymentMethodType: "scheme", url,
method: "GET"}` (the redirect flow), or, when the request prefers native 3DS2
(`authenticationData.threeDSRequestData.nativeThreeDS: "preferred"`), `ChallengeShopper` with
`action: {type: "threeDS2", subtype: "challenge", token, authorisationToken, paymentData}` whose
token carries the challenge page as `acsURL`. The page stands in for Adyen's test ACS (password
"password" passes, any other fails): Complete authorises, Fail refuses with refusalReasonCode 11
"3D Not Authenticated", each with its AUTHORISATION notification, and the browser goes back to the
`returnUrl` with `redirectResult` (native: `threeDSResult`, in place of the 3DS2 component).
`POST /v71/payments/details` with `details.redirectResult` or `details.threeDSResult` answers the
result; a payment still waiting for its shopper can be cancelled (`/cancels`), which ends its page.
`POST /v71/cancels` with `paymentReference` (the technical cancel: by the merchant's reference, for
a payment whose pspReference it never got) cancels the same way, reported as TECHNICAL_CANCEL.
The frictionless card authorises at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson
from aiohttp import web

from domain.cards import luhn_valid
from emulators.faults import FaultRule
from emulators.idempotency import Claim, ProviderIdempotency, StoredAnswer
from providers.adyen.mapping import API_VERSION, PROBE_PATH, REFUSAL_REASONS, TRANSIENT_ERROR_HEADER
from emulators.ledger import LedgerEntry
from emulators.server import ApiRoute, EmulatorRequest, ProviderEmulator, json_response
from emulators.threeds import Challenge, ChallengeState, Flow, ThreeDSCard, with_query
from emulators.webhooks import RetrySchedule, SignedRequest

BASE = f"/{API_VERSION}"
# The lookup the real Adyen does not have (see the module docstring).
LOOKUP_PATH = f"{BASE}/payments"
# What `/paymentMethods` lists for a merchant account: card schemes, as Adyen's test accounts have.
CARD_BRANDS = ("visa", "mc", "amex", "maestro")


@dataclass(frozen=True, slots=True)
class SimulatedResult:
    """One outcome Adyen's test environment can produce: resultCode and refusalReasonCode."""

    result_code: str
    reason_code: str | None = None


# Adyen's holder-name triggers ("Testing result codes and refusal reasons"); the number is the
# matching RequestedTestAcquirerResponseCode and refusalReasonCode.
HOLDER_NAME_TRIGGERS: dict[str, SimulatedResult] = {
    "UNKNOWN": SimulatedResult("Error", "0"),
    "APPROVED": SimulatedResult("Authorised"),
    "DECLINED": SimulatedResult("Refused", "2"),
    "REFERRAL": SimulatedResult("Refused", "3"),
    "ERROR": SimulatedResult("Error", "4"),
    "BLOCK_CARD": SimulatedResult("Refused", "5"),
    "CARD_EXPIRED": SimulatedResult("Refused", "6"),
    "INVALID_AMOUNT": SimulatedResult("Refused", "7"),
    "INVALID_CARD_NUMBER": SimulatedResult("Refused", "8"),
    "ISSUER_UNAVAILABLE": SimulatedResult("Refused", "9"),
    "NOT_SUPPORTED": SimulatedResult("Refused", "10"),
    "NOT_3D_AUTHENTICATED": SimulatedResult("Refused", "11"),
    "NOT_ENOUGH_BALANCE": SimulatedResult("Refused", "12"),
    "PENDING": SimulatedResult("Received"),
    "ACQUIRER_FRAUD": SimulatedResult("Refused", "14"),
    "CANCELLED": SimulatedResult("Refused", "15"),
    "SHOPPER_CANCELLED": SimulatedResult("Refused", "16"),
}
_ACQUIRER_RESPONSE_CODES = {"1": "APPROVED", "13": "PENDING"} | {
    result.reason_code: name for name, result in HOLDER_NAME_TRIGGERS.items() if result.reason_code is not None
}
# "<ADYEN CODE> : <scheme code> : <raw text>", e.g. "DECLINED : 05 : Do not honor".
_CUSTOM_TRIGGER = re.compile(r"^\s*(?P<name>[A-Z_]+)\s*:\s*(?P<raw>[0-9A-Za-z]{1,3}\s*:.*\S)\s*$")

# Card number (or stored payment method id) -> holder-name trigger it behaves as; None approves,
# as does any number not listed. The first group are Adyen's published test cards; the 4400…
# numbers are this emulator's own.
TEST_CARDS: dict[str, str | None] = {
    "4111111145551142": None,  # Visa
    "4111111111111111": None,  # Visa, used in Adyen's API examples
    "5555341244441115": None,  # Mastercard
    "2222400070000005": None,  # Mastercard 2-series
    "370000000000002": None,  # American Express
    "4400000000000016": "NOT_ENOUGH_BALANCE",
    "4400000000000024": "DECLINED : 43 : Stolen card",
    "4400000000000032": "DECLINED : 05 : Do not honor",
    "4400000000000040": "ISSUER_UNAVAILABLE",
    "4400000000000057": "BLOCK_CARD",
    "4400000000000065": "CARD_EXPIRED",
    "4400000000000073": "ACQUIRER_FRAUD",
    "4400000000000081": "DECLINED : 41 : Lost card",
    "4400000000000099": "ERROR",
    "4400000000000107": "PENDING",
    "4400000000000115": "DECLINED",
}
# Card number -> 3-D Secure behaviour: Adyen's 3D Secure 2 test cards (its test-card page and
# adyen-web's test constants). A failed challenge is the test ACS's wrong password, on any of them.
THREEDS_CARDS: dict[str, ThreeDSCard] = {
    "4212345678910006": ThreeDSCard(Flow.CHALLENGE),  # Visa, challenge-only flow
    "4917610000000000": ThreeDSCard(Flow.CHALLENGE),  # Visa, 3D Secure 2
    "5000550000000029": ThreeDSCard(Flow.CHALLENGE),  # Maestro, full flow (fingerprint, then challenge)
    "5201281505129736": ThreeDSCard(Flow.FRICTIONLESS),  # Mastercard, frictionless flow
}
PENDING_AUTHENTICATION = "pending_authentication"
# The 3-D Secure cards drills use, by behaviour (a challenge's outcome is the shopper's choice).
THREEDS_SCENARIO_CARDS: dict[str, str] = {
    "frictionless": "5201281505129736",
    "challenge": "4212345678910006",
}
# The cards drills and the contract suite use for each behaviour, by a provider-neutral name.
SCENARIO_CARDS: dict[str, str] = {
    "approve": "4111111145551142",
    "insufficient_funds": "4400000000000016",
    "stolen_card": "4400000000000024",
    "do_not_honor": "4400000000000032",
    "issuer_unavailable": "4400000000000040",
}
# Modification kind -> the eventCode of the webhook that reports it.
MODIFICATION_EVENT_CODES = {"capture": "CAPTURE", "refund": "REFUND", "cancel": "CANCELLATION",
                            "technical_cancel": "TECHNICAL_CANCEL"}
# What the scheme's later rejection of a successful modification is reported as.
LATER_FAILURE_EVENT_CODES = {"capture": "CAPTURE_FAILED", "refund": "REFUND_FAILED"}
MODIFICATION_OPERATIONS = {"capture": "capture", "refund": "refund", "cancel": "void", "technical_cancel": "void"}
WEBHOOK_RETRIES = RetrySchedule.filled((9.0, 9.0, 9.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
                                        14400.0, 28800.0), 28800.0, 30 * 86400.0)
# The fields of a NotificationRequestItem its HMAC signs, in order (value and currency: amount's).
HMAC_FIELDS = ("pspReference", "originalReference", "merchantAccountCode", "merchantReference", "value",
               "currency", "eventCode", "success")
TEST_ERROR_TRIGGER = "RequestedTestErrorResponseCode"
TEST_ACQUIRER_TRIGGER = "RequestedTestAcquirerResponseCode"


@dataclass(frozen=True, slots=True)
class Decision:
    result: SimulatedResult
    raw: str  # additionalData.refusalReasonRaw


def holder_name_trigger(name: str | None) -> Decision | None:
    """Adyen's holder-name triggers as documented (upper case), plain or with a raw response."""
    if not name:
        return None
    name = name.strip()
    if name in HOLDER_NAME_TRIGGERS:
        result = HOLDER_NAME_TRIGGERS[name]
        return Decision(result, _reason_text(result) or ("AUTHORISED" if result.result_code == "Authorised" else ""))
    match = _CUSTOM_TRIGGER.match(name)
    if match is not None and match["name"] in HOLDER_NAME_TRIGGERS:
        return Decision(HOLDER_NAME_TRIGGERS[match["name"]], match["raw"])
    return None


def resolve_trigger(value: str | None) -> Decision | None:
    """Any way of naming an outcome: a holder-name trigger (any case), a refusalReasonCode /
    RequestedTestAcquirerResponseCode, or a refusalReason text. Used for injected declines."""
    if not value:
        return None
    text = value.strip()
    found = holder_name_trigger(text) or holder_name_trigger(text.upper())
    if found is not None:
        return found
    if text in _ACQUIRER_RESPONSE_CODES:
        return holder_name_trigger(_ACQUIRER_RESPONSE_CODES[text])
    if text in REFUSAL_REASONS:  # a code with no holder-name trigger, e.g. "24" CVC Declined
        return Decision(SimulatedResult("Error" if text == "0" else "Refused", text), REFUSAL_REASONS[text][0])
    for code, (reason, _) in REFUSAL_REASONS.items():
        if reason.lower() == text.lower():
            return resolve_trigger(code)
    return None


def _reason_text(result: SimulatedResult) -> str | None:
    return REFUSAL_REASONS[result.reason_code][0] if result.reason_code in REFUSAL_REASONS else None


def notification_hmac(item: dict[str, Any], hex_key: str) -> str:
    """`additionalData.hmacSignature` of one NotificationRequestItem."""
    fields = {**item, "value": item["amount"]["value"], "currency": item["amount"]["currency"]}
    signing_string = ":".join(str(fields.get(name, "")) for name in HMAC_FIELDS)
    mac = hmac.new(binascii.unhexlify(hex_key), signing_string.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def notification_item(event_code: str, success: bool, psp: str, entry: LedgerEntry, amount: int, *,
                      original: str | None = None, merchant_reference: str | None = None,
                      reason: str = "", additional: dict[str, str] | None = None) -> dict[str, Any]:
    """One NotificationRequestItem before signing; `originalReference` only on modifications."""
    item: dict[str, Any] = {
        "additionalData": dict(additional or {}),
        "amount": {"currency": entry.currency, "value": amount},
        "eventCode": event_code,
        "eventDate": datetime.now(UTC).isoformat(timespec="seconds"),
        "merchantAccountCode": entry.extra.get("merchantAccount") or "",
        "merchantReference": merchant_reference or entry.payment_ref,
        "pspReference": psp,
        "reason": reason,
        "success": "true" if success else "false",
    }
    if original is not None:
        item["originalReference"] = original
    if event_code == "AUTHORISATION" and success:
        item["operations"] = ["CANCEL", "CAPTURE", "REFUND"]
    return item


APPROVAL = Decision(SimulatedResult("Authorised"), "AUTHORISED")
GENERIC_REFUSAL = Decision(HOLDER_NAME_TRIGGERS["DECLINED"], "Refused")
NOT_AUTHENTICATED = Decision(HOLDER_NAME_TRIGGERS["NOT_3D_AUTHENTICATED"], "3D Not Authenticated")


def _expiry_decision(method: dict) -> Decision | None:
    """Adyen: "an invalid expiry date … returns a generic DECLINED refusal reason"."""
    try:
        month, year = int(method.get("expiryMonth", 12)), int(method.get("expiryYear", 9999))
    except (TypeError, ValueError):
        return GENERIC_REFUSAL
    today = date.today()
    if not 1 <= month <= 12 or (year, month) < (today.year, today.month):
        return GENERIC_REFUSAL
    return None


def _error(status: int, code: str, message: str, error_type: str, *, psp: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    doc: dict[str, Any] = {"status": status, "errorCode": code, "message": message, "errorType": error_type}
    if psp:
        doc["pspReference"] = psp
    return json_response(status, doc, headers)


def _validation(code: str, message: str, status: int = 422) -> web.Response:
    return _error(status, code, message, "validation")


class _AdyenIdempotency(ProviderIdempotency):
    """Adyen keeps every answer for a key except a transient error's: after one, the next
    request with the key "will be processed as if it was the first request"."""

    def __init__(self) -> None:
        super().__init__("all")
        self._transient: set[str] = set()

    def mark_transient(self, key: str) -> None:
        self._transient.add(key)

    def finish(self, key: str, answer: StoredAnswer) -> None:
        if key in self._transient:
            self._transient.discard(key)
            self.abandon(key)
            return
        super().finish(key, answer)

    def clear(self) -> None:
        super().clear()
        self._transient.clear()


class AdyenEmulator(ProviderEmulator):
    name = "adyen"
    idempotency_header = "Idempotency-Key"
    store_policy = "all"
    ledger_prefix = "EMUA"  # + 12 digits: a 16-character pspReference, as Adyen's are
    webhook_retries = WEBHOOK_RETRIES

    def __init__(self, api_key: str | None = None, merchant_account: str | None = None) -> None:
        super().__init__()
        self.idempotency: _AdyenIdempotency = _AdyenIdempotency()
        self._api_key = api_key
        self._merchant_account = merchant_account
        self._modification_seq = itertools.count(1)
        self.modifications: list[dict[str, Any]] = []

    def routes(self) -> list[ApiRoute]:
        return [
            ApiRoute("POST", f"{BASE}/payments", self._payments, "authorize"),
            ApiRoute("POST", f"{BASE}/payments/details", self._details, "complete"),
            ApiRoute("POST", PROBE_PATH, self._payment_methods, "payment_methods", idempotent=False),
            ApiRoute("GET", LOOKUP_PATH, self._find_by_reference, "status", idempotent=False),
            ApiRoute("GET", f"{LOOKUP_PATH}/{{psp}}", self._find_by_psp, "status", idempotent=False),
            ApiRoute("POST", f"{BASE}/payments/{{psp}}/captures", self._capture, "capture"),
            ApiRoute("POST", f"{BASE}/payments/{{psp}}/refunds", self._refund, "refund"),
            ApiRoute("POST", f"{BASE}/payments/{{psp}}/cancels", self._cancel, "void"),
            ApiRoute("POST", f"{BASE}/cancels", self._technical_cancel, "void"),
        ]

    def authenticate(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("X-API-Key", "").strip()
        if not key or (self._api_key is not None and key != self._api_key):
            return _error(401, "000", "HTTP Status Response - Unauthorized", "security")
        return None

    def error_response(self, fault: FaultRule) -> web.Response:
        status = fault.status
        # Adyen's own not-processed signal, only for an error before processing.
        headers = {TRANSIENT_ERROR_HEADER: "true"} if fault.transient and not fault.after_processing else None
        if status == 500:
            return _error(500, "701", "server could not process request", "internal", headers=headers)
        if status == 401:
            return _error(401, "000", "HTTP Status Response - Unauthorized", "security", headers=headers)
        if status == 403:
            return _error(403, "010", "Not allowed", "security", headers=headers)
        if status >= 500:
            return _error(status, "000", "Service Unavailable", "internal", headers=headers)
        return _error(status, "000", "Unable to process request", "validation", headers=headers)

    def rate_limited_response(self, retry_after_s: float) -> web.Response:
        return _error(429, "000", "Too many requests", "internal", headers={"Retry-After": f"{retry_after_s:g}"})

    def idempotency_conflict(self, claim: Claim) -> web.Response:
        if claim is Claim.IN_FLIGHT:
            return _error(409, "704", "request already processed or in progress", "validation",
                          headers={TRANSIENT_ERROR_HEADER: "true"})
        return _validation("000", "Idempotency-Key was already used with a different request")

    def sign_webhook(self, doc: dict[str, Any], secret: str, now: float) -> SignedRequest:
        item = {**doc, "additionalData": {**doc["additionalData"], "hmacSignature": notification_hmac(doc, secret)}}
        body = orjson.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": item}]})
        return SignedRequest(body, {"Content-Type": "application/json", "User-Agent": "Adyen HttpClient 1.0"})

    def forge_webhook(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "success": "false" if doc["success"] == "true" else "true"}

    def check_webhook_secret(self, secret: str) -> None:
        try:
            if not binascii.unhexlify(secret):
                raise ValueError("empty")
        except (binascii.Error, ValueError) as exc:
            raise ValueError("an Adyen HMAC key is hexadecimal") from exc

    def _notify(self, operation: str, item: dict[str, Any]) -> None:
        event_id = f"{item['pspReference']}:{item['eventCode']}:{item['success']}"
        self.notify(operation, event_id, item["eventCode"], item)

    def _merchant_problem(self, doc: dict) -> web.Response | None:
        account = doc.get("merchantAccount")
        if not account or (self._merchant_account is not None and account != self._merchant_account):
            return _error(403, "901", "Invalid Merchant Account", "security")
        return None

    def _payment_doc(self, entry: LedgerEntry) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "pspReference": entry.id,
            "resultCode": entry.extra["resultCode"],
            "merchantReference": entry.payment_ref,
            "amount": {"value": entry.amount, "currency": entry.currency},
        }
        if entry.decline_code is not None:
            doc["refusalReason"] = REFUSAL_REASONS.get(entry.decline_code, ("Refused",))[0]
            doc["refusalReasonCode"] = entry.decline_code
        if entry.extra.get("refusalReasonRaw"):
            doc["additionalData"] = {"refusalReasonRaw": entry.extra["refusalReasonRaw"]}
            if entry.approved:
                doc["additionalData"]["authCode"] = entry.extra["authCode"]
        if entry.status == PENDING_AUTHENTICATION:
            doc["action"] = entry.extra["action"]
        return doc

    def _status_doc(self, entry: LedgerEntry) -> dict[str, Any]:
        return {**self._payment_doc(entry), "merchantAccount": entry.extra.get("merchantAccount"),
                "status": entry.status,
                "capturedAmount": {"value": entry.captured, "currency": entry.currency},
                "refundedAmount": {"value": entry.refunded, "currency": entry.currency},
                "modifications": list(entry.extra.get("modifications", []))}

    async def _payments(self, ctx: EmulatorRequest) -> web.Response:
        doc = self._request_doc(ctx)
        if isinstance(doc, web.Response):
            return doc
        amount = doc.get("amount")
        if not isinstance(amount, dict) or "value" not in amount:
            return _validation("100", "Required object 'amount' is not provided.")
        value, currency = amount.get("value"), str(amount.get("currency") or "")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return _validation("137", "Invalid amount specified")
        if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
            return _validation("138", "Unsupported currency specified")
        reference = doc.get("reference")
        if not isinstance(reference, str) or not reference:
            return _validation("130", "Required field 'reference' is not provided.")
        if not doc.get("returnUrl"):
            return _validation("14_030", "Return URL is missing.")
        method = doc.get("paymentMethod") if isinstance(doc.get("paymentMethod"), dict) else {}
        number = str(method.get("number") or "").replace(" ", "")
        card_key = number or str(method.get("storedPaymentMethodId") or "")
        if not card_key:
            return _validation("000", "paymentDetails not supplied")
        if number and (not number.isdigit() or not 12 <= len(number) <= 19 or not luhn_valid(number)):
            return _validation("101", "Invalid card number")
        additional = doc.get("additionalData") if isinstance(doc.get("additionalData"), dict) else {}
        entry = self.ledger.add(LedgerEntry(
            id=self.ledger.new_id(), payment_ref=reference, amount=value, currency=currency,
            approved=False, status="received", idempotency_key=ctx.idempotency_key,
            extra={"resultCode": "Received", "merchantAccount": doc.get("merchantAccount"),
                   "manualCapture": str(additional.get("manualCapture", "")).lower() == "true"},
        ))
        await ctx.simulate_processing()
        error_trigger = str(additional.get(TEST_ERROR_TRIGGER, "")).upper()
        if error_trigger == "NO_CONNECTION_AVAILABLE":
            # Nothing reached an issuer: the payment object is dropped from status answers.
            entry.status, entry.extra["resultCode"], entry.extra["transient"] = "error", "Error", True
            if ctx.idempotency_key is not None:
                self.idempotency.mark_transient(ctx.idempotency_key)
            return _error(500, "701", "No connection available to the issuer", "internal", psp=entry.id,
                          headers={TRANSIENT_ERROR_HEADER: "true"})
        decision = self._decide(ctx.forced_decline, additional, method, card_key)
        threeds = THREEDS_CARDS.get(card_key)
        if decision is APPROVAL and threeds is not None and threeds.flow is Flow.CHALLENGE:
            return self._challenge_shopper(ctx, entry, doc, threeds)
        self._settle(entry, decision)
        self._notify_authorisation(entry)
        if error_trigger == "IOEXCEPTION_RECEIVED":
            return _error(500, "701", "server could not process request", "internal", psp=entry.id)
        return json_response(200, self._payment_doc(entry))

    def _challenge_shopper(self, ctx: EmulatorRequest, entry: LedgerEntry, doc: dict,
                           card: ThreeDSCard) -> web.Response:
        """RedirectShopper (or ChallengeShopper for native 3DS2): the shopper authenticates first."""
        challenge = self.challenges.open(entry.id, str(doc["returnUrl"]), card)
        url = self.challenges.url(ctx.request, challenge)
        request_data = (doc.get("authenticationData") or {}).get("threeDSRequestData") or {}
        native = isinstance(request_data, dict) and request_data.get("nativeThreeDS") == "preferred"
        entry.status, entry.extra["native"] = PENDING_AUTHENTICATION, native
        payment_data = _b64json({"psp": entry.id})
        if native:
            entry.extra["resultCode"] = "ChallengeShopper"
            token = _b64json({"acsURL": url, "acsTransID": challenge.token, "messageVersion": "2.2.0",
                              "threeDSServerTransID": entry.id})
            entry.extra["action"] = {"paymentData": payment_data, "paymentMethodType": "scheme",
                                     "authorisationToken": challenge.token, "subtype": "challenge", "token": token,
                                     "type": "threeDS2"}
        else:
            entry.extra["resultCode"] = "RedirectShopper"
            entry.extra["action"] = {"paymentMethodType": "scheme", "url": url, "method": "GET", "type": "redirect"}
        return json_response(200, self._payment_doc(entry))

    def finish_challenge(self, challenge: Challenge, authenticated: bool) -> None:
        entry = self.ledger.get(challenge.payment_id)
        if entry is None or entry.status != PENDING_AUTHENTICATION:
            return
        self._settle(entry, APPROVAL if authenticated else NOT_AUTHENTICATED)
        self._notify_authorisation(entry)

    def challenge_return(self, challenge: Challenge) -> str | None:
        entry = self.ledger.get(challenge.payment_id)
        if challenge.return_url is None or entry is None:
            return None
        if entry.extra.get("native"):
            status = "Y" if challenge.state is ChallengeState.AUTHENTICATED else "N"
            return with_query(challenge.return_url, {"threeDSResult": _b64json(
                {"transStatus": status, "authorisationToken": challenge.token})})
        return with_query(challenge.return_url, {"redirectResult": _b64json({"token": challenge.token})})

    async def _details(self, ctx: EmulatorRequest) -> web.Response:
        """`/payments/details`: what the shopper's return brought back, answered with the result."""
        await ctx.simulate_processing()
        try:
            doc = orjson.loads(ctx.body)
        except orjson.JSONDecodeError:
            return _validation("702", "Unexpected input", 400)
        details = doc.get("details") if isinstance(doc, dict) else None
        if not isinstance(details, dict) or not (details.get("redirectResult") or details.get("threeDSResult")):
            return _validation("000", "Required object 'details' is not provided.")
        payload = _from_b64json(str(details.get("redirectResult") or details.get("threeDSResult")))
        challenge = self.challenges.get(str(payload.get("token") or payload.get("authorisationToken") or ""))
        entry = self.ledger.get(challenge.payment_id) if challenge is not None else None
        if challenge is None or entry is None or challenge.state is ChallengeState.PENDING:
            return _validation("000", "Invalid payload provided")
        if challenge.state is ChallengeState.CANCELLED:
            return json_response(200, {**self._payment_doc(entry), "resultCode": "Cancelled"})
        return json_response(200, self._payment_doc(entry))

    @staticmethod
    def _decide(forced: str | None, additional: dict, method: dict, card_key: str) -> Decision:
        """First match wins: an injected decline (unrecognised codes become a generic refusal),
        Adyen's two request triggers, this emulator's cards, the expiry date; else approve."""
        if forced:
            return resolve_trigger(forced) or GENERIC_REFUSAL
        acquirer_code = str(additional.get(TEST_ACQUIRER_TRIGGER) or "")
        return (holder_name_trigger(_ACQUIRER_RESPONSE_CODES.get(acquirer_code))
                or holder_name_trigger(str(method.get("holderName") or ""))
                or holder_name_trigger(TEST_CARDS.get(card_key))
                or _expiry_decision(method)
                or APPROVAL)

    @staticmethod
    def _settle(entry: LedgerEntry, decision: Decision) -> None:
        result = decision.result
        entry.extra["resultCode"] = result.result_code
        entry.extra["refusalReasonRaw"] = decision.raw
        if result.result_code == "Authorised":
            entry.approved = True
            entry.extra["authCode"] = f"{int(entry.id[-6:]):06d}"
            if entry.extra["manualCapture"]:
                entry.status = "authorised"
            else:
                entry.status, entry.captured = "captured", entry.amount
        elif result.result_code == "Received":
            entry.status = "received"  # stays in flight: neither charged nor declined
        else:
            entry.status = "refused" if result.result_code == "Refused" else "error"
            entry.decline_code = result.reason_code

    def _notify_authorisation(self, entry: LedgerEntry) -> None:
        """AUTHORISATION once the payment has an outcome; a `Received` one has none yet."""
        result_code = entry.extra["resultCode"]
        if result_code == "Received":
            return
        if entry.approved:
            self._notify("authorize", notification_item("AUTHORISATION", True, entry.id, entry, entry.amount,
                                                         additional={"authCode": entry.extra["authCode"]}))
        else:
            reason = REFUSAL_REASONS.get(entry.decline_code or "", ("Refused",))[0]
            self._notify("authorize", notification_item("AUTHORISATION", False, entry.id, entry, entry.amount,
                                                        reason=reason))

    async def _payment_methods(self, ctx: EmulatorRequest) -> web.Response:
        """`/paymentMethods`: the methods available to the merchant account; changes nothing."""
        doc = self._request_doc(ctx)
        if isinstance(doc, web.Response):
            return doc
        await ctx.simulate_processing()
        return json_response(200, {"paymentMethods": [{"name": "Cards", "type": "scheme",
                                                       "brands": list(CARD_BRANDS)}]})

    async def _find_by_reference(self, ctx: EmulatorRequest) -> web.Response:
        """The lookup Adyen does not have (see the module docstring): payments by our reference."""
        await ctx.simulate_processing()
        query = ctx.request.query
        reference = query.get("reference")
        if not reference:
            return _validation("130", "Required field 'reference' is not provided.")
        hits = [self._status_doc(e) for e in self.ledger.find_by_ref(reference) if self._visible(e)]
        return json_response(200, {"merchantAccount": query.get("merchantAccount"), "reference": reference,
                                   "payments": hits})

    async def _find_by_psp(self, ctx: EmulatorRequest) -> web.Response:
        """The lookup Adyen does not have (see the module docstring): one payment by pspReference."""
        await ctx.simulate_processing()
        entry = self.ledger.get(ctx.request.match_info["psp"])
        if entry is None or not self._visible(entry):
            return _error(404, "000", "Not Found", "validation")
        return json_response(200, self._status_doc(entry))

    def _visible(self, entry: LedgerEntry) -> bool:
        return not entry.extra.get("transient") and (
            self._merchant_account is None or entry.extra.get("merchantAccount") == self._merchant_account)

    def _request_doc(self, ctx: EmulatorRequest) -> dict | web.Response:
        """The request's JSON object for this merchant account, or Adyen's refusal of it."""
        try:
            doc = orjson.loads(ctx.body)
        except orjson.JSONDecodeError:
            return _validation("702", "Unexpected input", 400)
        if not isinstance(doc, dict):
            return _validation("702", "Unexpected input", 400)
        if (denied := self._merchant_problem(doc)) is not None:
            return denied
        return doc

    def _modification(self, ctx: EmulatorRequest) -> tuple[LedgerEntry, dict] | web.Response:
        doc = self._request_doc(ctx)
        if isinstance(doc, web.Response):
            return doc
        psp = ctx.request.match_info["psp"]
        entry = self.ledger.get(psp)
        if entry is None:
            return _validation("167", f"Original pspReference {psp} not found")
        return entry, doc

    def _amount(self, entry: LedgerEntry, doc: dict) -> int | web.Response:
        amount = doc.get("amount")
        if not isinstance(amount, dict) or not isinstance(amount.get("value"), int):
            return _validation("100", "Required object 'amount' is not provided.")
        if str(amount.get("currency", "")) != entry.currency:
            return _validation("000", "Currency does not match the original payment")
        if amount["value"] < 1:
            return _validation("137", "Invalid amount specified")
        return int(amount["value"])

    def _received(self, entry: LedgerEntry, doc: dict, kind: str, amount: int | None,
                  failure: FaultRule | None) -> web.Response:
        """Adyen's 201 `received`, and the notification of the modification's outcome: the ledger
        has already been changed if (and only if) it succeeded."""
        answer: dict[str, Any] = {"merchantAccount": doc["merchantAccount"], "paymentPspReference": entry.id,
                                  "pspReference": f"EMUM{next(self._modification_seq):012d}",
                                  "status": "received"}
        if doc.get("reference"):
            answer["reference"] = doc["reference"]
        if doc.get("paymentReference"):
            answer["paymentReference"] = doc["paymentReference"]
        if amount is not None:
            answer["amount"] = {"value": amount, "currency": entry.currency}
        self.modifications.append({"kind": kind, **answer})
        value = amount if amount is not None else entry.amount
        # The final outcome, as the emulator-only lookup lists it.
        event = {"eventCode": MODIFICATION_EVENT_CODES[kind], "pspReference": answer["pspReference"],
                 "originalReference": entry.id, "reference": doc.get("reference"),
                 "amount": {"value": value, "currency": entry.currency},
                 "success": "true" if failure is None else "false"}
        entry.extra.setdefault("modifications", []).append(event)
        later = failure is not None and failure.reported_as == "failed_later" and kind in LATER_FAILURE_EVENT_CODES
        reason = "" if failure is None else (failure.decline_code or "Modification refused")
        operation = MODIFICATION_OPERATIONS[kind]

        def item(event_code: str, success: bool, why: str = "") -> dict[str, Any]:
            return notification_item(event_code, success, answer["pspReference"], entry, value, original=entry.id,
                                     merchant_reference=doc.get("reference"), reason=why)

        self._notify(operation, item(MODIFICATION_EVENT_CODES[kind], failure is None or later, "" if later else reason))
        if later:
            self._notify(operation, item(LATER_FAILURE_EVENT_CODES[kind], True, reason))
        return json_response(201, answer)

    async def _priced_modification(self, ctx: EmulatorRequest) -> tuple[LedgerEntry, dict, int] | web.Response:
        """A capture's or refund's payment, body and amount, or Adyen's answer to what is wrong."""
        await ctx.simulate_processing()
        found = self._modification(ctx)
        if isinstance(found, web.Response):
            return found
        entry, doc = found
        amount = self._amount(entry, doc)
        return amount if isinstance(amount, web.Response) else (entry, doc, amount)

    async def _capture(self, ctx: EmulatorRequest) -> web.Response:
        found = await self._priced_modification(ctx)
        if isinstance(found, web.Response):
            return found
        entry, doc, amount = found
        if not entry.approved or entry.voided or entry.status not in ("authorised", "captured"):
            return _validation("000", f"Payment cannot be captured: it is {entry.status}")
        if entry.captured + amount > entry.amount:
            return _validation("137", "Capture amount exceeds the authorised amount")
        failure = ctx.modification_failure
        if failure is None:
            entry.captured += amount
            entry.status = "captured"
        return self._received(entry, doc, "capture", amount, failure)

    async def _refund(self, ctx: EmulatorRequest) -> web.Response:
        found = await self._priced_modification(ctx)
        if isinstance(found, web.Response):
            return found
        entry, doc, amount = found
        if entry.captured - entry.refunded < amount:
            return _validation("000", "Refund amount exceeds the captured amount" if entry.captured
                               else f"Payment cannot be refunded: it is {entry.status}")
        failure = ctx.modification_failure
        if failure is None:
            entry.refunded += amount
            entry.status = "refunded" if entry.refunded == entry.captured else "partially_refunded"
        return self._received(entry, doc, "refund", amount, failure)

    async def _cancel(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        found = self._modification(ctx)
        if isinstance(found, web.Response):
            return found
        entry, doc = found
        return self._cancel_entry(ctx, entry, doc, "cancel")

    async def _technical_cancel(self, ctx: EmulatorRequest) -> web.Response:
        """`POST /cancels` with `paymentReference`: Adyen's technical cancel, by the merchant's own
        reference, for a payment whose pspReference the merchant never got (a timeout, a 5xx
        after processing). It cancels as `/payments/{psp}/cancels` does; the answer names the
        payment by `paymentReference`, and the webhook is TECHNICAL_CANCEL."""
        await ctx.simulate_processing()
        doc = self._request_doc(ctx)
        if isinstance(doc, web.Response):
            return doc
        reference = doc.get("paymentReference")
        if not isinstance(reference, str) or not reference:
            return _validation("100", "Required field 'paymentReference' is not provided.")
        entries = [e for e in self.ledger.find_by_ref(reference) if self._visible(e)]
        if not entries:
            return _validation("167", f"No payment found with reference {reference}")
        return self._cancel_entry(ctx, entries[-1], doc, "technical_cancel")

    def _cancel_entry(self, ctx: EmulatorRequest, entry: LedgerEntry, doc: dict, kind: str) -> web.Response:
        if entry.status not in ("authorised", PENDING_AUTHENTICATION) or entry.captured:
            return _validation("000", f"Payment cannot be cancelled: it is {entry.status}")
        failure = ctx.modification_failure
        if failure is None:
            if entry.status == PENDING_AUTHENTICATION:  # an abandoned challenge: its page is gone
                self.challenges.cancel(entry.id)
                entry.extra["resultCode"] = "Cancelled"
            entry.status, entry.voided = "cancelled", True
        return self._received(entry, doc, kind, None, failure)


def _b64json(doc: dict[str, Any]) -> str:
    """An opaque Adyen-style blob (redirectResult, threeDSResult, token): base64 of JSON."""
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode()


def _from_b64json(blob: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(blob.encode() + b"=" * (-len(blob) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}
