"""`gateway logs analyze` and `gateway logs query`: the transaction log, read in place by DuckDB.

Mounted in gateway/cli/__init__.py with ``app.add_typer(logs_app, name="logs")``. DuckDB is imported
when a command runs, so the rest of the CLI starts without it.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from gateway.cli.errors import fail

if TYPE_CHECKING:
    from rich.console import Console

    from gateway.analysis.report import Report
    from gateway.analysis.view import TimeRange

__all__ = ["logs_app"]

logs_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Transaction log analysis: DuckDB reads logs/transactions*.jsonl* (and rotated .jsonl.gz) in place.",
)

PathsArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="log files, directories or glob patterns [default: logs/transactions*.jsonl*]",
                   show_default=False),
]
FromOpt = Annotated[Optional[str], typer.Option("--from", help="start, ISO-8601 or HH:MM (today, UTC)")]
ToOpt = Annotated[Optional[str], typer.Option("--to", help="end (exclusive), ISO-8601 or HH:MM (today, UTC)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON document on stdout, for machines")]

_TIME_FMT = "%Y-%m-%d %H:%M:%S"
_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_WIDTH = 60




def _time_range(start: str | None, end: str | None) -> TimeRange:
    from gateway.analysis.report import parse_time
    from gateway.analysis.view import TimeRange

    try:
        return TimeRange(parse_time(start) if start else None, parse_time(end) if end else None)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def _dumps(doc: Any) -> str:
    import orjson

    from gateway.analysis.report import jsonable

    return orjson.dumps(jsonable(doc), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                        default=str).decode()


@logs_app.command()
def analyze(
    paths: PathsArg = None,
    start: FromOpt = None,
    end: ToOpt = None,
    bucket: Annotated[str, typer.Option(help="time bucket: 30s, 1m, 5m, 1h")] = "1m",
    as_json: JsonOpt = False,
    html: Annotated[Optional[Path], typer.Option("--html", metavar="FILE",
                                                 help="write a self-contained HTML report with charts")] = None,
) -> None:
    """What failed, where and when, with a headline naming the worst window.

    Approval rate over time per provider, failures by provider × outcome class × raw code,
    failovers/retries/reroutes and how many they saved, latency p50/p95/p99, breaker open periods,
    pending payments and their reconciliation, top decline codes.
    """
    import duckdb

    from gateway.analysis.report import analyze as run_analysis
    from gateway.analysis.report import parse_bucket
    from gateway.analysis.view import LogFilesNotFound

    rng = _time_range(start, end)
    try:
        bucket_s = parse_bucket(bucket)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    try:
        report = run_analysis(paths or (), time_range=rng, bucket_s=bucket_s)
    except LogFilesNotFound as exc:
        raise fail(str(exc), 2) from None
    except duckdb.Error as exc:
        raise fail(f"reading the logs failed: {exc}") from None
    if html is not None:
        from gateway.analysis.html import render_html

        try:
            html.parent.mkdir(parents=True, exist_ok=True)
            html.write_text(render_html(report), encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot write {html}: {exc.strerror or exc}") from None
    if as_json:
        typer.echo(_dumps(report.to_dict()))
        return
    if html is not None:
        typer.echo(report.headline_text)
        typer.echo(f"wrote {html}")
        return
    from rich.console import Console

    print_report(report, Console(soft_wrap=False, markup=False))


@logs_app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the views transactions, attempts, payments, log_lines")],
    paths: PathsArg = None,
    start: FromOpt = None,
    end: ToOpt = None,
    as_json: JsonOpt = False,
    max_rows: Annotated[int, typer.Option(min=1, help="rows shown in the table (--json prints all)")] = 200,
) -> None:
    """Ad-hoc SQL over the views transactions, attempts, payments and log_lines.

    Example: gateway logs query "SELECT provider, raw_code, count(*) FROM attempts
    WHERE outcome = 'unavailable' GROUP BY ALL ORDER BY 3 DESC"
    """
    import duckdb

    from gateway.analysis.view import LogFilesNotFound, open_log

    rng = _time_range(start, end)
    try:
        con, _files = open_log(paths or (), time_range=rng, materialize="lines")
    except LogFilesNotFound as exc:
        raise fail(str(exc), 2) from None
    except duckdb.Error as exc:
        raise fail(f"reading the logs failed: {exc}") from None
    try:
        cur = con.execute(sql)
        if cur.description is None:
            rows: list[tuple[Any, ...]] = []
            names: list[str] = []
        else:
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
    except duckdb.Error as exc:
        raise fail(f"query failed: {exc}") from None
    finally:
        con.close()
    if as_json:
        typer.echo(_dumps([dict(zip(names, row, strict=True)) for row in rows]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*names, header_style="bold")
    for row in rows[:max_rows]:
        table.add_row(*(_cell(v) for v in row))
    console = Console(soft_wrap=False, markup=False)  # values are printed as they are, never as markup
    console.print(table)
    more = f" (showing {max_rows})" if len(rows) > max_rows else ""
    console.print(f"{len(rows):,} rows{more}", style="dim")


# -- terminal rendering ----------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dt.datetime):
        return value.strftime(_TIME_FMT + (".%f" if value.microsecond else ""))
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _ts(value: dt.datetime | None, fmt: str = _TIME_FMT) -> str:
    return "—" if value is None else value.strftime(fmt)


def _sparkline(points: list[dict[str, Any]], first: dt.datetime, last: dt.datetime, bucket_s: int,
               max_width: int = _SPARK_WIDTH) -> str:
    """Approval rate across the whole time range, one character per (group of) bucket(s)."""
    count = int((last - first).total_seconds() // bucket_s) + 1
    per_char = max(1, -(-count // max(1, max_width)))
    width = -(-count // per_char)
    approved = [0] * width
    total = [0] * width
    for p in points:
        i = int((p["bucket"] - first).total_seconds() // bucket_s) // per_char
        if 0 <= i < width:
            approved[i] += p["approved"]
            total[i] += p["payments"]
    chars = []
    for a, n in zip(approved, total, strict=True):
        chars.append(" " if n == 0 else _SPARK[min(len(_SPARK) - 1, int(a / n * (len(_SPARK) - 1) + 0.5))])
    return "".join(chars)


def print_report(report: Report, console: Console | None = None) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = console or Console(file=sys.stdout, markup=False)
    meta, summary = report.meta, report.summary
    first_ts, last_ts = summary["first_ts"], summary["last_ts"]
    one_day = first_ts is not None and last_ts is not None and first_ts.date() == last_ts.date()
    bucket_s = meta["bucket_s"]
    widened = f" (widened from {meta['bucket_requested_s']}s)" if bucket_s != meta["bucket_requested_s"] else ""
    console.print(
        f"Transaction log: {len(meta['files'])} files, {summary['lines']:,} lines"
        f" ({summary['unreadable_lines']:,} unreadable), {_ts(first_ts)} → {_ts(last_ts)} UTC,"
        f" bucket {bucket_s}s{widened}, read in {meta.get('seconds', 0):.2f} s"
    )
    short = "%H:%M:%S" if one_day else _TIME_FMT  # the date is in the line above

    def ts(value: dt.datetime | None) -> str:
        return _ts(value, short)
    style = "bold red" if report.headline is not None else "bold green"
    console.print(Panel(report.headline_text, title="worst window", title_align="left", style=style))
    console.print(
        f"payments {summary['payments']:,}: approved {summary['approved']:,} ({_pct(summary['approval_rate'])}),"
        f" declined {summary['declined']:,}, failed {summary['failed']:,}, pending {summary['pending']:,};"
        f" captures {summary['captures']:,}, refunds {summary['refunds']:,}, voids {summary['voids']:,},"
        f" reconciliations {summary['reconciliations']:,}"
    )

    approval = report.approval
    if approval["providers"] and summary["first_ts"] is not None:
        first = min(p["bucket"] for s in approval["series"].values() for p in s)
        last = max(p["bucket"] for s in approval["series"].values() for p in s)
        table = Table(title=f"Approval rate per provider (payments sent there), {ts(first)} → {ts(last)}",
                      title_justify="left")
        spark_width = max(10, min(_SPARK_WIDTH, console.width - 66))
        for col in ("provider", "payments", "approved", "rate", "lowest", "over time"):
            table.add_column(col, justify="right" if col in ("payments", "approved", "rate") else "left",
                             no_wrap=col == "over time")
        for row in approval["providers"]:
            points = approval["series"].get(row["provider"], [])
            low = min((p for p in points if p["payments"]), key=lambda p: (p["rate"], p["bucket"]), default=None)
            low_text = f"{_pct(low['rate'])} {ts(low['bucket'])}" if low else "—"
            table.add_row(row["provider"], f"{row['payments']:,}", f"{row['approved']:,}", _pct(row["rate"]),
                          low_text, _sparkline(points, first, last, bucket_s, spark_width))
        overall = [{"bucket": p["bucket"], "approved": p["approved"], "payments": p["payments"]}
                   for p in approval["overall"]]
        table.add_row("(all)", f"{summary['payments']:,}", f"{summary['approved']:,}",
                      _pct(summary["approval_rate"]), "", _sparkline(overall, first, last, bucket_s, spark_width),
                      style="dim")
        console.print(table)

    if report.failures:
        table = Table(title="Failures by provider × class × raw code (attempts)", title_justify="left")
        for col in ("provider", "class/raw code", "attempts", "payments", "first", "last"):
            table.add_column(col, justify="right" if col in ("attempts", "payments") else "left",
                             overflow="fold", no_wrap=col != "class/raw code")
        for row in report.failures[:20]:
            table.add_row(row["provider"], f"{row['class']}/{row['raw_code'] or '—'}", f"{row['attempts']:,}",
                          f"{row['payments']:,}", ts(row["first_seen"]), ts(row["last_seen"]))
        if len(report.failures) > 20:
            table.caption = f"{len(report.failures) - 20} more rows in --json"
        console.print(table)

    fo = report.failovers
    table = Table(title="Failovers, retries, reroutes (saved: the payment ended approved)", title_justify="left")
    for col in ("", "payments", "count", "saved"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("failover to the next provider", f"{fo['payments_with_failover']:,}", f"{fo['failovers']:,}",
                  f"{fo['saved_by_failover']:,}")
    table.add_row("retry at the same provider", f"{fo['payments_with_retry']:,}", f"{fo['retries']:,}",
                  f"{fo['saved_by_retry']:,}")
    table.add_row("  of which approved by the retried try", "", "", f"{fo['approved_on_retry']:,}", style="dim")
    table.add_row("rerouted (provider skipped)", f"{fo['payments_rerouted']:,}", "",
                  f"{fo['saved_by_reroute']:,}")
    for row in fo["by_reason"][:10]:
        table.add_row(f"  {row['reason']} → {row['to_provider']}", "", f"{row['failovers']:,}",
                      f"{row['approved_there']:,}", style="dim")
    console.print(table)

    lat = report.latency
    if lat["attempts"] or lat["payments"]:
        table = Table(title="Latency (ms): provider calls, then whole payments", title_justify="left")
        for col in ("", "provider", "count", "p50", "p95", "p99", "max"):
            table.add_column(col, justify="left" if col in ("", "provider") else "right")
        for kind, rows, key in (("call", lat["attempts"], "calls"), ("payment", lat["payments"], "payments")):
            for row in rows:
                table.add_row(kind, row["provider"], f"{row[key]:,}", _ms(row["p50_ms"]), _ms(row["p95_ms"]),
                              _ms(row["p99_ms"]), _ms(row["max_ms"]))
        console.print(table)

    if report.breaker_open:
        table = Table(title="Breaker open periods (as seen by attempts)", title_justify="left")
        for col in ("provider", "first seen open", "last seen open", "refused", "trial calls", "closed again"):
            table.add_column(col, justify="right" if col in ("refused", "trial calls") else "left")
        for row in report.breaker_open[:20]:
            table.add_row(row["provider"], ts(row["first_seen"]), ts(row["last_seen"]), f"{row['refused']:,}",
                          f"{row['trial_calls']:,}", ts(row["closed_seen_at"]))
        console.print(table)

    pending = report.pending
    if pending["payments"]:
        resolved = ", ".join(f"{k} {v:,}" for k, v in sorted(pending["by_resolution"].items()))
        table = Table(title=f"Pending payments: {pending['payments']:,} ({resolved}); median resolve "
                            f"{_cell(pending['median_resolve_s'])} s, max {_cell(pending['max_resolve_s'])} s",
                      title_justify="left")
        for col in ("payment", "provider", "pending at", "resolution", "resolved at", "after s"):
            table.add_column(col)
        for row in pending["list"][:10]:
            table.add_row(row["payment_id"], row["provider"] or "—", ts(row["pending_at"]), row["resolution"],
                          ts(row["reconciled_at"]), _cell(row["resolved_after_s"]))
        console.print(table)

    if report.declines:
        table = Table(title="Top decline codes (attempts)", title_justify="left")
        for col in ("code", "class", "attempts", "payments", "by provider"):
            table.add_column(col, justify="right" if col in ("attempts", "payments") else "left")
        for row in report.declines:
            by = ", ".join(f"{k} {v:,}" for k, v in sorted(row["by_provider"].items()))
            table.add_row(row["code"] or "—", row["class"], f"{row['attempts']:,}", f"{row['payments']:,}", by)
        console.print(table)

    if report.errors:
        table = Table(title="Failed payments by error code", title_justify="left")
        table.add_column("error code")
        table.add_column("payments", justify="right")
        for row in report.errors:
            table.add_row(row["error_code"] or "—", f"{row['payments']:,}")
        console.print(table)
