"""A Checkout.com-shaped emulator: Unified Payments `/payments`, its actions and the reference list.

Idempotency as Checkout.com documents it ("Idempotency" page): only a request that was processed
successfully (2xx) is stored for its `Cko-Idempotency-Key` and replayed; after a 4xx or 5xx the
same key is processed as a new attempt, so a retry after a 500 that followed processing charges a
second time. Concurrent requests with one key get `429 Too many requests` while the first is
still processing. What Checkout answers to a key reused with another body is not documented; this
emulator answers 422 `request_invalid` / `idempotency_key_reused` (its own code).

Test cards: the Unified Payments sandbox drives response codes by card number (Checkout.com
"Test cards" page). The older Previous (ABC) platform drove them by the amount's last digits; that
table is here too, off by default (`amount_triggers=True` turns it on).

Webhooks: events `{"id": "evt_…", "type": …, "version": …, "created_on": …, "data": {"id": "pay_…",
"action_id": …, "amount", "currency", "reference", "response_code", …}, "_links": …}` of types
payment_approved, payment_declined, payment_captured, payment_capture_declined, payment_refunded,
payment_refund_declined, payment_voided, payment_void_declined, signed with `Cko-Signature`: the
hex HMAC-SHA256 of the raw body under the webhook's signature key ("Set up your webhook
receiver"). Captures, refunds and voids answer 202 Accepted and their outcome comes by
notification: `fail_by_notification` makes it `payment_<op>_declined`, its action `approved:
false`, and the ledger unchanged. Retries after 5 m, 10 m, 15 m, 30 m, 1 h, 4 h, 12 h and 12 h
("Receive webhooks").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from emulators.faults import FaultRule
from emulators.idempotency import Claim, StoredAnswer
from emulators.ledger import LedgerEntry
from emulators.server import ApiRoute, EmulatorRequest, ProviderEmulator, json_response
from emulators.webhooks import RetrySchedule, SignedRequest

# Card number -> response_code (None approves), from Checkout.com's sandbox test-card docs. Any
# other Luhn-valid number approves, as in the sandbox.
TEST_CARDS: dict[str, str | None] = {
    # approve (10000)
    "4242424242424242": None,  # Visa
    "4543474002249996": None,  # Visa
    "4000020000000000": None,  # Visa, US
    "4659105569051157": None,  # Visa debit, GB
    "5436031030606378": None,  # Mastercard
    "2223000010479399": None,  # Mastercard
    "378282246310005": None,  # American Express
    "6011111111111117": None,  # Discover
    "3530111333300000": None,  # JCB
    # soft declines (20xxx)
    "4111111111111129": "20001",  # Refer to card issuer
    "4024007181869214": "20005",  # Declined - Do not honour
    "4024007103573027": "20012",  # Invalid transaction
    "4485381577182090": "20014",  # Invalid card number
    "4544249167673670": "20051",  # Insufficient funds
    "4724117215951699": "20054",  # Expired card
    "4151512736305999": "20057",  # Transaction not permitted to cardholder (non-AFT)
    "4897453568485113": "20059",  # Suspected fraud
    "4556294593757189": "20061",  # Activity amount limit exceeded
    "4818924250131070": "20062",  # Restricted card
    "4556253752712245": "20063",  # Security violation
    "4095254802642505": "20068",  # Response received too late / timeout (issuer did not answer)
    "4532819413487978": "20078",  # Blocked, first use
    "4500622868341387": "20154",  # 3DS authentication required
    "4734868958733862": "200N7",  # Decline for CVV2 failure
    "4567361325981788": "200R3",  # Issuer stop payment (revocation order), all authorizations
    # hard declines (30xxx)
    "4024007162185267": "30015",  # No such issuer
    "4941202060999329": "30041",  # Lost card - pick up
    "4539253655711767": "30043",  # Stolen card - pick up
}
# The cards drills and the contract suite use for each behaviour, by a provider-neutral name. All
# are Checkout.com's own sandbox cards; "issuer_unavailable" is its issuer-timeout card (20068).
SCENARIO_CARDS: dict[str, str] = {
    "approve": "4242424242424242",
    "insufficient_funds": "4544249167673670",
    "stolen_card": "4539253655711767",
    "do_not_honor": "4024007181869214",
    "issuer_unavailable": "4095254802642505",
}
# Previous (ABC) platform response-code testing by amount (minor units; "divide by 100" currencies).
AMOUNT_EXACT_CODES: dict[int, str] = {9998: "20068", 4001: "40101", 4008: "40108", 2011: "200R1", 2013: "200R3"}
AMOUNT_SUFFIX_CODES: dict[int, str] = {5: "20005", 12: "20012", 14: "20014", 51: "20051", 54: "20087", 62: "20062",
                                       63: "20063", 33: "30033"}  # amount % 100 -> code
RESPONSE_SUMMARIES: dict[str, str] = {
    "10000": "Approved",
    "20001": "Refer to card issuer",
    "20005": "Declined - Do not honour",
    "20012": "Invalid transaction",
    "20014": "Invalid card number",
    "20051": "Insufficient Funds",
    "20054": "Expired Card",
    "20057": "Transaction not permitted to cardholder",
    "20059": "Suspected Fraud",
    "20061": "Activity amount limit exceeded",
    "20062": "Restricted Card",
    "20063": "Security Violation",
    "20068": "Response received too late / timeout",
    "20078": "Blocked, first use",
    "20087": "Bad Track Data",
    "20091": "Issuer unavailable",
    "20154": "3DS authentication required",
    "200N7": "Decline for CVV2 failure",
    "200R1": "Issuer initiated a stop payment (revocation order) for this authorization",
    "200R3": "Issuer initiated a stop payment (revocation order) for all authorizations",
    "30015": "No such issuer",
    "30033": "Expired card - Pick up",
    "30041": "Lost card - Pick up",
    "30043": "Stolen card - Pick up",
    "40101": "Payment blocked due to risk",
    "40108": "Gateway reject - Post code failed",
}
WEBHOOK_RETRIES = RetrySchedule((300.0, 600.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 43200.0))
SIGNATURE_HEADER = "Cko-Signature"
WEBHOOK_VERSION = "1.0.33"
# Action type -> (operation, event type when approved, event type when declined).
ACTION_EVENTS: dict[str, tuple[str, str, str]] = {
    "Authorization": ("authorize", "payment_approved", "payment_declined"),
    "Capture": ("capture", "payment_captured", "payment_capture_declined"),
    "Refund": ("refund", "payment_refunded", "payment_refund_declined"),
    "Void": ("void", "payment_voided", "payment_void_declined"),
}
# What a forger turns each event into: a decline into an approval and back.
_FORGED_TYPES = {declined: approved for approved, declined in (e[1:] for e in ACTION_EVENTS.values())}
_FORGED_TYPES |= {approved: declined for declined, approved in _FORGED_TYPES.items()}
MODIFICATION_DECLINE = "20005"  # a modification's decline when the fault names no code
CAPTURABLE = ("Authorized",)
REFUNDABLE = ("Captured", "Partially Captured", "Partially Refunded")


def _luhn(number: str) -> bool:
    if not number.isdigit() or not 12 <= len(number) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _scheme(number: str) -> str:
    if number.startswith("4"):
        return "Visa"
    if number[:2] in ("34", "37"):
        return "Amex"
    if number[:1] == "5" or number[:2] == "22":
        return "Mastercard"
    if number.startswith("6011"):
        return "Discover"
    if number.startswith("35"):
        return "JCB"
    return "Unknown"


def _timestamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Cko-Request-Id": str(uuid.uuid4()), **(extra or {})}


def _error(status: int, error_type: str | None = None, *codes: str, headers: dict[str, str] | None = None
           ) -> web.Response:
    """Checkout's error shape: `{request_id, error_type, error_codes}` for 422s, no body otherwise."""
    all_headers = _headers(headers)
    if error_type is None:
        return web.Response(status=status, headers=all_headers)
    doc = {"request_id": all_headers["Cko-Request-Id"], "error_type": error_type, "error_codes": list(codes)}
    return json_response(status, doc, all_headers)


def sign_checkout_webhook(body: bytes, secret: str) -> str:
    """`Cko-Signature`: hex HMAC-SHA256 of the raw body under the signature key."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _event_id() -> str:
    return "evt_" + base64.b32encode(os.urandom(16)).decode().lower().rstrip("=")


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if doc is None:
        return {}
    return doc if isinstance(doc, dict) else None


class CheckoutEmulator(ProviderEmulator):
    name = "checkout"
    idempotency_header = "Cko-Idempotency-Key"
    store_policy = "success"
    ledger_prefix = "pay_emu"
    webhook_retries = WEBHOOK_RETRIES

    def __init__(self, api_key: str | None = None, *, amount_triggers: bool = False) -> None:
        super().__init__()
        self._api_key = api_key
        self._amount_triggers = amount_triggers
        self._action_seq = itertools.count(1)
        self._source_seq = itertools.count(1)
        # src_ id -> card facts (never the PAN), so a stored source behaves like its card again.
        self._sources: dict[str, dict[str, Any]] = {}

    def routes(self) -> list[ApiRoute]:
        return [
            ApiRoute("POST", "/payments", self._create, "authorize"),
            ApiRoute("GET", "/payments", self._list, "status", idempotent=False),
            ApiRoute("GET", "/payments/{id}", self._details, "status", idempotent=False),
            ApiRoute("GET", "/payments/{id}/actions", self._actions, "status", idempotent=False),
            ApiRoute("POST", "/payments/{id}/captures", self._capture, "capture"),
            ApiRoute("POST", "/payments/{id}/refunds", self._refund, "refund"),
            ApiRoute("POST", "/payments/{id}/voids", self._void, "void"),
        ]

    def authenticate(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not key.startswith("sk_") or (self._api_key is not None and key != self._api_key):
            return _error(401)
        return None

    def error_response(self, fault: FaultRule) -> web.Response:
        """Checkout.com documents no "not processed" signal: `fault.transient` changes nothing."""
        if fault.status == 422:
            return _error(422, "request_invalid", "request_invalid")
        return _error(fault.status)

    def rate_limited_response(self, retry_after_s: float) -> web.Response:
        return _error(429, headers={"Retry-After": f"{retry_after_s:g}"})

    def idempotency_conflict(self, claim: Claim) -> web.Response:
        if claim is Claim.IN_FLIGHT:
            return _error(429)  # "only one request will be processed and the others return a 429"
        return _error(422, "request_invalid", "idempotency_key_reused")

    def replay_headers(self, stored: StoredAnswer) -> dict[str, str]:
        return _headers()

    def sign_webhook(self, doc: dict[str, Any], secret: str, now: float) -> SignedRequest:
        body = orjson.dumps(doc)
        return SignedRequest(body, {SIGNATURE_HEADER: sign_checkout_webhook(body, secret),
                                    "Content-Type": "application/json"})

    def forge_webhook(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "type": _FORGED_TYPES.get(doc["type"], doc["type"])}

    def _notify(self, request: web.Request, entry: LedgerEntry, action: dict[str, Any]) -> None:
        """The event reporting one processed action."""
        operation, approved_type, declined_type = ACTION_EVENTS[action["type"]]
        event_type = approved_type if action["approved"] else declined_type
        data: dict[str, Any] = {
            "id": entry.id, "action_id": action["id"], "amount": action["amount"], "currency": entry.currency,
            "reference": action.get("reference") or entry.payment_ref, "response_code": action["response_code"],
            "response_summary": action["response_summary"], "processed_on": action["processed_on"],
            "metadata": entry.extra.get("metadata", {}),
        }
        if action["type"] == "Authorization":
            data["source"] = {k: v for k, v in entry.extra["source"].items() if k != "bin"}
            if entry.approved:
                data["auth_code"] = entry.extra.get("auth_code")
        event_id = _event_id()
        base = f"{request.scheme}://{request.host}"
        doc = {"id": event_id, "type": event_type, "version": WEBHOOK_VERSION, "created_on": _timestamp(time.time()),
               "data": data, "_links": {"self": {"href": f"{base}/workflows/events/{event_id}"},
                                        "payment": {"href": f"{base}/payments/{entry.id}"}}}
        self.notify(operation, event_id, event_type, doc)

    def reset(self) -> None:
        super().reset()
        self._sources.clear()

    # --- documents -------------------------------------------------------------------------

    def _links(self, request: web.Request, entry: LedgerEntry) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}/payments/{entry.id}"
        links: dict[str, Any] = {"self": {"href": base}, "actions": {"href": f"{base}/actions"}}
        if entry.status in CAPTURABLE:
            links["capture"] = {"href": f"{base}/captures"}
            links["void"] = {"href": f"{base}/voids"}
        if entry.status in REFUNDABLE:
            links["refund"] = {"href": f"{base}/refunds"}
        return links

    def _payment(self, request: web.Request, entry: LedgerEntry) -> dict[str, Any]:
        """Payment details as `GET /payments/{id}` shows them (no response_code there)."""
        captured_open = entry.captured - entry.refunded
        authorised = entry.amount if entry.approved else 0
        doc: dict[str, Any] = {
            "id": entry.id,
            "requested_on": _timestamp(entry.created_at),
            "source": entry.extra["source"],
            "amount": entry.amount,
            "currency": entry.currency,
            "payment_type": "Regular",
            "reference": entry.payment_ref,
            "status": entry.status,
            "approved": entry.approved,
            "balances": {
                "total_authorized": authorised,
                "total_voided": authorised if entry.voided else 0,
                "available_to_void": authorised if entry.status in CAPTURABLE else 0,
                "total_captured": entry.captured,
                "available_to_capture": authorised if entry.status in CAPTURABLE else 0,
                "total_refunded": entry.refunded,
                "available_to_refund": captured_open if entry.status in REFUNDABLE else 0,
            },
            "risk": {"flagged": False},
            "metadata": entry.extra.get("metadata", {}),
            "_links": self._links(request, entry),
        }
        if entry.extra.get("description"):
            doc["description"] = entry.extra["description"]
        return doc

    def _add_action(self, entry: LedgerEntry, kind: str, amount: int, code: str | None,
                    reference: str | None) -> dict[str, Any]:
        action = {
            "id": f"act_emu{next(self._action_seq):012d}",
            "type": kind,
            "processed_on": _timestamp(time.time()),
            "amount": amount,
            "approved": code is None or code.startswith("1"),
            "response_code": code or "10000",
            "response_summary": RESPONSE_SUMMARIES.get(code or "10000", "Declined"),
        }
        if reference:
            action["reference"] = reference
        entry.extra.setdefault("actions", []).append(action)
        return action

    # --- POST /payments ----------------------------------------------------------------------

    def _source(self, source: Any) -> tuple[dict[str, Any], str | None] | web.Response:
        """The answer's `source` object and the test-card response code, or a 422."""
        if not isinstance(source, dict):
            return _error(422, "request_invalid", "source_required")
        kind = source.get("type")
        if kind == "card":
            number = str(source.get("number") or "")
            if not _luhn(number):
                return _error(422, "request_invalid", "card_number_invalid")
            month, year = source.get("expiry_month"), source.get("expiry_year")
            if not isinstance(month, int) or not 1 <= month <= 12:
                return _error(422, "request_invalid", "card_expiry_month_invalid")
            if not isinstance(year, int) or year < 1000:
                return _error(422, "request_invalid", "card_expiry_year_invalid")
            now = time.gmtime()
            if (year, month) < (now.tm_year, now.tm_mon):
                return _error(422, "processing_error", "card_expired")
            src_id = f"src_emu{next(self._source_seq):012d}"
            facts = {"type": "card", "id": src_id, "expiry_month": month, "expiry_year": year,
                     "scheme": _scheme(number), "last4": number[-4:], "bin": number[:6], "card_type": "CREDIT"}
            if source.get("name"):
                facts["name"] = str(source["name"])
            code = TEST_CARDS.get(number)
            self._sources[src_id] = {"facts": facts, "code": code}
            return facts, code
        if kind == "id":
            src_id = str(source.get("id") or "")
            if not src_id.startswith("src_"):
                return _error(422, "request_invalid", "source_id_invalid")
            known = self._sources.get(src_id)
            if known is not None:
                return known["facts"], known["code"]
            return {"type": "card", "id": src_id}, None
        if kind == "token":
            token = str(source.get("token") or "")
            if not token.startswith("tok_"):
                return _error(422, "request_invalid", "token_invalid")
            return {"type": "card", "id": f"src_emu{next(self._source_seq):012d}"}, None
        return _error(422, "request_invalid", "source_type_invalid")

    def _amount_code(self, amount: int) -> str | None:
        if not self._amount_triggers:
            return None
        return AMOUNT_EXACT_CODES.get(amount) or AMOUNT_SUFFIX_CODES.get(amount % 100)

    async def _create(self, ctx: EmulatorRequest) -> web.Response:
        doc = _json_object(ctx.body)
        if doc is None:
            return _error(422, "request_invalid", "request_body_malformed")
        amount = doc.get("amount")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
            return _error(422, "request_invalid", "amount_invalid")
        currency = doc.get("currency")
        if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
            return _error(422, "request_invalid", "currency_required" if currency is None else "currency_invalid")
        source = self._source(doc.get("source"))
        if isinstance(source, web.Response):
            return source
        facts, card_code = source
        capture = doc.get("capture", True) is not False
        reference = doc.get("reference") if isinstance(doc.get("reference"), str) else ""
        entry = self.ledger.add(LedgerEntry(
            id=self.ledger.new_id(), payment_ref=reference, amount=amount, currency=currency.upper(),
            approved=False, status="Pending", idempotency_key=ctx.idempotency_key,
            extra={"source": facts, "capture": capture, "metadata": doc.get("metadata") or {},
                   "description": doc.get("description")},
        ))
        await ctx.simulate_processing()
        code = ctx.forced_decline or card_code or self._amount_code(amount)
        if code and not code.startswith("1"):
            entry.status, entry.decline_code = "Declined", code
            action = self._add_action(entry, "Authorization", amount, code, reference)
        else:
            entry.approved = True
            if amount == 0:
                entry.status = "Card Verified"
            else:
                entry.status = "Authorized"
            action = self._add_action(entry, "Authorization", amount, None, reference)
        answer: dict[str, Any] = {
            "id": entry.id,
            "action_id": action["id"],
            "amount": amount,
            "currency": entry.currency,
            "approved": entry.approved,
            "status": entry.status,
            "response_code": action["response_code"],
            "response_summary": action["response_summary"],
            "source": facts,
            "processed_on": action["processed_on"],
            "reference": reference,
            "risk": {"flagged": False},
            "_links": self._links(ctx.request, entry),
        }
        if entry.approved:
            answer["auth_code"] = entry.extra["auth_code"] = f"{int(entry.id[7:]) % 1_000_000:06d}"
        self._notify(ctx.request, entry, action)
        if entry.approved and capture and amount > 0:
            # Checkout captures an auto-capture payment asynchronously right after the
            # authorisation (the answer still says Authorized); this emulator does it at once.
            entry.status, entry.captured = "Captured", amount
            self._notify(ctx.request, entry, self._add_action(entry, "Capture", amount, None, reference))
        return json_response(201, answer, _headers())

    # --- reads -------------------------------------------------------------------------------

    def _lookup(self, request: web.Request) -> LedgerEntry | web.Response:
        entry = self.ledger.get(request.match_info["id"])
        return entry if entry is not None else _error(404)

    async def _details(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        entry = self._lookup(ctx.request)
        if isinstance(entry, web.Response):
            return entry
        return json_response(200, self._payment(ctx.request, entry), _headers())

    async def _actions(self, ctx: EmulatorRequest) -> web.Response:
        await ctx.simulate_processing()
        entry = self._lookup(ctx.request)
        if isinstance(entry, web.Response):
            return entry
        return json_response(200, list(reversed(entry.extra.get("actions", []))), _headers())

    async def _list(self, ctx: EmulatorRequest) -> web.Response:
        """`GET /payments?reference=`: payments with that reference, newest first."""
        await ctx.simulate_processing()
        query = ctx.request.query
        reference = query.get("reference")
        if not reference:
            return _error(422, "request_invalid", "reference_required")
        try:
            limit = int(query.get("limit", "10"))
            skip = int(query.get("skip", "0"))
        except ValueError:
            return _error(422, "request_invalid", "paging_invalid")
        if not 1 <= limit <= 100 or skip < 0:
            return _error(422, "request_invalid", "paging_invalid")
        matches = list(reversed(self.ledger.find_by_ref(reference)))
        page = [self._payment(ctx.request, e) for e in matches[skip:skip + limit]]
        return json_response(200, {"limit": limit, "skip": skip, "total_count": len(matches), "data": page},
                             _headers())

    # --- actions -----------------------------------------------------------------------------

    def _accepted(self, request: web.Request, entry: LedgerEntry, action: dict[str, Any]) -> web.Response:
        """202 Accepted; the action's outcome goes out as its notification."""
        self._notify(request, entry, action)
        href = f"{request.scheme}://{request.host}/payments/{entry.id}"
        doc: dict[str, Any] = {"action_id": action["id"], "_links": {"payment": {"href": href}}}
        if action.get("reference"):
            doc["reference"] = action["reference"]
        return json_response(202, doc, _headers())

    async def _action_request(self, ctx: EmulatorRequest) -> tuple[LedgerEntry, dict[str, Any]] | web.Response:
        await ctx.simulate_processing()
        entry = self._lookup(ctx.request)
        if isinstance(entry, web.Response):
            return entry
        doc = _json_object(ctx.body)
        if doc is None:
            return _error(422, "request_invalid", "request_body_malformed")
        amount = doc.get("amount")
        if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool) or amount < 1):
            return _error(422, "request_invalid", "amount_invalid")
        return entry, doc

    @staticmethod
    def _declined_code(ctx: EmulatorRequest) -> str | None:
        """The response code of a modification a `fail_by_notification` fault declines."""
        failure = ctx.modification_failure
        return None if failure is None else (failure.decline_code or MODIFICATION_DECLINE)

    async def _capture(self, ctx: EmulatorRequest) -> web.Response:
        parsed = await self._action_request(ctx)
        if isinstance(parsed, web.Response):
            return parsed
        entry, doc = parsed
        if entry.status not in CAPTURABLE:
            return _error(403)  # Capture not allowed
        amount = doc.get("amount", entry.amount)
        if amount > entry.amount:
            return _error(422, "request_invalid", "capture_amount_exceeds_balance")
        declined = self._declined_code(ctx)
        if declined is None:
            entry.captured = amount
            entry.status = "Captured" if amount == entry.amount else "Partially Captured"
        action = self._add_action(entry, "Capture", amount, declined, doc.get("reference"))
        return self._accepted(ctx.request, entry, action)

    async def _refund(self, ctx: EmulatorRequest) -> web.Response:
        parsed = await self._action_request(ctx)
        if isinstance(parsed, web.Response):
            return parsed
        entry, doc = parsed
        if entry.status not in REFUNDABLE:
            return _error(403)  # Refund not allowed
        open_amount = entry.captured - entry.refunded
        amount = doc.get("amount", open_amount)
        if amount > open_amount:
            return _error(422, "request_invalid", "refund_amount_exceeds_balance")
        declined = self._declined_code(ctx)
        if declined is None:
            entry.refunded += amount
            entry.status = "Refunded" if entry.refunded == entry.captured else "Partially Refunded"
        action = self._add_action(entry, "Refund", amount, declined, doc.get("reference"))
        return self._accepted(ctx.request, entry, action)

    async def _void(self, ctx: EmulatorRequest) -> web.Response:
        parsed = await self._action_request(ctx)
        if isinstance(parsed, web.Response):
            return parsed
        entry, doc = parsed
        if entry.status not in CAPTURABLE:
            return _error(403)  # Void not allowed
        declined = self._declined_code(ctx)
        if declined is None:
            entry.status, entry.voided = "Voided", True
        action = self._add_action(entry, "Void", entry.amount, declined, doc.get("reference"))
        return self._accepted(ctx.request, entry, action)
