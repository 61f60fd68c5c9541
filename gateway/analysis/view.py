"""DuckDB views over the transaction log, read where it lies: no import step.

`open_log` resolves the files (the live ``transactions.jsonl`` and the rotated
``transactions-<stamp>.jsonl.gz``), then creates on one in-memory DuckDB connection:

- ``log_lines``: every line as written, one column per field of the line schema
  (docs/transaction-log.schema.json), plus ``file``; a line cut short by a crash is kept as a row
  of NULLs (``event IS NULL``) so it can be counted, never fails the read. A line is kept once
  per ``log_id``: the outbox (gateway/txlog/outbox.py) writes a line again after a crash only
  when the log's tail lacks it, and a copy it could not see (the line already rotated and
  compressed away) must not count twice. Lines without a ``log_id`` (older logs) are all kept.
- ``transactions``: the readable lines (optionally only those with ``ts`` in a time range).
- ``attempts``: one row per provider attempt. A payment's attempts are cumulative: its capture,
  refund and reconciliation lines repeat the authorisation attempts. Each attempt is therefore
  taken once, from the first line that carries it (``payment_id``, ``attempt_no``).
- ``payments``: one row per payment (``first_seen``: its payment line, or its first line when a
  crash left none), with the authorisation result as reconciliation settled it (``auth_status``)
  and the latest status (``final_status``).

All timestamps are UTC ``TIMESTAMP`` values (the log writes ISO-8601 ``Z`` for ``ts`` and epoch
seconds for ``created_at`` and the attempts' ``started_at``).

With ``materialize="lines"`` the files are parsed once into a temporary table, and with
``materialize="all"`` the attempts and payments are computed once too, so a report that runs a
dozen queries does not parse the files a dozen times; the views keep their names and columns.
"""

from __future__ import annotations

import datetime as dt
import glob
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "DEFAULT_PATTERN",
    "FAILURE_CLASSES",
    "LINE_COLUMNS",
    "VIEW_COLUMNS",
    "LogFilesNotFound",
    "TimeRange",
    "open_log",
    "resolve_paths",
]

DEFAULT_PATTERN = "logs/transactions*.jsonl*"
_DIR_PATTERN = "transactions*.jsonl*"
_LOG_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson", ".ndjson.gz", ".json.gz")

# Attempt outcomes that are a provider failing us (declines are the card's answer, not a failure;
# "skipped" is the router refusing a provider it knows to be unhealthy: breaker open, cert expired).
FAILURE_CLASSES = ("unavailable", "unknown", "rejected", "skipped")

_ATTEMPT = (
    'STRUCT("provider" VARCHAR, "try" INTEGER, "operation" VARCHAR, "outcome" VARCHAR, "raw_code" VARCHAR, '
    '"http_status" INTEGER, "latency_ms" DOUBLE, "breaker_state" VARCHAR, "failover_reason" VARCHAR, '
    '"started_at" DOUBLE)'
)
_FOLLOW_UP = 'STRUCT("operation" VARCHAR, "amount" BIGINT, "outcome" VARCHAR, "raw_code" VARCHAR)'

# The line's fields as DuckDB types. Explicit columns instead of auto-detection: every file reads
# with the same types (a field that is null throughout one file does not become JSON there),
# unknown keys a newer writer adds are ignored, and only these fields are parsed.
LINE_COLUMNS: dict[str, str] = {
    "ts": "TIMESTAMP",
    "event": "VARCHAR",
    "payment_id": "VARCHAR",
    "client": "VARCHAR",
    "merchant_reference": "VARCHAR",
    "amount": "BIGINT",
    "currency": "VARCHAR",
    "country": "VARCHAR",
    "card_brand": "VARCHAR",
    "card_bin": "VARCHAR",
    "card_last4": "VARCHAR",
    "route": "VARCHAR",
    "status": "VARCHAR",
    "provider": "VARCHAR",
    "provider_reference": "VARCHAR",
    "outcome": "VARCHAR",
    "decline_code": "VARCHAR",
    "error_code": "VARCHAR",
    "attempts": f"{_ATTEMPT}[]",
    "failovers": "INTEGER",
    "retries": "INTEGER",
    "latency_ms": "DOUBLE",
    "metadata": "JSON",
    "created_at": "DOUBLE",
    "follow_up": _FOLLOW_UP,
    "log_id": "VARCHAR",
}

# The fields the derived views (attempts, payments) are built from.
VIEW_COLUMNS = frozenset({
    "ts", "event", "payment_id", "amount", "currency", "card_brand", "route", "status", "provider",
    "decline_code", "error_code", "attempts", "failovers", "retries", "latency_ms", "created_at", "log_id",
})


# "none": every view reads the files when queried; "lines": the lines are parsed once into a
# temporary table (a query touching several views reads the files once); "all": the attempts and
# payments tables too (a report running many queries).
Materialize = Literal["none", "lines", "all"]


class LogFilesNotFound(FileNotFoundError):
    """No transaction log file matched the given paths."""


@dataclass(frozen=True, slots=True)
class TimeRange:
    """Half-open UTC range [start, end); either side may be open. Values are naive UTC."""

    start: dt.datetime | None = None
    end: dt.datetime | None = None

    def __post_init__(self) -> None:
        for value in (self.start, self.end):
            if value is not None and value.tzinfo is not None:
                raise ValueError("TimeRange takes naive UTC datetimes")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("the end of the time range must be after its start")

    def sql(self, column: str) -> str:
        """A WHERE condition on `column` (always valid SQL, TRUE when the range is open)."""
        parts = []
        if self.start is not None:
            parts.append(f"{column} >= {_ts_literal(self.start)}")
        if self.end is not None:
            parts.append(f"{column} < {_ts_literal(self.end)}")
        return " AND ".join(parts) or "TRUE"


def _ts_literal(value: dt.datetime) -> str:
    return f"TIMESTAMP '{value.strftime('%Y-%m-%d %H:%M:%S.%f')}'"


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _has_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_log_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_LOG_SUFFIXES)


def resolve_paths(paths: Iterable[str | Path] = ()) -> list[Path]:
    """Expand directories and glob patterns into the log files to read, in name order.

    A directory means its ``transactions*.jsonl*`` files; a pattern keeps only log files (so a
    half-written ``.gz.tmp`` from the rotating writer is never read); a named file is taken as
    is. No paths means `DEFAULT_PATTERN`.
    """
    given = [str(p) for p in paths] or [DEFAULT_PATTERN]
    found: dict[Path, None] = {}
    for item in given:
        path = Path(item).expanduser()
        if _has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(str(path)))
            candidates = [m for m in matches if _is_log_file(m)]
        elif path.is_dir():
            candidates = sorted(m for m in path.glob(_DIR_PATTERN) if _is_log_file(m))
        elif path.is_file():
            candidates = [path]
        else:
            raise LogFilesNotFound(f"no such file or directory: {item}")
        for candidate in candidates:
            found.setdefault(candidate.resolve(), None)
    if not found:
        raise LogFilesNotFound(f"no transaction log files match {' '.join(given)}")
    return list(found)


# In all_payments: whether the payment's latest line is a later one than its payment line.
_LATER = "CASE WHEN o.last_ts IS NOT NULL AND (p.ts IS NULL OR o.last_ts >= p.ts)"


def _epoch_ts(expr: str) -> str:
    """Epoch seconds (DOUBLE) -> UTC TIMESTAMP with microseconds."""
    return f"make_timestamp(CAST(round({expr} * 1000000) AS BIGINT))"


def _read_json_sql(files: Sequence[Path], line_columns: dict[str, str] | None = None) -> str:
    file_list = ", ".join(_sql_string(str(f)) for f in files)
    columns = ", ".join(f"{_sql_string(name)}: {_sql_string(kind)}"
                        for name, kind in (line_columns or LINE_COLUMNS).items())
    return (
        f"read_json([{file_list}], format = 'newline_delimited', compression = 'auto', "
        f"columns = {{{columns}}}, ignore_errors = true, filename = 'file', "
        f"maximum_object_size = 16777216)"
    )


def open_log(
    paths: Iterable[str | Path] = (),
    *,
    time_range: TimeRange | None = None,
    materialize: Materialize = "none",
    columns: Iterable[str] | None = None,
    threads: int | None = None,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> tuple[duckdb.DuckDBPyConnection, list[Path]]:
    """Create the views on a (new, in-memory) DuckDB connection; returns it and the files read.

    `columns` limits the fields parsed from each line (the views need `VIEW_COLUMNS`); parsing
    fewer is faster.
    """
    import duckdb

    files = resolve_paths(paths)
    con = connection or duckdb.connect(":memory:")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    rng = time_range or TimeRange()

    wanted = set(LINE_COLUMNS) if columns is None else set(columns) | VIEW_COLUMNS
    source = _read_json_sql(files, {k: v for k, v in LINE_COLUMNS.items() if k in wanted})
    if materialize not in ("none", "lines", "all"):
        raise ValueError(f"materialize must be none, lines or all, not {materialize!r}")
    lines_kind = "VIEW" if materialize == "none" else "TEMP TABLE"
    derived_kind = "TEMP TABLE" if materialize == "all" else "VIEW"
    # Every line, unreadable ones included (all NULL but `file`), so they can be counted; one per
    # log_id (copies of a line are byte for byte the same but for `file`: the first file wins).
    # Copies are rare: a materialised table deletes them after the fact (a hash aggregate over
    # one column finds them), cheaper than a window over every line, which only a view needs.
    lines_sql = f"SELECT * REPLACE ({_epoch_ts('created_at')} AS created_at) FROM {source}"
    if materialize == "none":
        lines_sql += " QUALIFY log_id IS NULL OR row_number() OVER (PARTITION BY log_id ORDER BY file) = 1"
    con.execute(f"CREATE OR REPLACE {lines_kind} log_lines AS {lines_sql}")
    if materialize != "none":
        con.execute(
            "DELETE FROM log_lines WHERE rowid IN ("
            "  SELECT rowid FROM log_lines WHERE log_id IN ("
            "    SELECT log_id FROM log_lines WHERE log_id IS NOT NULL GROUP BY log_id HAVING count(*) > 1) "
            "  QUALIFY row_number() OVER (PARTITION BY log_id ORDER BY file, rowid) > 1)"
        )
    con.execute(
        "CREATE OR REPLACE VIEW transactions AS "
        f"SELECT * FROM log_lines WHERE event IS NOT NULL AND {rng.sql('ts')}"
    )
    # One row per attempt. The payment line holds every attempt of the authorisation; a later
    # line (capture, refund, reconciliation) repeats them and appends its own. So: all attempts
    # of the payment line, and of each later line only those past the payment line's, the first
    # later line to carry one winning. (Select-list unnest: much faster in DuckDB than a lateral
    # join; a window over the later lines only, a minority, instead of over every attempt.)
    attempt_cols = (
        "payment_id, CAST(n AS INTEGER) AS attempt_no, a.provider AS provider, a.\"try\" AS \"try\", "
        "a.operation AS operation, a.outcome AS outcome, a.raw_code AS raw_code, a.http_status AS http_status, "
        "a.latency_ms AS latency_ms, a.breaker_state AS breaker_state, a.failover_reason AS failover_reason, "
        f"{_epoch_ts('a.started_at')} AS started_at, event AS logged_in, ts AS logged_at, route"
    )
    con.execute(
        f"CREATE OR REPLACE {derived_kind} all_attempts AS "
        "WITH first_lines AS ("
        "  SELECT payment_id, event, ts, route, unnest(attempts) AS a, generate_subscripts(attempts, 1) AS n "
        "  FROM log_lines WHERE event = 'payment'), "
        "known AS (SELECT payment_id, len(attempts) AS k FROM log_lines WHERE event = 'payment'), "
        "later AS ("
        "  SELECT l.payment_id, l.event, l.ts, l.route, "
        "         unnest(l.attempts[coalesce(known.k, 0) + 1:]) AS a, "
        "         generate_subscripts(l.attempts[coalesce(known.k, 0) + 1:], 1) + coalesce(known.k, 0) AS n "
        "  FROM log_lines AS l LEFT JOIN known USING (payment_id) "
        "  WHERE l.event IS NOT NULL AND l.event <> 'payment'), "
        "later_once AS (SELECT * FROM later QUALIFY row_number() OVER (PARTITION BY payment_id, n ORDER BY ts) = 1) "
        f"SELECT {attempt_cols} FROM first_lines "
        f"UNION ALL SELECT {attempt_cols} FROM later_once"
    )
    con.execute(
        "CREATE OR REPLACE VIEW attempts AS "
        f"SELECT * FROM all_attempts WHERE {rng.sql('started_at')}"
    )
    # One row per payment. `auth_status` is the authorisation's answer (payment line, or the
    # reconciliation line that settled it); `final_status` is the latest line's status. Built as
    # the payment line (exactly one per payment, DESIGN rule 5) joined with an aggregate of the
    # payment's other lines: cheaper than aggregating every line, since most payments have one.
    con.execute(
        f"CREATE OR REPLACE {derived_kind} all_payments AS "
        "WITH p AS ("
        "  SELECT payment_id, ts, created_at, status, provider, route, failovers, retries, latency_ms, "
        "         decline_code, error_code, amount, currency, card_brand "
        "  FROM log_lines WHERE event = 'payment' AND payment_id IS NOT NULL), "
        "o AS ("
        "  SELECT payment_id, min(ts) AS first_ts, max(ts) AS last_ts, min(created_at) AS created_at, "
        "         min(ts) FILTER (WHERE event = 'reconciliation') AS reconciled_at, "
        "         arg_max(status, ts) FILTER (WHERE event = 'reconciliation') AS reconciled_status, "
        "         arg_max(status, ts) AS status, arg_max(provider, ts) AS provider, arg_min(route, ts) AS route, "
        "         arg_max(decline_code, ts) AS decline_code, arg_max(error_code, ts) AS error_code, "
        "         any_value(amount) AS amount, any_value(currency) AS currency, any_value(card_brand) AS card_brand "
        "  FROM log_lines WHERE event IS NOT NULL AND event <> 'payment' AND payment_id IS NOT NULL "
        "  GROUP BY payment_id) "
        "SELECT payment_id, "
        "coalesce(p.ts, o.first_ts) AS first_seen, "
        "coalesce(p.created_at, o.created_at) AS created_at, "
        "p.ts AS logged_at, "
        "p.status AS first_status, "
        "coalesce(o.reconciled_status, p.status) AS auth_status, "
        f"{_LATER} THEN o.status ELSE p.status END AS final_status, "
        "o.reconciled_at, "
        f"{_LATER} THEN o.provider ELSE p.provider END AS provider, "
        "coalesce(p.route, o.route) AS route, "
        "p.failovers, p.retries, p.latency_ms, "
        f"{_LATER} THEN o.decline_code ELSE p.decline_code END AS decline_code, "
        f"{_LATER} THEN o.error_code ELSE p.error_code END AS error_code, "
        "coalesce(p.amount, o.amount) AS amount, coalesce(p.currency, o.currency) AS currency, "
        "coalesce(p.card_brand, o.card_brand) AS card_brand "
        "FROM p FULL OUTER JOIN o USING (payment_id)"
    )
    con.execute(
        "CREATE OR REPLACE VIEW payments AS "
        f"SELECT * FROM all_payments WHERE {rng.sql('first_seen')}"
    )
    return con, files
