"""What tracing costs a payment: the hooks one payment runs (the server span, the key claim, one
provider call, the final commit, and the log processor on its transaction line), timed off and
on, and the OTLP encoding of one payment's spans (done by the exporter's own thread, but on the
same 2 cores).

    .venv/bin/python bench/bench_tracing.py [--payments 20000]

Off is `NO_TRACING` (the default); on is the SDK behind a `BatchSpanProcessor` whose exporter
drops what it gets (export I/O is the collector's and the thread's, not the request path's).
Bounded in count; no network.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from domain.outcome import PaymentStatus
from gateway.journal.records import Attempt, PaymentRecord
from gateway.txlog.trace_ids import add_trace_ids
from gateway.tracing.spans import NO_TRACING, LiveTracing, Tracing
from gateway.txlog.redaction import Redactor

SAMPLED = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
NOT_SAMPLED = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def one_payment(tracing: Tracing, record: PaymentRecord, attempt: Attempt, headers: dict[str, str]) -> None:
    """The hooks of one payment, in their order and nesting (the awaits between them left out)."""
    with tracing.server_span("POST /v1/payments", headers) as server:
        server.set({"http.request.method": "POST", "http.route": "/v1/payments"})
        with tracing.span("journal.claim") as span:
            span.record(record, "payment")
        with tracing.span("provider.authorize", kind=SpanKind.CLIENT) as span:
            span.attempt(attempt)
        add_trace_ids(None, "info", {"event": "payment"})
        with tracing.span("journal.commit") as span:
            span.record(record, "payment")
        server.http_status(201)


def per_payment_us(tracing: Tracing, payments: int, headers: dict[str, str] = SAMPLED) -> float:
    record = PaymentRecord(id="pay_bench", client="checkout", amount=1299, currency="EUR", capture=True,
                           merchant_reference="bench", status=PaymentStatus.APPROVED, provider="stripe")
    attempt = Attempt(provider="stripe", try_number=1, operation="authorize", idempotency_key="k", started_at=0.0,
                      outcome="approved", raw_code="succeeded", http_status=200, breaker_state="closed")
    for _ in range(min(1000, payments)):
        one_payment(tracing, record, attempt, headers)
    start = time.perf_counter()
    for _ in range(payments):
        one_payment(tracing, record, attempt, headers)
    return (time.perf_counter() - start) / payments * 1e6


def live(processor: BatchSpanProcessor | SimpleSpanProcessor) -> tuple[LiveTracing, TracerProvider]:
    provider = TracerProvider(resource=Resource({"service.name": "bench"}), shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return LiveTracing(provider, Redactor()), provider


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--payments", type=int, default=20_000)
    payments = min(ap.parse_args().payments, 1_000_000)
    off = per_payment_us(NO_TRACING, payments)
    tracing, provider = live(BatchSpanProcessor(_Drop(), max_queue_size=payments * 5))
    on = per_payment_us(tracing, payments)
    unsampled = per_payment_us(tracing, payments, NOT_SAMPLED)
    provider.shutdown()
    memory = InMemorySpanExporter()
    tracing, provider = live(SimpleSpanProcessor(memory))
    per_payment_us(tracing, 1)
    spans = memory.get_finished_spans()[-5:]
    rounds = max(1, payments // 10)
    start = time.perf_counter()
    for _ in range(rounds):
        encode_spans(spans).SerializeToString()
    encode = (time.perf_counter() - start) / rounds * 1e6
    provider.shutdown()
    print(f"tracing off: {off:7.2f} µs per payment (5 hooks + the log processor)")
    print(f"tracing on:  {on:7.2f} µs per payment on the request path (5 spans, batched, export dropped)")
    print(f"             {unsampled:7.2f} µs per payment whose caller did not sample its trace")
    print(f"             {encode:7.2f} µs per payment to encode its 5 spans as OTLP (the exporter's thread)")


if __name__ == "__main__":
    main()
