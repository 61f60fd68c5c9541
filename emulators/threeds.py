"""3-D Secure in the emulators: which test cards authenticate how, and the challenge page.

A real provider answers a card that needs strong customer authentication with "the shopper must
act first" (Stripe `requires_action`, Adyen `RedirectShopper`, Checkout.com `202 Pending`) and
sends the shopper's browser to its access control server. The emulators do the same with a page
of their own at the redirect URL: plain HTML with "Complete" and "Fail" buttons (the providers'
own test pages work the same way: Stripe's "Complete / Fail authentication", Adyen's and
Checkout.com's password forms, where a wrong password fails), posted as a normal form, so a
browser or a plain HTTP client can act as the shopper without JavaScript.

The shopper's choice settles the payment at once, as at the real providers: the provider
authorises (or declines) and notifies, then sends the browser back to the merchant's return URL
with its own parameters; the merchant's completion call (Stripe retrieve, Adyen
`/payments/details`, Checkout.com `GET /payments/{id}`) then only reads the result. So a webhook
and a completion call agree whichever arrives first, and a choice posted twice (a reload, a
double click) changes nothing the second time. A challenge the shopper abandons keeps its
payment in the waiting state until the merchant cancels it; a cancelled challenge's page is gone.

Each provider's emulator supplies `finish_challenge` (what the choice does to its ledger entry
and which notification it sends) and `challenge_return` (the return URL with its parameters).
"""

from __future__ import annotations

import html
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from emulators.ledger import Ledger

CHALLENGE_PATH = "/3ds/challenge/{token}"


class Flow(StrEnum):
    FRICTIONLESS = "frictionless"  # authenticated without the shopper: no action
    CHALLENGE = "challenge"  # the shopper must complete a challenge first


@dataclass(frozen=True, slots=True)
class ThreeDSCard:
    """How a test card behaves under 3-D Secure, as its provider's test-card docs describe it."""

    flow: Flow
    # A completed challenge that still does not authenticate (Checkout.com's "not authenticated"
    # / "rejected" challenge cards): the shopper's "Complete" fails as "Fail" would.
    authenticates: bool = True
    # Authenticated, then declined by the issuer with this code (Stripe 4000008400001629).
    decline_after: str | None = None
    # Only challenged when the request asks for 3-D Secure (Stripe's "supported, not required").
    only_when_requested: bool = False


class ChallengeState(StrEnum):
    PENDING = "pending"
    AUTHENTICATED = "authenticated"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class Challenge:
    """One shopper challenge: which payment, where the browser goes back, what the shopper did."""

    token: str
    payment_id: str
    return_url: str | None
    card: ThreeDSCard
    state: ChallengeState = ChallengeState.PENDING
    created_at: float = field(default_factory=time.time)
    decided_at: float | None = None

    def view(self) -> dict[str, object]:
        return {"payment_id": self.payment_id, "state": self.state.value, "created_at": self.created_at,
                "decided_at": self.decided_at}


class ChallengeIssuer(Protocol):
    """What a provider's emulator does when its shopper decides."""

    def finish_challenge(self, challenge: Challenge, authenticated: bool) -> None:
        """Settle the payment (ledger and notification) for the shopper's outcome."""

    def challenge_return(self, challenge: Challenge) -> str | None:
        """Where the browser goes next, with the provider's parameters; None: no return URL."""


def with_query(url: str, params: dict[str, str]) -> str:
    """`url` with `params` added to its query (keeping what the merchant put there)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


class ChallengeDesk:
    """The challenges of one emulator, and the page that serves them."""

    def __init__(self, issuer: ChallengeIssuer, ledger: Ledger) -> None:
        self._issuer = issuer
        self._ledger = ledger
        self._by_token: dict[str, Challenge] = {}
        self._by_payment: dict[str, Challenge] = {}

    def open(self, payment_id: str, return_url: str | None, card: ThreeDSCard) -> Challenge:
        challenge = Challenge(secrets.token_urlsafe(18), payment_id, return_url, card)
        self._by_token[challenge.token] = challenge
        self._by_payment[payment_id] = challenge
        self._record(challenge)
        return challenge

    def _record(self, challenge: Challenge) -> None:
        """The challenge's state on its ledger entry (`extra["three_ds"]`), so the ledger shows
        what the shopper did (never the page's token)."""
        entry = self._ledger.get(challenge.payment_id)
        if entry is not None:
            entry.extra["three_ds"] = {"state": challenge.state.value, "created_at": challenge.created_at,
                                       "decided_at": challenge.decided_at}

    def url(self, request: web.Request, challenge: Challenge) -> str:
        return base_url(request) + CHALLENGE_PATH.format(token=challenge.token)

    def get(self, token: str) -> Challenge | None:
        return self._by_token.get(token)

    def for_payment(self, payment_id: str) -> Challenge | None:
        return self._by_payment.get(payment_id)

    def cancel(self, payment_id: str) -> bool:
        """The merchant cancelled a payment still waiting for its shopper: the page is gone.
        False when there is no pending challenge for it."""
        challenge = self._by_payment.get(payment_id)
        if challenge is None or challenge.state is not ChallengeState.PENDING:
            return False
        challenge.state, challenge.decided_at = ChallengeState.CANCELLED, time.time()
        self._record(challenge)
        return True

    def clear(self) -> None:
        self._by_token.clear()
        self._by_payment.clear()

    def snapshot(self) -> list[dict[str, object]]:
        return [c.view() for c in self._by_token.values()]

    def routes(self) -> list[web.RouteDef]:
        return [web.get(CHALLENGE_PATH, self._page), web.post(CHALLENGE_PATH, self._choose)]

    async def _page(self, request: web.Request) -> web.Response:
        challenge = self._by_token.get(request.match_info["token"])
        if challenge is None or challenge.state is ChallengeState.CANCELLED:
            return _gone()
        if challenge.state is not ChallengeState.PENDING:
            return self._back(challenge)
        action = html.escape(CHALLENGE_PATH.format(token=challenge.token), quote=True)
        body = (f"<p>Test 3-D Secure challenge for payment {html.escape(challenge.payment_id)}.</p>"
                f'<form method="post" action="{action}">'
                '<button type="submit" name="choice" value="complete" id="complete">Complete</button> '
                '<button type="submit" name="choice" value="fail" id="fail">Fail</button>'
                "</form>")
        return _html(200, "3-D Secure authentication", body)

    async def _choose(self, request: web.Request) -> web.Response:
        challenge = self._by_token.get(request.match_info["token"])
        if challenge is None or challenge.state is ChallengeState.CANCELLED:
            return _gone()
        form = await request.post()
        choice = form.get("choice")
        if choice not in ("complete", "fail"):
            return _html(400, "Choose an outcome", "<p>Post choice=complete or choice=fail.</p>")
        if challenge.state is ChallengeState.PENDING:  # a second post (reload, double click) changes nothing
            authenticated = choice == "complete" and challenge.card.authenticates
            challenge.state = ChallengeState.AUTHENTICATED if authenticated else ChallengeState.FAILED
            challenge.decided_at = time.time()
            self._record(challenge)
            self._issuer.finish_challenge(challenge, authenticated)
        return self._back(challenge)

    def _back(self, challenge: Challenge) -> web.Response:
        location = self._issuer.challenge_return(challenge)
        if location is None:
            return _html(200, "Authentication finished", f"<p>Outcome: {challenge.state.value}.</p>")
        raise web.HTTPSeeOther(location)


def _gone() -> web.Response:
    return _html(410, "Authentication no longer available",
                 "<p>This authentication has expired or was cancelled. Nothing was charged.</p>")


def _html(status: int, title: str, body: str) -> web.Response:
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return web.Response(status=status, text=page, content_type="text/html")
