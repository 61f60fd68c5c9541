"""Time the card-data and secret detector where it runs per payment (DESIGN rule 6).

    .venv/bin/python bench/bench_redaction.py [--repeat 15] [--number 5000]

Per call, best of `--repeat` runs of `--number` calls each (the minimum is the least noisy
figure on a shared machine):

* the `Redactor` over one typical transaction-log event (the shape of
  `PaymentService.transaction_line`: a failover from stripe to adyen, two attempts), without and
  with five configured secret values;
* the journal's codec, `payment_row` (the redacted `PaymentRecord.to_doc`, serialised), against
  serialising the record unredacted as before;
* a stored answer (`StoredResponse`, a payment document of about 730 bytes);
* the API's free-text check of a typical `PaymentCreate`.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.http.free_text import refuse_card_data  # noqa: E402
from gateway.http.schemas import PaymentCreate  # noqa: E402
from gateway.journal.records import Attempt, PaymentRecord, StoredResponse  # noqa: E402
from gateway.journal.store import payment_row  # noqa: E402
from gateway.answers import payment_doc  # noqa: E402
from gateway.redaction import Redactor  # noqa: E402

SECRETS = ["test-checkout-key", "test-reporting-key", "sk_test_gateway", "adyen_test_key", "sk_sbox_gateway"]


def _attempt_doc(provider: str, outcome: str, raw_code: str, now: float) -> dict[str, Any]:
    return {"provider": provider, "try": 1, "operation": "authorize", "outcome": outcome, "raw_code": raw_code,
            "http_status": 200, "latency_ms": 12.345, "breaker_state": "closed",
            "failover_reason": "unavailable" if outcome != "approved" else None, "started_at": now}


def typical_event(now: float) -> dict[str, Any]:
    return {
        "event": "payment", "log_id": "pay_abcdefghijklmnopqrstuvwxyza:payment:1a2b3c4d",
        "payment_id": "pay_abcdefghijklmnopqrstuvwxyza", "client": "checkout", "merchant_reference": "order-18342",
        "amount": 1299, "currency": "EUR", "country": "DE", "card_brand": "visa", "card_bin": "424242",
        "card_last4": "4242", "route": "default", "status": "approved", "provider": "adyen",
        "provider_reference": "EMUA123456789013", "outcome": "approved", "decline_code": None, "error_code": None,
        "attempts": [_attempt_doc("stripe", "unavailable", "connect", now), _attempt_doc("adyen", "approved",
                                                                                        "Authorised", now)],
        "failovers": 1, "retries": 0, "metadata": {"cart": "c-991", "channel": "web"}, "created_at": now,
    }


def typical_record(now: float) -> PaymentRecord:
    return PaymentRecord(
        id="pay_abcdefghijklmnopqrstuvwxyza", client="checkout", amount=1299, currency="EUR", capture=True,
        merchant_reference="order-18342", metadata={"cart": "c-991", "channel": "web"}, card_brand="visa",
        card_bin="424242", card_last4="4242", provider="adyen", provider_reference="EMUA123456789013",
        attempts=[Attempt("stripe", 1, "authorize", "k1", now, "unavailable", "connect", None, 1.2, "closed", None,
                          "unavailable", "connection refused"),
                  Attempt("adyen", 1, "authorize", "k2", now, "approved", "Authorised", 200, 12.3, "closed",
                          "EMUA123456789013")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=5000)
    args = parser.parse_args()
    now = time.time()
    event, record = typical_event(now), typical_record(now)
    answer = orjson.dumps(payment_doc(record))
    plain, configured = Redactor(), Redactor(secrets=SECRETS)
    payload = PaymentCreate.model_validate({
        "amount": 1299, "currency": "EUR", "merchant_reference": "order-18342", "description": "2 items",
        "metadata": {"cart": "c-991", "channel": "web"},
        "payment_method": {"type": "card", "number": "4242424242424242", "exp_month": 12, "exp_year": 2030}})
    cases: dict[str, Callable[[], object]] = {
        "log event, Redactor()": lambda: plain(None, "info", dict(event)),
        f"log event, Redactor({len(SECRETS)} secrets)": lambda: configured(None, "info", dict(event)),
        "journal row, unredacted (before)": lambda: orjson.dumps(record),
        "journal row, payment_row": lambda: payment_row(record),
        f"stored answer ({len(answer)} B)": lambda: StoredResponse(201, answer),
        "free-text check, PaymentCreate": lambda: refuse_card_data(payload, configured),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeat):  # interleaved, so a noisy moment hits every case alike
        for name, call in cases.items():
            best[name] = min(best[name], timeit.timeit(call, number=args.number) / args.number)
    for name, seconds in best.items():
        print(f"{name:40} {seconds * 1e6:7.2f} us")


if __name__ == "__main__":
    main()
