"""`gateway preflight`: the day-before-the-sale check, as a table or as JSON.

Exit codes:

* 0: nothing blocks the sale (warnings are printed; ``--strict`` makes them fail too);
* 1: at least one problem (every one is listed);
* 2: preflight could not run: bad configuration or options, or a check that crashed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from gateway.config import ConfigError, load_config

DEFAULT_CONFIG = Path("config/gateway.yaml")
EXIT_ERROR = 2


def preflight(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file")] = DEFAULT_CONFIG,
    window: Annotated[str | None, typer.Option(
        "--window", metavar="START/END",
        help="the sale, ISO 8601, e.g. 2026-11-27T00:00Z/2026-11-28T23:59Z (no zone: UTC; a bare END date: "
             "to the end of that day). Default: now to now + 1 day")] = None,
    margin_days: Annotated[float, typer.Option(
        "--margin-days", min=0, help="certificates must stay valid this long after the window ends")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="warnings fail too (exit 1)")] = False,
) -> None:
    """Before a peak sale: certificates, provider reachability over mTLS, backups per route,
    retries against the deadline, writable stores. Never sends a payment.
    Exit 0 ready, 1 a problem, 2 could not run."""
    from gateway.preflight import Window, run_preflight

    now = datetime.now(UTC)
    try:
        span = Window.parse(window) if window is not None else Window.default(now)
    except ValueError as exc:
        raise _cannot_run(f"--window: {exc}", as_json) from None
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _cannot_run(f"{config}: {exc}", as_json) from None
    report = asyncio.run(run_preflight(cfg, window=span, margin=timedelta(days=margin_days), now=now))
    if as_json:
        typer.echo(json.dumps(report.to_dict(strict=strict), indent=2))
    else:
        _print(report, strict=strict)
    raise typer.Exit(report.exit_code(strict=strict))


def _cannot_run(message: str, as_json: bool) -> typer.Exit:
    if as_json:
        typer.echo(json.dumps({"ok": False, "exit_code": EXIT_ERROR, "error": message}))
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(EXIT_ERROR)


def _print(report, *, strict: bool) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.table import Table

    # Off a terminal (CI logs, pipes) rich assumes 80 columns and folds paths letter by letter.
    console = Console(width=None if sys.stdout.isatty() else 200)
    span, code = report.window, report.exit_code(strict=strict)
    heading = (f"preflight for {span.start:%Y-%m-%d %H:%M} – {span.end:%Y-%m-%d %H:%M} UTC, certificates valid "
               f"until {report.window.end + report.margin:%Y-%m-%d %H:%M} UTC")
    checked = ", ".join(f"{what} {n}" for what, n in report.checked.items())
    if report.findings:
        table = Table(title=heading, title_justify="left")
        table.add_column("severity", no_wrap=True)
        table.add_column("check", no_wrap=True)
        table.add_column("subject", no_wrap=True)
        table.add_column("problem", overflow="fold")
        for f in report.findings:
            style = "bold red" if f.severity == "error" else "yellow"
            table.add_row(f"[{style}]{f.severity}[/]", f.id, f.subject, f.message)
        console.print(table)
    else:
        console.print(heading)
    verdict = {0: "[green]ready[/]", 1: "[bold red]NOT ready[/]", 2: "[bold red]incomplete[/]"}[code]
    console.print(f"{verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s); checked {checked}"
                  + (f"; could not run: {', '.join(report.incomplete)}" if report.incomplete else ""))
