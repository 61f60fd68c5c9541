"""How a payment looks to the checkout service: one document for the API, replays and the
reconciler's stored answers alike."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.journal.records import PaymentRecord, StoredResponse
from domain.outcome import PaymentStatus


def payment_doc(record: PaymentRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "status": record.status.value,
        "amount": record.amount,
        "currency": record.currency,
        "capture": record.capture,
        "merchant_reference": record.merchant_reference,
        "provider": record.provider,
        "provider_reference": record.provider_reference,
        "decline_code": record.decline_code,
        "error_code": record.error_code,
        "captured_amount": record.captured_amount,
        "refunded_amount": record.refunded_amount,
        "card": {"brand": record.card_brand, "bin": record.card_bin, "last4": record.card_last4}
        if record.card_last4 else None,
        "attempts": [
            {"provider": a.provider, "try": a.try_number, "operation": a.operation, "outcome": a.outcome,
             "raw_code": a.raw_code, "http_status": a.http_status, "latency_ms": a.latency_ms,
             "failover_reason": a.failover_reason}
            for a in record.attempts
        ],
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def payment_http_status(record: PaymentRecord) -> int:
    return 502 if record.status is PaymentStatus.FAILED else 201


def payment_answer(record: PaymentRecord) -> StoredResponse:
    """The exact bytes the caller gets, and every replay of its key after it."""
    return StoredResponse(payment_http_status(record), orjson.dumps(payment_doc(record)))
