"""OpenTelemetry traces of the request path (`observability.tracing`, off by default).

One server span per front-door request (the checkout's W3C `traceparent` continues its trace;
nothing of it is ever forwarded to a provider; the middleware is the front door's,
`gateway.api.tracing`), inside it one span per provider attempt and
status query, and one per journal write (the key claim, the write before a call, the final
commit). The reconciler's pass over one payment is a span of its own; the webhook processor
opens `Tracing.webhook(provider)` around each delivery it handles.

Off is a no-op path, not a sampler at 0: no middleware is installed, and every hook meets one
shared object whose methods do nothing (`gateway.tracing.spans`). On, spans go through a
private `TracerProvider` (never OpenTelemetry's global one, so two apps in one process, or a
library that sets the global, do not mix) to an OTLP/HTTP exporter on its own thread
(`gateway.tracing.setup`). `trace_id` and `span_id` reach every log line through a structlog
processor of the log pipeline that reads OpenTelemetry's context (`gateway.txlog.trace_ids`).

The modules are imported by name: this package imports none of them, so a module that needs
only the span hooks does not pull in the SDK set-up or the configuration.
"""
