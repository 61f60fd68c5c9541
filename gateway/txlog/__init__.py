"""Transaction log pipeline: JSON rendering and a non-blocking rotating writer.

Every payment is logged exactly once as one JSON line (DESIGN rule 5) through
`build_transaction_logger`, whose processor chain always includes the `Redactor`
(`gateway.redaction`, DESIGN rule 6). `JsonLinesWriter` keeps file I/O off the event loop and
tells the API when to shed load (`has_capacity`) before a line could be lost. `gateway.txlog.outbox.TransactionLog`
renders each line (`build_transaction_renderer`, the same chain) before the journal commit that
stores it in the outbox, so a crash before the line is on disk cannot lose it.
"""

from gateway.txlog.logger import build_ops_logger, build_transaction_logger, build_transaction_renderer
from gateway.txlog.writer import (
    JsonLinesWriter,
    LogQueueFull,
    LogWriterClosed,
    LogWriterError,
)

__all__ = [
    "JsonLinesWriter",
    "LogQueueFull",
    "LogWriterClosed",
    "LogWriterError",
    "build_ops_logger",
    "build_transaction_logger",
    "build_transaction_renderer",
]
