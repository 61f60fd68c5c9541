"""Span attributes from our own records, in one place: the names a trace backend's queries use.

OpenTelemetry's semantic conventions where one fits (`http.response.status_code`), the
`gateway.` namespace for the rest. Only identifiers, codes, states and counts: never card data, a key, or a provider's reference
(the provider's id of a charge is enough to act on it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.journal.records import Attempt, PaymentRecord

AttrValue = str | bool | int | float

# Outcome classes a span is marked failed for (declines and approvals are answers, not errors).
FAILED_OUTCOMES = frozenset({"unavailable", "unknown", "rejected"})


def attempt_attributes(attempt: Attempt) -> dict[str, AttrValue | None]:
    return {
        "gateway.provider": attempt.provider,
        "gateway.operation": attempt.operation,
        "gateway.try": attempt.try_number,
        "gateway.outcome": attempt.outcome,
        "gateway.raw_code": attempt.raw_code,
        "http.response.status_code": attempt.http_status,
        "gateway.breaker_state": attempt.breaker_state,
        "gateway.failover_reason": attempt.failover_reason,
    }


def record_attributes(record: PaymentRecord, kind: str) -> dict[str, AttrValue | None]:
    return {
        "gateway.payment_id": record.id,
        "gateway.journal.kind": kind,
        "gateway.payment_status": record.status.value,
        "gateway.provider": record.provider,
    }


def failed_outcome(outcome: str | None) -> bool:
    return outcome in FAILED_OUTCOMES
