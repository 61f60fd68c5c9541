"""`gateway rehearse`: the sale before the sale (README, "Before the sale: `gateway rehearse`").

Live progress in a rich display on a terminal (not with `--json`, not when piped); the verdict
as a table, then, as the drills do, one JSON object as the last line. Exit 1 when a payment was
charged twice, lost, or the journal disagrees with a provider's ledger; 2 when it could not run.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gateway.cli.errors import fail

DEFAULT_CONFIG = Path("config/gateway.yaml")
HTML_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 300)
HTML_POINTS = 20  # the report's charts get about this many points


def html_bucket(seconds: float) -> int:
    """A bucket that gives the run's charts about HTML_POINTS points."""
    return next((b for b in HTML_BUCKETS_S if seconds / b <= HTML_POINTS), HTML_BUCKETS_S[-1])


def rehearse(
    profile: Annotated[str, typer.Option(help="peak-sale (synthetic) or from-log (see --from-log)")] = "peak-sale",
    minutes: Annotated[float, typer.Option(min=0.05, max=60, help="peak-sale: how long the run lasts")] = 3.0,
    seconds: Annotated[Optional[float], typer.Option(min=4, max=3600, help="peak-sale: the length in seconds "
                                                     "(overrides --minutes; short runs for tests)")] = None,
    target_rate: Annotated[float, typer.Option("--target-rate", min=1, max=5000,
                                               help="peak-sale: payments/s of the hold (the spike is 1.5x)")] = 100.0,
    from_log: Annotated[Optional[list[Path]], typer.Option("--from-log", help="a transaction log (file or "
                                                           "directory): its day's rate, mix and latency")] = None,
    speedup: Annotated[float, typer.Option(min=0.1, max=10_000, help="from-log: replay this many times "
                                           "faster")] = 10.0,
    scale: Annotated[float, typer.Option(min=0.01, max=1000, help="from-log: this many times the day's "
                                         "payments")] = 1.0,
    config: Annotated[Path, typer.Option("--config", "-c", help="the production configuration")] = DEFAULT_CONFIG,
    scenario: Annotated[str, typer.Option(help="peak (faults at the peak) or none")] = "peak",
    quota_share: Annotated[float, typer.Option("--quota-share", min=0.05, max=10,
                                               help="the primary's quota as a share of the peak rate")] = 0.6,
    p99_target_ms: Annotated[float, typer.Option("--p99-target-ms", min=1, max=60_000,
                                                 help="a window is sustained with p99 at most this")] = 1000.0,
    settle_s: Annotated[float, typer.Option("--settle-s", min=0.5, max=300, help="after the load: how long "
                                            "pending payments may take to settle")] = 20.0,
    workers: Annotated[int, typer.Option(min=1, max=8, help="`gateway serve --workers N`")] = 1,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="where the run writes (default "
                                                    "logs/rehearsals/PROFILE-TIME)")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="also write `gateway logs analyze --html` of "
                                                 "the run's transaction log here")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the mix and the faults (default random)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON verdict")] = False,
) -> None:
    """Rehearse a peak sale against the emulators with the production configuration: the
    highest rate sustained, what limited it, and what to change."""
    import duckdb  # here, not at the top: `gateway serve` imports the CLI and would carry its 15 MB

    from gateway.cli import _new_loop
    from gateway.drill.process import GatewayProcessError
    from gateway.rehearse import RehearsalOptions
    from gateway.rehearse import rehearse as run

    if not config.is_file():
        raise fail(f"{config}: no such configuration file", 2)
    if from_log:
        profile = "from-log"
    try:
        options = RehearsalOptions(config=config, profile=profile, seconds=seconds or minutes * 60,
                                   target_rate=target_rate, from_log=tuple(from_log or ()), speedup=speedup,
                                   scale=scale, scenario=scenario, quota_share_of_peak=quota_share,
                                   p99_target_ms=p99_target_ms, workers=workers, settle_s=settle_s, run_dir=run_dir,
                                   seed=seed)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    show_live = not as_json and sys.stdout.isatty()

    async def main() -> dict[str, Any]:
        if not show_live:
            return await run(options)
        from rich.live import Live

        from gateway.rehearse.live import live_table
        from gateway.rehearse.runner import Progress

        with Live(refresh_per_second=2, transient=True) as live:
            async def update(p: Progress) -> None:
                assert p.cpu is not None
                live.update(live_table(p.profile, p.load, p.cpu, p.harness_cpu, p.happened))

            return await run(options, on_progress=update)

    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            report = runner.run(main())
    except (OSError, GatewayProcessError, ValueError, KeyError) as exc:
        raise fail(f"rehearse: {exc}", 2) from None
    except duckdb.Error as exc:  # --from-log: a log DuckDB cannot read (a NaN time, a huge number)
        raise fail(f"rehearse: reading the logs failed: {str(exc).splitlines()[0]}", 2) from None
    if html is not None:
        _write_html(Path(report["run_dir"]), html, html_bucket(report["load_seconds"]))
        report["html"] = str(html)
    if not as_json:
        from rich.console import Console

        from gateway.rehearse.render import verdict_table

        Console().print(verdict_table(report))
    import orjson

    typer.echo(orjson.dumps(report).decode())
    problems = report["duplicates"] + report["lost"] + report["journal_mismatches"]
    raise typer.Exit(1 if problems else 0)


def _write_html(run_dir: Path, out: Path, bucket_s: int) -> None:
    from gateway.analysis.html import render_html
    from gateway.analysis.report import analyze

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(analyze([str(run_dir)], bucket_s=bucket_s)), encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror or exc}") from None
