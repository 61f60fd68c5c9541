"""structlog loggers for the transaction log and for operational events.

Both are built with `structlog.wrap_logger` and their own processor chain, never with
`structlog.configure`: the gateway's logging must not depend on (or disturb) global state that
tests, libraries or an embedding application may set.

The transaction chain comes in two forms with the same processors: `build_transaction_logger`
writes each line to a `JsonLinesWriter`, and `build_transaction_renderer` returns each line as
bytes without writing it (the outbox renders a line before the journal commit that stores it,
and writes it after; see `gateway.txlog.outbox`).

The `Redactor` sits inside each chain (DESIGN rule 6). Every event passes through it on its
way to bytes, so no call site can forget to redact and no call site redacts its own way. It
runs after the contextvars merge, so values bound in middleware are scrubbed too, and before
the timestamp, which we generate ourselves and need not scan; so are the trace ids
(`gateway.txlog.trace_ids`: random hex that the card-number rule could mistake for a card).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

from gateway.txlog.trace_ids import add_trace_ids
from gateway.txlog.redaction import Redactor
from gateway.txlog.writer import JsonLinesWriter

__all__ = ["build_ops_logger", "build_transaction_logger", "build_transaction_renderer"]

# One line per event: orjson escapes control characters inside strings, so the appended
# newline is the only one. Non-string keys (ints in provider metadata) must not fail a log call.
_ORJSON_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


class _WriterLogger:
    """Wrapped logger whose every level hands the rendered line to the writer.

    `JsonLinesWriter.write` only queues, so logging stays non-blocking on the event loop; a
    full queue raises `LogQueueFull` to the caller instead of silently losing a transaction.
    """

    __slots__ = ("_writer",)

    def __init__(self, writer: JsonLinesWriter) -> None:
        self._writer = writer

    def msg(self, message: bytes) -> None:
        self._writer.write(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


# Ops events below INFO are dropped before any processor runs; `exception()` adds the traceback.
_OpsBoundLogger = structlog.make_filtering_bound_logger(logging.INFO)


def _dumps(obj: Any, *, default: Any, option: int = 0) -> bytes:
    """Serialise with orjson, falling back to the stdlib for what orjson refuses.

    Ints beyond 64 bits and lone surrogates (stdlib-decoded provider JSON) are legal in
    metadata; such a value must not make a payment's log call fail.
    """
    try:
        return orjson.dumps(obj, default=default, option=option)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        text = json.dumps(obj, default=default, ensure_ascii=True, separators=(",", ":"))
        return (text + "\n" if option & orjson.OPT_APPEND_NEWLINE else text).encode()


def _dumps_text(obj: Any, **kwargs: Any) -> str:
    return _dumps(obj, **kwargs).decode()


def _transaction_processors(redactor: Redactor | None) -> list[Any]:
    """Contextvars, Redactor, trace ids, UTC ISO-8601 ``ts``, orjson renderer (bytes ending in one newline)."""
    return [
        structlog.contextvars.merge_contextvars,
        redactor or Redactor(),
        add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.JSONRenderer(serializer=_dumps, option=_ORJSON_OPTIONS),
    ]


def build_transaction_logger(
    writer: JsonLinesWriter, *, redactor: Redactor | None = None
) -> structlog.BoundLogger:
    """Logger writing one redacted JSON line per call to `writer`.

    Use the sync methods (``info``), not ``ainfo``: they would add a thread hop per call for a
    call that never blocks anyway.
    """
    proxy = structlog.wrap_logger(
        _WriterLogger(writer),
        processors=_transaction_processors(redactor),
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
    )
    return proxy.bind()  # type: ignore[no-any-return]


def build_transaction_renderer(*, redactor: Redactor | None = None) -> structlog.BoundLogger:
    """The transaction logger's pipeline, returning each line instead of writing it:
    ``build_transaction_renderer().info("payment", **fields)`` is the redacted line as bytes,
    byte for byte what `build_transaction_logger` would write for the same call."""
    proxy = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=_transaction_processors(redactor),
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
    )
    return proxy.bind()  # type: ignore[no-any-return]


def build_ops_logger(
    stream: TextIO | None = None, *, redactor: Redactor | None = None
) -> structlog.typing.FilteringBoundLogger:
    """Logger for operational events (startup, breaker transitions, certificate warnings).

    Writes JSON lines to `stream` (default: ``sys.stderr`` at call time, so test capture
    works). These events are rare, so a direct, locked stream write is acceptable here;
    tracebacks are rendered to text before the Redactor so secrets in them are scrubbed too.
    """
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        redactor or Redactor(),
        add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        # PrintLogger adds the newline itself.
        structlog.processors.JSONRenderer(
            serializer=_dumps_text, option=orjson.OPT_NON_STR_KEYS
        ),
    ]
    proxy = structlog.wrap_logger(
        structlog.PrintLogger(stream if stream is not None else sys.stderr),
        processors=processors,
        wrapper_class=_OpsBoundLogger,
        context_class=dict,
    )
    return proxy.bind()  # type: ignore[no-any-return]
