"""`trace_id` and `span_id` in every log line: a structlog processor reading the span that is
current where the line is logged (OpenTelemetry keeps it in a contextvar, as structlog's
`merge_contextvars` does its own values).

It runs after the `Redactor`: the ids are our own random hex, never free text, and a 32-digit
hex id holds a Luhn-valid run of 12+ decimal digits often enough (about one trace in a hundred)
that the card-number rule would mangle it. With tracing off no span is ever current, so the
processor adds nothing, at the cost of one contextvar read.
"""

from __future__ import annotations

from opentelemetry.trace import get_current_span
from structlog.typing import EventDict, WrappedLogger


def add_trace_ids(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    context = get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def current_trace_id() -> str | None:
    """The current trace's id as logged (for records kept beside the log, like the console's
    last failures), or None outside any trace."""
    context = get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
