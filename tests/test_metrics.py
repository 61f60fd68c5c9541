"""What `/metrics` shows is what the gateway is doing: the figures the alert rules and the
dashboard read (deploy/prometheus/, deploy/grafana/), through a real gateway and real emulators.

* A payment in flight shows in `gateway_in_flight_requests` and in its provider's
  `gateway_bulkhead_active`, and both return to 0 when it is answered (the bulkhead gauge used to
  be set only when a call took its slot, so it kept the last call's count forever).
* Every provider's series exist before its first call: its breaker closed, its bulkhead limit,
  its retries and authorisation outcomes at 0, and every shed reason at 0.
* A payment the reconciler cannot settle shows in `gateway_pending_payments` and
  `gateway_pending_oldest_age_seconds`, and leaves them once it is settled.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from domain.outcome import PaymentStatus
from emulators.faults import FaultRule
from gateway.app_keys import RECONCILER, STORE
from gateway.journal.records import Attempt, PaymentRecord
from gateway.metrics import SHED_REASONS
from gateway.orchestrator import provider_idempotency_key
from tests.conftest import metrics_text, pay, set_faults

SLOW_MS = 500  # the primary's answer: long enough to look at the metrics meanwhile, within its timeout
LOOK_WAIT_S = 5.0


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text, or None when it is absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # rendered in name order
    pattern = rf"^{re.escape(name)}{re.escape('{' + wanted + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found[1]) if found else None


async def test_a_payment_in_flight_shows_and_leaves(engine_config: Any, start_gateway: Any, stripes: Any) -> None:
    client = await start_gateway(engine_config(every_provider={"bulkhead": {"max_concurrent": 7}}))
    before = await metrics_text(client)
    for provider in ("primary", "backup"):
        assert sample(before, "gateway_breaker_state", provider=provider) == 0
        assert sample(before, "gateway_bulkhead_active", provider=provider) == 0
        assert sample(before, "gateway_bulkhead_waiting", provider=provider) == 0
        assert sample(before, "gateway_bulkhead_max_concurrent", provider=provider) == 7
        assert sample(before, "gateway_retries_total", provider=provider) == 0
        assert sample(before, "gateway_attempts_total", provider=provider, operation="authorize",
                      outcome="approved") == 0
    for reason in SHED_REASONS:
        assert sample(before, "gateway_shed_total", reason=reason) == 0
    assert sample(before, "gateway_in_flight_requests") == 0

    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=SLOW_MS, operations=("authorize",)))
    payment = asyncio.create_task(pay(client))
    until = time.monotonic() + LOOK_WAIT_S
    while True:  # a bounded poll of /metrics: the call is in flight at the emulator
        during = await metrics_text(client)
        if sample(during, "gateway_bulkhead_active", provider="primary") == 1:
            break
        assert not payment.done() and time.monotonic() < until, "the slow call never showed as in flight"
        await asyncio.sleep(0.02)
    assert sample(during, "gateway_in_flight_requests") == 1
    assert sample(during, "gateway_bulkhead_active", provider="backup") == 0

    status, body = await payment
    assert status == 201 and body["status"] == "approved"
    after = await metrics_text(client)
    assert sample(after, "gateway_bulkhead_active", provider="primary") == 0
    assert sample(after, "gateway_in_flight_requests") == 0
    assert sample(after, "gateway_attempts_total", provider="primary", operation="authorize", outcome="approved") == 1
    assert sample(after, "gateway_payments_total", status="approved") == 1


async def test_a_payment_the_reconciler_cannot_settle_shows_as_pending(engine_config: Any, start_gateway: Any,
                                                                       stripes: Any) -> None:
    """A crash left a payment mid-call an hour ago; the provider cannot be asked (an outage), so
    the reconciler keeps it pending and says so; once the provider answers, it is settled."""
    client = await start_gateway(engine_config())
    crashed_at = time.time() - 3600
    key = provider_idempotency_key("pay_metrics_pending", "primary")
    record = PaymentRecord(id="pay_metrics_pending", client="checkout", amount=1299, currency="EUR", capture=True,
                           merchant_reference="order-metrics-pending", status=PaymentStatus.ATTEMPTING,
                           provider="primary", provider_idempotency_key=key, created_at=crashed_at,
                           updated_at=crashed_at)
    record.attempts.append(Attempt(provider="primary", try_number=1, operation="authorize", idempotency_key=key,
                                   started_at=crashed_at))
    await client.app[STORE].save_payment(record)
    reconciler = client.app[RECONCILER]
    before = await metrics_text(client)
    assert sample(before, "gateway_pending_payments") == 0

    await stripes["primary"].set_outage(True)
    await reconciler.run_once(min_age_s=0, ignore_backoff=True)
    pending = await metrics_text(client)
    assert sample(pending, "gateway_pending_payments") == 1
    age = sample(pending, "gateway_pending_oldest_age_seconds")
    assert age is not None and 3600 <= age < 3600 + 60

    await stripes["primary"].set_outage(False)
    await reconciler.run_once(min_age_s=0, ignore_backoff=True)
    settled = await metrics_text(client)
    assert sample(settled, "gateway_pending_payments") == 0
    assert sample(settled, "gateway_pending_oldest_age_seconds") == 0
    assert sample(settled, "gateway_reconciled_total", status="failed") == 1  # never charged: nothing to find
