"""Classification helpers every provider mapping shares."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from domain.outcome import Outcome
from domain.types import ProviderResult
from providers.errors import MaybeSent, TransportError

MAX_RETRY_AFTER_S = 60.0


def json_object(body: bytes) -> dict[str, Any]:
    """A provider body as a JSON object; anything else (empty, HTML from a proxy, a list) is {}
    so that classification falls back to the status code and headers."""
    try:
        doc = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


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
