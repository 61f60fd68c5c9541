"""A Stripe-shaped emulator: PaymentIntents, refunds and search, with Stripe's test cards.

Idempotency as Stripe documents it: the first answer for a key is stored (a 500 included) and
replayed with `Idempotent-Replayed: true`; the same key with other parameters is a 400
`idempotency_error`; a key still in flight is a 409 that Stripe marks retryable.

`Stripe-Should-Retry` where Stripe sends it: `true` where a retry can succeed because nothing was
stored for the key (a key still in flight, a rate limit, an error before any endpoint ran);
`false` on a 5xx the endpoint produced, first and replayed alike, since Stripe stores it and a
retry with the key can only replay it (stripe-python: "we expect the stripe-should-retry header
to be false in most cases when a 500 is returned, since our idempotency framework would typically
replay it anyway").

Status reads honour `expand[]` for `latest_charge` and `latest_charge.refunds` (`data.…` on
search), as Stripe does: a Charge lists its refunds only when they are expanded.

Webhooks: Event objects (`{"id": "evt_…", "object": "event", "type": …, "data": {"object": …}}`)
signed with `Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "{t}.{body}" under the
endpoint's signing secret>` ("Verify webhook signatures with official libraries"), re-signed at
every attempt. Events: `payment_intent.succeeded` (an automatic capture's payment, or a manual
one's capture), `payment_intent.amount_capturable_updated` (a manual-capture authorisation),
`payment_intent.payment_failed`, `payment_intent.canceled`, `refund.created`, `refund.failed`.
Stripe retries an undelivered event "for up to three days" with exponential backoff, intervals
unpublished: here 1 minute doubling to 12 hours. Captures and cancels are synchronous at Stripe,
so `fail_by_notification` applies to refunds only: the refund is answered `pending`, then
`refund.failed` (as a refund the card network refuses later is).

3-D Secure (Stripe's "Regulatory (3D Secure) cards" and "Authentication and setup" test cards,
`THREEDS_CARDS`): a confirmed intent whose card needs authentication answers 200 `status:
requires_action` with `next_action: {type: "redirect_to_url", redirect_to_url: {url, return_url}}`
when the request has a `return_url` (else `use_stripe_sdk`, as Stripe answers a server-side
confirm without one). The url is the emulator's challenge page (emulators/threeds.py): Complete
settles the intent as the card would have been (`succeeded` / `requires_capture`, or the card's
decline after authentication) and Fail leaves it `requires_payment_method` with
`payment_intent_authentication_failure`, each with its usual event; the browser goes back to the
return_url with `payment_intent`, `payment_intent_client_secret` and `redirect_status`. Retrieve
then shows the result; `/confirm` on an intent still waiting answers it unchanged; cancel works
on a `requires_action` intent (an abandoned challenge).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from emulators.faults import FaultRule
from emulators.idempotency import Claim, StoredAnswer
from emulators.ledger import LedgerEntry
from emulators.server import ApiRoute, EmulatorRequest, ProviderEmulator, json_response
from emulators.threeds import Challenge, Flow, ThreeDSCard, with_query
from emulators.webhooks import RetrySchedule, SignedRequest
from providers.stripe.mapping import API_VERSION, METADATA_KEY, RETRY_HEADER

RATE_LIMITED_REASON_HEADER = "Stripe-Rate-Limited-Reason"

# Card number or PaymentMethod id -> decline_code (None approves). From Stripe's testing docs;
# the last two are this emulator's own, since Stripe has no public card for those codes.
TEST_CARDS: dict[str, str | None] = {
    "4242424242424242": None,
    "5555555555554444": None,
    "4000000000000002": "generic_decline",
    "4000000000009995": "insufficient_funds",
    "4000000000009987": "lost_card",
    "4000000000009979": "stolen_card",
    "4000000000000069": "expired_card",
    "4000000000000127": "incorrect_cvc",
    "4000000000000119": "processing_error",
    "4000000000001018": "do_not_honor",
    "4000000000002016": "issuer_not_available",
    "pm_card_visa": None,
    "pm_card_mastercard": None,
    "pm_card_chargeDeclined": "generic_decline",
    "pm_card_chargeDeclinedInsufficientFunds": "insufficient_funds",
    "pm_card_chargeDeclinedLostCard": "lost_card",
    "pm_card_chargeDeclinedStolenCard": "stolen_card",
    "pm_card_chargeDeclinedExpiredCard": "expired_card",
    "pm_card_chargeDeclinedProcessingError": "processing_error",
}
# Card number or PaymentMethod id -> its 3-D Secure behaviour, from Stripe's testing docs.
_REQUIRED = ThreeDSCard(Flow.CHALLENGE)
THREEDS_CARDS: dict[str, ThreeDSCard] = {
    "4000002500003155": _REQUIRED,  # authentication required unless set up for off-session use
    "4000002760003184": _REQUIRED,  # authentication always required
    "4000008260003178": ThreeDSCard(Flow.CHALLENGE, decline_after="insufficient_funds"),
    "4000000000003220": _REQUIRED,  # 3DS2 authentication must be completed
    "4000000000003063": _REQUIRED,  # 3DS authentication must be completed
    "4000008400001629": ThreeDSCard(Flow.CHALLENGE, decline_after="generic_decline"),
    "4000008400001280": ThreeDSCard(Flow.CHALLENGE, decline_after="processing_error"),
    "4000000000003055": ThreeDSCard(Flow.CHALLENGE, only_when_requested=True),  # supported, not required
    "pm_card_authenticationRequiredOnSetup": _REQUIRED,
    "pm_card_authenticationRequired": _REQUIRED,
    "pm_card_authenticationRequiredChargeDeclinedInsufficientFunds":
        ThreeDSCard(Flow.CHALLENGE, decline_after="insufficient_funds"),
    "pm_card_threeDSecure2Required": _REQUIRED,
    "pm_card_threeDSecureRequired": _REQUIRED,
    "pm_card_threeDSecureRequiredChargeDeclined": ThreeDSCard(Flow.CHALLENGE, decline_after="generic_decline"),
    "pm_card_threeDSecureOptional": ThreeDSCard(Flow.CHALLENGE, only_when_requested=True),
}
# `payment_method_options[card][request_three_d_secure]` values that ask for a challenge.
_REQUESTED_3DS = ("any", "challenge")
AUTHENTICATION_FAILURE = {
    "type": "invalid_request_error", "code": "payment_intent_authentication_failure",
    "message": "The provided PaymentMethod has failed authentication. You can provide payment_method_data or a "
               "new PaymentMethod to attempt to fulfill this PaymentIntent again.",
}
# The 3-D Secure cards drills use, by behaviour (a challenge's outcome is the shopper's choice).
THREEDS_SCENARIO_CARDS: dict[str, str] = {
    "frictionless": "4000000000003055",
    "challenge": "4000000000003220",
    "challenge_then_declined": "4000008400001629",
}
# The cards drills and the contract suite use for each behaviour, by a provider-neutral name.
SCENARIO_CARDS: dict[str, str] = {
    "approve": "4242424242424242",
    "insufficient_funds": "4000000000009995",
    "stolen_card": "4000000000009979",
    "do_not_honor": "4000000000001018",
    "issuer_unavailable": "4000000000002016",
}
DECLINE_MESSAGES = {
    "insufficient_funds": "Your card has insufficient funds.",
    "lost_card": "Your card has been declined.",
    "stolen_card": "Your card has been declined.",
    "expired_card": "Your card has expired.",
    "incorrect_cvc": "Your card's security code is incorrect.",
    "processing_error": "An error occurred while processing your card. Try again in a little bit.",
}
_SEARCH = re.compile(r"metadata\['(?P<key>[^']+)'\]:'(?P<value>[^']*)'")
WEBHOOK_RETRIES = RetrySchedule.doubling(60.0, 12 * 3600.0, 3 * 86400.0)
SIGNATURE_HEADER = "Stripe-Signature"
# What a forger turns each event into: a failure into a success and back.
_FORGED_TYPES = {
    "payment_intent.payment_failed": "payment_intent.succeeded",
    "payment_intent.succeeded": "payment_intent.payment_failed",
    "payment_intent.amount_capturable_updated": "payment_intent.canceled",
    "payment_intent.canceled": "payment_intent.succeeded",
    "refund.failed": "refund.created",
    "refund.created": "refund.failed",
}


def stripe_event(event_type: str, obj: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
    """A v1 snapshot Event, as Stripe posts it to an endpoint."""
    return {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": API_VERSION,
            "created": int(time.time()), "data": {"object": obj}, "livemode": False, "pending_webhooks": 1,
            "request": {"id": f"req_{uuid.uuid4().hex[:14]}", "idempotency_key": idempotency_key},
            "type": event_type}


def sign_stripe_webhook(body: bytes, secret: str, now: float) -> str:
    """The `Stripe-Signature` header: `t=…,v1=…`, HMAC-SHA256 over "{t}.{body}"."""
    timestamp = int(now)
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _error(status: int, err_type: str, message: str, *, code: str | None = None,
           retry: bool | None = None, **extra: Any) -> web.Response:
    error: dict[str, Any] = {"type": err_type, "message": message}
    if code:
        error["code"] = code
    error.update(extra)
    headers = {"Request-Id": f"req_{time.monotonic_ns()}"}
    if retry is not None:
        headers[RETRY_HEADER] = "true" if retry else "false"
    return json_response(status, {"error": error}, headers)


class StripeEmulator(ProviderEmulator):
    name = "stripe"
    idempotency_header = "Idempotency-Key"
    store_policy = "all"
    ledger_prefix = "pi_emu"
    webhook_retries = WEBHOOK_RETRIES

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__()
        self._api_key = api_key
        self._refunds: dict[str, dict[str, Any]] = {}

    def reset(self) -> None:
        super().reset()
        self._refunds.clear()

    def routes(self) -> list[ApiRoute]:
        return [
            ApiRoute("POST", "/v1/payment_intents", self._create, "authorize"),
            ApiRoute("GET", "/v1/payment_intents/search", self._search, "status", idempotent=False),
            ApiRoute("GET", "/v1/payment_intents/{id}", self._retrieve, "status", idempotent=False),
            ApiRoute("POST", "/v1/payment_intents/{id}/capture", self._capture, "capture"),
            ApiRoute("POST", "/v1/payment_intents/{id}/cancel", self._cancel, "void"),
            ApiRoute("POST", "/v1/payment_intents/{id}/confirm", self._confirm, "complete"),
            ApiRoute("POST", "/v1/refunds", self._refund, "refund"),
        ]

    def authenticate(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not key.startswith("sk_") or (self._api_key is not None and key != self._api_key):
            return _error(401, "invalid_request_error", "Invalid API Key provided.")
        return None

    def error_response(self, fault: FaultRule) -> web.Response:
        status = fault.status
        if fault.after_processing:
            # The endpoint ran: its answer is stored for the key, so retrying can only replay it.
            return _error(status, "api_error", "An unknown error occurred.", retry=False if status >= 500 else None)
        # Turned away before any endpoint ran: nothing stored, a retry with the key can succeed.
        retry = True if status in (409, 429) or status >= 500 else None
        return _error(status, "api_error", "An unknown error occurred.", retry=retry)

    def rate_limited_response(self, retry_after_s: float) -> web.Response:
        response = _error(429, "invalid_request_error", "Too many requests hit the API too quickly.",
                          code="rate_limit", retry=True)
        response.headers["Retry-After"] = f"{retry_after_s:g}"
        return response

    def quota_exceeded_response(self, retry_after_s: float) -> web.Response:
        """Past the account's rate limit Stripe answers 429 with `Stripe-Rate-Limited-Reason`
        (`global-rate` for the per-account limit; docs.stripe.com/rate-limits) and no
        `Retry-After`: its docs ask for exponential backoff instead."""
        response = _error(429, "invalid_request_error", "Request rate limit exceeded. Learn more about rate limits "
                          "here https://stripe.com/docs/rate-limits.", code="rate_limit")
        response.headers[RATE_LIMITED_REASON_HEADER] = "global-rate"
        return response

    def idempotency_conflict(self, claim: Claim) -> web.Response:
        if claim is Claim.IN_FLIGHT:
            return _error(409, "idempotency_error", "There is currently another in-progress request using this "
                          "Idempotent Key.", code="idempotency_key_in_use", retry=True)
        return _error(400, "idempotency_error", "Keys for idempotent requests can only be used with the same "
                      "parameters they were first used with.")

    def sign_webhook(self, doc: dict[str, Any], secret: str, now: float) -> SignedRequest:
        body = orjson.dumps(doc)
        return SignedRequest(body, {SIGNATURE_HEADER: sign_stripe_webhook(body, secret, now),
                                    "Content-Type": "application/json; charset=utf-8",
                                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"})

    def forge_webhook(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "type": _FORGED_TYPES.get(doc["type"], doc["type"])}

    def _notify(self, operation: str, event_type: str, obj: dict[str, Any], ctx: EmulatorRequest) -> None:
        self._emit(operation, event_type, obj, ctx.idempotency_key)

    def _emit(self, operation: str, event_type: str, obj: dict[str, Any], idempotency_key: str | None) -> None:
        event = stripe_event(event_type, obj, idempotency_key)
        self.notify(operation, event["id"], event_type, event)

    def replay_headers(self, stored: StoredAnswer) -> dict[str, str]:
        headers = {"Idempotent-Replayed": "true"}
        if stored.status >= 500:
            headers[RETRY_HEADER] = "false"  # the stored 5xx is all this key will ever answer
        return headers

    def _charge(self, entry: LedgerEntry, with_refunds: bool) -> dict[str, Any]:
        """The intent's charge, as `expand[]=latest_charge` shows it."""
        doc: dict[str, Any] = {
            "id": entry.extra["charge"],
            "object": "charge",
            "amount": entry.amount,
            "amount_captured": entry.captured,
            "amount_refunded": entry.refunded,
            "captured": entry.captured > 0,
            "currency": entry.currency,
            "payment_intent": entry.id,
            "refunded": entry.captured > 0 and entry.refunded == entry.captured,
            "status": "succeeded",
        }
        if with_refunds:
            refunds = [self._refunds[r] for r in reversed(entry.extra.get("refunds", []))]  # newest first
            doc["refunds"] = {"object": "list", "data": refunds, "has_more": False,
                              "url": f"/v1/charges/{doc['id']}/refunds"}
        return doc

    def _intent(self, entry: LedgerEntry, expand: frozenset[str] = frozenset()) -> dict[str, Any]:
        manual = entry.extra.get("capture_method") == "manual"
        doc: dict[str, Any] = {
            "id": entry.id,
            "object": "payment_intent",
            "amount": entry.amount,
            "amount_capturable": entry.amount if entry.status == "requires_capture" else 0,
            "amount_received": entry.captured,
            "capture_method": "manual" if manual else "automatic",
            "client_secret": f"{entry.id}_secret_emulator",
            "confirmation_method": "automatic",
            "created": int(entry.created_at),
            "currency": entry.currency,
            "livemode": False,
            "latest_charge": entry.extra.get("charge"),
            "metadata": entry.extra.get("metadata", {}),
            "payment_method": entry.extra.get("payment_method"),
            "status": entry.status,
            "last_payment_error": None,
            "next_action": entry.extra.get("next_action") if entry.status == "requires_action" else None,
        }
        if doc["latest_charge"] is not None and expand & {"latest_charge", "latest_charge.refunds"}:
            doc["latest_charge"] = self._charge(entry, "latest_charge.refunds" in expand)
        if entry.extra.get("authentication_failed"):
            doc["last_payment_error"] = dict(AUTHENTICATION_FAILURE)
        elif entry.decline_code:
            doc["last_payment_error"] = {
                "type": "card_error",
                "code": "card_declined" if entry.decline_code != "expired_card" else "expired_card",
                "decline_code": entry.decline_code,
                "message": DECLINE_MESSAGES.get(entry.decline_code, "Your card was declined."),
            }
        return doc

    async def _create(self, ctx: EmulatorRequest) -> web.Response:
        form = dict(parse_qsl(ctx.body.decode(), keep_blank_values=True))
        try:
            amount = int(form["amount"])
            currency = form["currency"].lower()
        except (KeyError, ValueError):
            return _error(400, "invalid_request_error", "Missing required param: amount.", code="parameter_missing",
                          param="amount")
        if amount < 1:
            return _error(400, "invalid_request_error", "Amount must be at least 1.", code="amount_too_small",
                          param="amount")
        card_key = form.get("payment_method_data[card][number]") or form.get("payment_method")
        if card_key is None:
            return _error(400, "invalid_request_error", "A payment method is required.",
                          code="parameter_missing", param="payment_method")
        metadata = _metadata(form)
        entry = self.ledger.add(LedgerEntry(
            id=self.ledger.new_id(), payment_ref=metadata.get(METADATA_KEY, ""), amount=amount, currency=currency,
            approved=False, status="processing", idempotency_key=ctx.idempotency_key,
            extra={"metadata": metadata, "capture_method": form.get("capture_method", "automatic"),
                   "payment_method": f"pm_emu_{card_key[-4:]}"},
        ))
        await ctx.simulate_processing()
        # Any number not in the table approves, as in Stripe's test mode.
        decline = ctx.forced_decline or TEST_CARDS.get(card_key)
        threeds = THREEDS_CARDS.get(card_key)
        if not decline and threeds is not None and (
                not threeds.only_when_requested
                or form.get("payment_method_options[card][request_three_d_secure]") in _REQUESTED_3DS):
            return self._require_action(ctx, entry, threeds, form.get("return_url") or None)
        self._authorise(entry, decline, ctx.idempotency_key)
        intent = self._intent(entry)
        if decline:
            return _error(402, "card_error", intent["last_payment_error"]["message"],
                          code=intent["last_payment_error"]["code"], decline_code=decline, payment_intent=intent)
        return json_response(200, intent)

    def _authorise(self, entry: LedgerEntry, decline: str | None, idempotency_key: str | None) -> None:
        """Charge the card (or decline it) and notify: at confirmation, or once the shopper has
        authenticated."""
        if decline:
            entry.status, entry.decline_code = "requires_payment_method", decline
            self._emit("authorize", "payment_intent.payment_failed", self._intent(entry), idempotency_key)
            return
        entry.approved = True
        entry.extra["charge"] = f"ch_emu{entry.id[6:]}"
        if entry.extra["capture_method"] == "manual":
            entry.status = "requires_capture"
            self._emit("authorize", "payment_intent.amount_capturable_updated", self._intent(entry), idempotency_key)
        else:
            entry.status, entry.captured = "succeeded", entry.amount
            self._emit("authorize", "payment_intent.succeeded", self._intent(entry), idempotency_key)

    def _require_action(self, ctx: EmulatorRequest, entry: LedgerEntry, card: ThreeDSCard,
                        return_url: str | None) -> web.Response:
        """`requires_action`: the shopper authenticates on the challenge page first."""
        challenge = self.challenges.open(entry.id, return_url, card)
        url = self.challenges.url(ctx.request, challenge)
        entry.status = "requires_action"
        if return_url is not None:
            entry.extra["next_action"] = {"type": "redirect_to_url",
                                          "redirect_to_url": {"url": url, "return_url": return_url}}
        else:
            entry.extra["next_action"] = {"type": "use_stripe_sdk",
                                          "use_stripe_sdk": {"type": "three_d_secure_redirect", "stripe_js": url,
                                                             "source": f"src_emu{entry.id[6:]}"}}
        return json_response(200, self._intent(entry))

    def finish_challenge(self, challenge: Challenge, authenticated: bool) -> None:
        entry = self.ledger.get(challenge.payment_id)
        if entry is None or entry.status != "requires_action":
            return
        if authenticated:
            self._authorise(entry, challenge.card.decline_after, entry.idempotency_key)
            return
        entry.status = "requires_payment_method"
        entry.extra["authentication_failed"] = True
        self._emit("authorize", "payment_intent.payment_failed", self._intent(entry), entry.idempotency_key)

    def challenge_return(self, challenge: Challenge) -> str | None:
        entry = self.ledger.get(challenge.payment_id)
        if challenge.return_url is None or entry is None:
            return None
        succeeded = entry.status in ("succeeded", "requires_capture")
        return with_query(challenge.return_url, {
            "payment_intent": entry.id, "payment_intent_client_secret": f"{entry.id}_secret_emulator",
            "redirect_status": "succeeded" if succeeded else "failed"})

    async def _confirm(self, ctx: EmulatorRequest) -> web.Response:
        """Confirming an intent that still waits for its shopper answers it unchanged (the action
        stays the same); one already confirmed cannot be confirmed again."""
        await ctx.simulate_processing()
        entry = self._lookup(ctx.request)
        if isinstance(entry, web.Response):
            return entry
        if entry.status != "requires_action":
            return _error(400, "invalid_request_error", f"You cannot confirm this PaymentIntent because it has a "
                          f"status of {entry.status}.", code="payment_intent_unexpected_state")
        return json_response(200, self._intent(entry))

    def _lookup(self, request: web.Request) -> LedgerEntry | web.Response:
        entry = self.ledger.get(request.match_info["id"])
        if entry is None:
            return _error(404, "invalid_request_error", f"No such payment_intent: '{request.match_info['id']}'",
                          code="resource_missing", param="intent")
        return entry

    async def _retrieve(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        entry = self._lookup(ctx.request)
        if isinstance(entry, web.Response):
            return entry
        return json_response(200, self._intent(entry, _expansions(ctx.request)))

    async def _search(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        match = _SEARCH.search(ctx.request.query.get("query", ""))
        if match is None:
            return _error(400, "invalid_request_error", "Invalid search query.", code="parameter_invalid_string")
        expand = frozenset(e.removeprefix("data.") for e in _expansions(ctx.request) if e.startswith("data."))
        hits = [self._intent(e, expand) for e in self.ledger.find_by_ref(match["value"])
                if e.extra.get("metadata", {}).get(match["key"]) == match["value"]]
        return json_response(200, {"object": "search_result", "data": hits, "has_more": False,
                                   "next_page": None, "url": "/v1/payment_intents/search"})

    async def _capture(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        entry = self._lookup(ctx.request)
        if isinstance(entry, web.Response):
            return entry
        if entry.status != "requires_capture":
            return _error(400, "invalid_request_error", f"This PaymentIntent could not be captured because it has "
                          f"a status of {entry.status}.", code="payment_intent_unexpected_state")
        form = dict(parse_qsl(ctx.body.decode()))
        amount = int(form.get("amount_to_capture", entry.amount))
        if amount > entry.amount:
            return _error(400, "invalid_request_error", "amount_to_capture is greater than the amount capturable.",
                          code="amount_too_large", param="amount_to_capture")
        entry.status, entry.captured = "succeeded", amount
        entry.extra.setdefault("metadata", {}).update(_metadata(form))  # capture metadata joins the intent's
        self._notify("capture", "payment_intent.succeeded", self._intent(entry), ctx)
        return json_response(200, self._intent(entry))

    async def _cancel(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        entry = self._lookup(ctx.request)
        if isinstance(entry, web.Response):
            return entry
        if entry.status not in ("requires_capture", "requires_payment_method", "requires_action"):
            return _error(400, "invalid_request_error", f"You cannot cancel this PaymentIntent because it has a "
                          f"status of {entry.status}.", code="payment_intent_unexpected_state")
        self.challenges.cancel(entry.id)  # an abandoned challenge: its page is gone
        entry.status, entry.voided = "canceled", True
        self._notify("void", "payment_intent.canceled", self._intent(entry), ctx)
        return json_response(200, self._intent(entry))

    async def _refund(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        form = dict(parse_qsl(ctx.body.decode()))
        entry = self.ledger.get(form.get("payment_intent", ""))
        if entry is None:
            return _error(400, "invalid_request_error", "No such payment_intent.", code="resource_missing",
                          param="payment_intent")
        amount = int(form.get("amount", entry.captured - entry.refunded))
        if entry.status != "succeeded" or amount > entry.captured - entry.refunded or amount < 1:
            return _error(400, "invalid_request_error", "Refund amount is greater than unrefunded amount.",
                          code="amount_too_large" if entry.status == "succeeded" else "charge_not_captured")
        failure = ctx.modification_failure
        refund = {"id": f"re_emu{len(self._refunds) + 1:012d}", "object": "refund", "amount": amount,
                  "charge": entry.extra.get("charge"), "currency": entry.currency, "metadata": _metadata(form),
                  "payment_intent": entry.id, "status": "succeeded" if failure is None else "pending",
                  "created": int(time.time())}
        answer = dict(refund)
        self._notify("refund", "refund.created", answer, ctx)
        if failure is None:
            entry.refunded += amount
        else:
            # Refused by the card network after Stripe accepted it: the money never left.
            refund.update(status="failed", failure_reason=failure.decline_code or "declined")
            self._notify("refund", "refund.failed", dict(refund), ctx)
        self._refunds[refund["id"]] = refund
        entry.extra.setdefault("refunds", []).append(refund["id"])
        return json_response(200, answer)


def _metadata(form: dict[str, str]) -> dict[str, str]:
    """`metadata[key]=value` form fields as Stripe's metadata object."""
    return {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[") and k.endswith("]")}


def _expansions(request: web.Request) -> frozenset[str]:
    """The `expand[]` parameters of a read."""
    return frozenset(request.query.getall("expand[]", []))
