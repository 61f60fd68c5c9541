"""Building the tracer from `observability.tracing`, once, at start.

A private `TracerProvider`: the sampler is parent-based (a checkout that sampled its trace gets
ours too, one that did not does not) over a trace-id ratio for traces we start; spans are
batched and exported over OTLP/HTTP by the SDK's own thread, so the event loop never waits for a
collector (a collector that is down costs dropped spans, never a slow payment). Tests hand in an
exporter (the SDK's in-memory one), exported synchronously so a test reads spans as they end.
"""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from gateway.config import TracingConfig
from gateway.tracing.spans import NO_TRACING, LiveTracing, Tracing
from gateway.txlog.redaction import Redactor


def build_tracing(config: TracingConfig, redactor: Redactor, *, exporter: SpanExporter | None = None) -> Tracing:
    """`NO_TRACING` when tracing is off; else a live tracer exporting to `config.endpoint`, or
    to `exporter` when one is given."""
    if not config.enabled:
        return NO_TRACING
    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    else:
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint, timeout=config.export_timeout_s),
                                       max_queue_size=config.max_queue_size)
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
                              resource=Resource.create({SERVICE_NAME: config.service_name}), shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return LiveTracing(provider, redactor)
