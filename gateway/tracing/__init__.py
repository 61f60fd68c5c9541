"""OpenTelemetry traces of the request path (`observability.tracing`, off by default).

One server span per front-door request (the checkout's W3C `traceparent` continues its trace;
nothing of it is ever forwarded to a provider), inside it one span per provider attempt and
status query, and one per journal write (the key claim, the write before a call, the final
commit). The reconciler's pass over one payment is a span of its own; the webhook processor
opens `Tracing.webhook(provider)` around each delivery it handles.

Off is a no-op path, not a sampler at 0: no middleware is installed, and every hook meets one
shared object whose methods do nothing (`gateway.tracing.spans`). On, spans go through a
private `TracerProvider` (never OpenTelemetry's global one, so two apps in one process, or a
library that sets the global, do not mix) to an OTLP/HTTP exporter on its own thread
(`gateway.tracing.setup`). `trace_id` and `span_id` reach every log line through a structlog
processor that reads OpenTelemetry's context (`gateway.tracing.log_ids`).

The modules are imported by name (this package imports none of them: the log pipeline imports
`log_ids`, and must not pull in the SDK set-up or the configuration).
"""
