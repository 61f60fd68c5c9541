"""Classification helpers every provider mapping shares, and the one error-status table.

The error-status table is the part of classification where the three providers mostly agree,
so it is written once here (`DEFAULT_ERROR_STATUS`) and each mapping lays over it only the rows
in which its provider differs (`error_status_table`), each with its own source comment.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any

import orjson

from domain.outcome import Outcome
from domain.types import Lookup, Operation, ProviderResult, StatusAnswer
from providers.errors import MaybeSent, TransportError

MAX_RETRY_AFTER_S = 60.0

# HTTP status of an error answer -> class, when nothing more specific in the answer (a decline
# code, a provider's own "not processed" signal) decides it. A status that is not listed is
# `unknown` from 500 up (the request may have been processed) and `rejected` below.
DEFAULT_ERROR_STATUS: Mapping[int, Outcome] = MappingProxyType(
    {
        400: Outcome.REJECTED,  # our request is malformed: a bug or bad input, never a provider fault
        401: Outcome.UNAVAILABLE,  # our credentials: refused before processing, another provider can serve
        403: Outcome.UNAVAILABLE,  # our account's permissions or configuration (Stripe: key lacks rights; Adyen 901)
        404: Outcome.REJECTED,  # a path or object we named does not exist: our input
        409: Outcome.UNKNOWN,  # a request with our key is still in flight: the first one may still charge
        422: Outcome.REJECTED,  # validation (Adyen, Checkout.com): our request, not a decline
        # Rate limiters run before the provider processes anything (Stripe: "rate limiters run
        # before the API's idempotency layer"), so a 429 is safe to retry or to fail over.
        429: Outcome.UNAVAILABLE,
        # 5xx: the request reached the provider, which may have processed it before failing.
        # None of the three providers documents a 5xx status as "not processed"; only a
        # provider's own signal in the answer (Adyen's `transient-error: true`) says so, and the
        # mappings read that before this table.
        500: Outcome.UNKNOWN,  # the provider's own failure; Stripe: "treat the result as indeterminate"
        502: Outcome.UNKNOWN,  # a proxy's answer: the provider behind it may have processed the request
        # "Service unavailable" names no point before processing (Adyen 00_503: "our servers are
        # unavailable"; Stripe and Checkout.com document 503 only as a server error).
        503: Outcome.UNKNOWN,
        504: Outcome.UNKNOWN,  # a gateway timed out waiting: the provider may still be processing it
    }
)


def error_status_table(overrides: Mapping[int, Outcome] | None = None) -> Mapping[int, Outcome]:
    """The shared table with one provider's differing rows laid over it."""
    return MappingProxyType({**DEFAULT_ERROR_STATUS, **(overrides or {})})


def status_outcome(table: Mapping[int, Outcome], status: int) -> Outcome:
    """An error status's class by `table`; unlisted 5xx are unknown, unlisted 4xx rejected."""
    listed = table.get(status)
    if listed is not None:
        return listed
    return Outcome.UNKNOWN if status >= 500 else Outcome.REJECTED


def json_value(body: bytes) -> Any:
    """A provider body as JSON (any shape: some lookups answer a bare list), or None."""
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def json_object(body: bytes) -> dict[str, Any]:
    """A provider body as a JSON object; anything else (empty, HTML from a proxy, a list) is {}
    so that classification falls back to the status code and headers."""
    doc = json_value(body)
    return doc if isinstance(doc, dict) else {}


def json_list(value: Any) -> list[dict[str, Any]]:
    """The objects of a JSON array (anything else in it, or a value that is no array: none)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or HTTP-date), capped so a provider cannot park us."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def result_from_transport_error(exc: TransportError) -> ProviderResult:
    """No HTTP answer: unknown if the request may have been processed, else unavailable."""
    outcome = Outcome.UNKNOWN if isinstance(exc, MaybeSent) else Outcome.UNAVAILABLE
    return ProviderResult(outcome, raw_code=exc.code, message=str(exc))


def reject_status_query(op: Operation) -> None:
    """`parse` classifies the answer to an authorisation or a follow-up. A status query's answer
    is `parse_status`'s `StatusAnswer` (found / not found / unknown as a type), never an outcome
    read as one: asking `parse` for it is a programming error, refused loudly."""
    if op is Operation.STATUS:
        raise ValueError("parse classifies authorisations and follow-ups; a status answer is parse_status's")


def lookup_failed(result: ProviderResult) -> StatusAnswer:
    """A status query that learnt nothing about the payment: answered with an error (5xx, auth, a
    404 that proves nothing), or not answered at all (a transport error): unknown, with the
    classified error kept for the log and for retry decisions."""
    return StatusAnswer(Lookup.UNKNOWN, result)


def not_found(http_status: int, extra: Mapping[str, str] | None = None) -> StatusAnswer:
    """The provider's own lookup answered with an explicit empty result."""
    return StatusAnswer(Lookup.NOT_FOUND, ProviderResult(Outcome.UNKNOWN, raw_code="not_found",
                                                         http_status=http_status, extra=dict(extra or {})))
