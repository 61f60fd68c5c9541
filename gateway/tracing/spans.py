"""What the engine's hooks call: `Tracing.span(name)` as a context manager, and the handle it
yields, which knows how to turn our own records into span attributes.

`Tracing` itself is the off switch: every method returns one shared no-op, so a hook costs a
method call and nothing is built (attributes are computed inside the live handle's methods, from
the attempt or payment record the hook already holds, never at the call site). `LiveTracing`
(built by `gateway.tracing.setup`) makes real spans. Every string attribute passes the log's
`Redactor` first (DESIGN rule 6): attributes are provider codes, states and names, but a
provider's code is the provider's text and must not become the one place card data leaks.

Exceptions are recorded as their type name only: an exception's message or traceback can quote
data (a provider's body, a DSN), and spans leave the process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.tracing.attributes import AttrValue, attempt_attributes, failed_outcome, record_attributes

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from gateway.journal.records import Attempt, PaymentRecord
    from gateway.txlog.redaction import Redactor


class SpanHandle:
    """The current span as a hook sees it. This base class is the no-op (tracing off)."""

    __slots__ = ()

    def set(self, attributes: Mapping[str, AttrValue | None]) -> None:
        """Attributes; None values are left out."""

    def attempt(self, attempt: Attempt) -> None:
        """A provider attempt or status query, once `ProviderClient` has filled the record in."""

    def record(self, record: PaymentRecord, kind: str) -> None:
        """The payment a journal write is about (`kind`: payment, a follow-up, reconciliation)."""

    def http_status(self, status: int) -> None:
        """The status the server answered."""


class _NoSpan(AbstractContextManager[SpanHandle]):
    __slots__ = ()

    def __enter__(self) -> SpanHandle:
        return _NO_HANDLE

    def __exit__(self, *_exc: object) -> None:
        return None


_NO_HANDLE = SpanHandle()
_NO_SPAN = _NoSpan()


class Tracing:
    """Tracing off: every span is the shared no-op."""

    enabled = False

    def span(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL) -> AbstractContextManager[SpanHandle]:
        return _NO_SPAN

    def server_span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[SpanHandle]:
        """A request's span, continuing the caller's trace when its `traceparent` is valid."""
        return _NO_SPAN

    def webhook(self, provider: str) -> AbstractContextManager[SpanHandle]:
        """The hook for the webhook processor: one span per delivery it handles."""
        return self.span(f"webhook.{provider}", kind=SpanKind.CONSUMER)

    def shutdown(self) -> None:
        """Export what is still buffered and stop (called once, when the app closes)."""


NO_TRACING = Tracing()


class _LiveHandle(SpanHandle):
    __slots__ = ("_span", "_redactor")

    def __init__(self, span: Span, redactor: Redactor) -> None:
        self._span = span
        self._redactor = redactor

    def set(self, attributes: Mapping[str, AttrValue | None]) -> None:
        scrub = self._redactor.scrub_text
        self._span.set_attributes({key: scrub(value) if isinstance(value, str) else value  # one lock, not one each
                                   for key, value in attributes.items() if value is not None})

    def attempt(self, attempt: Attempt) -> None:
        self.set(attempt_attributes(attempt))
        if failed_outcome(attempt.outcome):
            self._span.set_status(Status(StatusCode.ERROR))

    def record(self, record: PaymentRecord, kind: str) -> None:
        self.set(record_attributes(record, kind))

    def http_status(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self._span.set_status(Status(StatusCode.ERROR))


class LiveTracing(Tracing):
    enabled = True

    def __init__(self, provider: TracerProvider, redactor: Redactor) -> None:
        self._provider = provider
        self._tracer: Tracer = provider.get_tracer("gateway")
        self._redactor = redactor
        self._propagator = TraceContextTextMapPropagator()

    def span(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL) -> AbstractContextManager[SpanHandle]:
        return self._span(name, kind, None)

    def server_span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[SpanHandle]:
        # `traceparent` only: `tracestate` is the caller's free text, and it would ride along in
        # every span we export.
        parent = headers.get("traceparent")
        context = self._propagator.extract({"traceparent": parent}) if parent is not None else None
        return self._span(name, SpanKind.SERVER, context)

    @contextmanager
    def _span(self, name: str, kind: SpanKind, context: Context | None) -> Iterator[SpanHandle]:
        with self._tracer.start_as_current_span(name, context=context, kind=kind, record_exception=False,
                                                set_status_on_exception=False) as span:
            try:
                # A span the sampler dropped still carries the trace's ids (for the logs and the
                # children), but nothing of it is exported: no attribute is worth computing.
                yield _LiveHandle(span, self._redactor) if span.is_recording() else _NO_HANDLE
            except BaseException as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    def shutdown(self) -> None:
        self._provider.shutdown()
