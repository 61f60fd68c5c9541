"""The `gateway` command. Each sub-command prints one clear line and exits non-zero on error."""

from __future__ import annotations

import asyncio
import functools
import signal
import socket
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gateway.cli.logs import logs_app
from gateway.cli.certs import certs_app
from gateway.cli.db import db_app
from gateway.cli.errors import fail, load_or_exit
from gateway.config import ConfigError, GatewayConfig
from gateway.journal.errors import JournalUnavailable, SchemaMismatch
from gateway.cli.preflight import preflight
from gateway.cli.rehearse import rehearse
from gateway.cli.webhooks_in import webhooks_in_app
from gateway.cli.webhooks import webhooks_app
from gateway.workers import LISTEN_BACKLOG, WorkerSeat

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Payment-resilience gateway.")
app.add_typer(certs_app, name="certs")
app.add_typer(db_app, name="db")
app.add_typer(logs_app, name="logs")
app.add_typer(webhooks_in_app, name="webhooks-in")
app.add_typer(webhooks_app, name="webhooks")
app.command()(preflight)
app.command()(rehearse)

DEFAULT_CONFIG = Path("config/gateway.yaml")
DEFAULT_CERTS = Path("certs")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file")]




def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _server_ssl(config: GatewayConfig):  # type: ignore[no-untyped-def]
    """The gateway's own TLS context; without it there is nothing to serve, so a file that does
    not load stops the start, naming the setting and the file."""
    if config.server.tls is None:
        return None
    from gateway.app import StartupError
    from gateway.certs.tls import TlsFileError, server_context

    tls = config.server.tls
    try:
        return server_context(tls.cert, tls.key, client_ca=tls.client_ca, require_client_cert=False)
    except TlsFileError as exc:
        fields = {tls.cert: "server.tls.cert", tls.key: "server.tls.key", tls.client_ca: "server.tls.client_ca"}
        raise StartupError(f"{fields.get(exc.path, 'server.tls')} {exc}") from None


@app.command()
def serve(
    config: ConfigOpt = DEFAULT_CONFIG,
    workers: Annotated[int, typer.Option(min=1, max=64, help="processes sharing the port")] = 1,
    host: Annotated[Optional[str], typer.Option(help="override server.host (e.g. 0.0.0.0 in a container)")] = None,
    port: Annotated[Optional[int], typer.Option(help="override server.port")] = None,
) -> None:
    """Run the gateway until SIGTERM/SIGINT, then drain in-flight requests and exit."""
    cfg = load_or_exit(config)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update=overrides)})
    if workers > 1:
        _serve_workers(config, cfg, workers)
        return
    _serve_one(cfg)


def _serve_one(cfg: GatewayConfig, *, worker: WorkerSeat | None = None, sock: socket.socket | None = None,
               on_serving: Callable[[], None] | None = None) -> None:
    """One process serving until SIGTERM/SIGINT: the whole gateway, or (with `worker` and the
    supervisor's listening `sock`) one worker of `serve --workers N`."""
    from aiohttp import web

    from gateway.app import StartupError, build_app
    from gateway.txlog.writer import LogWriterStalled

    def announce(msg: str) -> None:  # aiohttp says it once the server accepts
        typer.echo(msg, err=True)
        if on_serving is not None:
            on_serving()

    try:
        ssl_ctx = _server_ssl(cfg)
        app = build_app(cfg, server_ssl_context=ssl_ctx, worker=worker)
        where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": cfg.server.host,
                                                                         "port": cfg.server.port}
        web.run_app(app, **where, ssl_context=ssl_ctx, shutdown_timeout=cfg.server.shutdown_grace_s,
                    access_log=None, loop=_new_loop(), print=announce, backlog=LISTEN_BACKLOG)
    except (JournalUnavailable, SchemaMismatch, StartupError) as exc:  # already one line that says what to do
        raise fail(str(exc)) from None
    except LogWriterStalled as exc:
        raise fail(f"stopped with the transaction log failing: {exc}; those lines stay in the journal's outbox "
                   "and are written at the next start") from None
    except OSError as exc:  # what is left once start-up succeeded: binding the listening socket
        raise fail(f"cannot serve on {cfg.server.host}:{cfg.server.port}: {exc.strerror or exc}") from None


def _serve_workers(path: Path, cfg: GatewayConfig, workers: int) -> None:
    """N worker processes behind one supervisor (see `gateway.workers`)."""
    from gateway.txlog import build_ops_logger
    from gateway.redaction import Redactor
    from gateway.workers.supervisor import Supervisor, SupervisorError

    server = cfg.server
    supervisor = Supervisor(functools.partial(_worker_main, str(path)), workers, host=server.host, port=server.port,
                            grace_s=server.shutdown_grace_s, share_breakers=cfg.breaker_sync.backend == "none",
                            log=build_ops_logger(redactor=Redactor(secrets=cfg.secret_values())))
    try:
        code = supervisor.run()
    except SupervisorError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


def _worker_main(path: str, seat: WorkerSeat, sock: socket.socket, pipe: Connection) -> None:
    """A spawned worker: the configuration read again (its secrets come from the environment),
    serving on the supervisor's socket."""
    from gateway.workers.supervisor import announce_ready, watch_supervisor

    watch_supervisor(pipe)
    try:
        _serve_one(load_or_exit(Path(path)), worker=seat, sock=sock, on_serving=lambda: announce_ready(pipe))
    except typer.Exit as exc:  # fail() printed why; the supervisor sees the status
        sys.exit(exc.exit_code)


@app.command()
def emulator(
    kind: Annotated[str, typer.Argument(help="stripe | adyen | checkout")],
    port: Annotated[Optional[int], typer.Option(help="API port (default: the kind's usual port)")] = None,
    admin_port: Annotated[Optional[int], typer.Option(help="admin port (default: port + 100)")] = None,
    certs_dir: Annotated[Path, typer.Option("--certs", help="dev certificate root")] = DEFAULT_CERTS,
    tls: Annotated[bool, typer.Option(help="serve HTTPS with the dev certificates")] = True,
    mtls: Annotated[bool, typer.Option(help="require a client certificate from the dev CA")] = True,
    rate_limit_per_s: Annotated[Optional[float], typer.Option(help="the account's quota: past it, 429")] = None,
    burst: Annotated[Optional[int], typer.Option(help="requests the quota lets through back to back")] = None,
) -> None:
    """Run one provider emulator on loopback until Ctrl-C."""
    from gateway.certs.devca import generate_dev_certs
    from emulators.quota import QuotaPlan
    from emulators.registry import EMULATORS
    from gateway.emulator_launch import start_emulator
    from pydantic import ValidationError

    if kind not in EMULATORS:
        raise fail(f"unknown provider kind {kind!r}; choose one of {', '.join(sorted(EMULATORS))}")
    api_port = port if port is not None else EMULATORS[kind].default_port
    try:
        quota = QuotaPlan(rate_limit_per_s=rate_limit_per_s, burst=burst)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise fail(f"invalid quota: {error['loc'][0]}: {error['msg']}") from None
    layout = generate_dev_certs(certs_dir, sorted(EMULATORS)) if tls else None

    async def main() -> None:
        server = await start_emulator(kind, port=api_port, admin_port=admin_port or api_port + 100, certs=layout,
                                      require_client_cert=mtls, quota=quota)
        typer.echo(f"{kind} emulator on {server.url} (admin {server.admin_url}/_emulator/ledger)", err=True)
        try:
            await _until_signal()
        finally:
            await server.stop()

    _run(main())


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    loop = _new_loop()
    try:
        loop.run_until_complete(coro)
    except OSError as exc:
        raise fail(str(exc)) from None
    finally:
        loop.close()


@app.command()
def dev(config: ConfigOpt = DEFAULT_CONFIG,
        certs_dir: Annotated[Path, typer.Option("--certs")] = DEFAULT_CERTS) -> None:
    """Local stack for `make run`: dev certificates, every configured emulator, the gateway."""
    from gateway.app import StartupError
    from gateway.devstack import run_dev_stack

    cfg = load_or_exit(config)
    try:
        _run(run_dev_stack(cfg, certs_dir))
    except (ConfigError, StartupError) as exc:
        raise fail(str(exc)) from None


@app.command()
def drill(
    name: Annotated[str, typer.Argument(help="baseline | primary-outage | brownout | flapping | "
                                             "timeout-after-processing | decline-storm | ambiguous-5xx | "
                                             "followup-unknown | rate-limited | quota-spillover | crash-restart | followup-crash | "
                                             "cert-expiry | fleet")],
    payments: Annotated[int, typer.Option(min=1, max=100_000, help="payments to send")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, max=1000, help="payments in flight at once")] = 16,
    log_dir: Annotated[Optional[Path], typer.Option("--log-dir", help="certs, journal and logs of the run "
                                                    "(default: logs/drills/NAME-TIME)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON summary line")] = False,
    max_seconds: Annotated[float, typer.Option(min=1, max=3600, help="wall-clock cap on sending; the "
                                               "rest is abandoned and reported")] = 300.0,
    kills: Annotated[int, typer.Option(min=0, max=20, help="crash-restart: SIGKILLs of the gateway process "
                                       "under load")] = 3,
    seed: Annotated[Optional[int], typer.Option(help="seed for fault plans, card mix and kill points "
                                                "(default: random, reported)")] = None,
    primary: Annotated[Optional[str], typer.Option(help="stripe | adyen | checkout: the provider that plays "
                                                   "the scenario's primary")] = None,
    replicas: Annotated[int, typer.Option(min=2, max=8, help="fleet: gateway processes behind HAProxy")] = 3,
    workers: Annotated[int, typer.Option(min=1, max=4, help="fleet: `serve --workers N` in each replica")] = 1,
) -> None:
    """Run a failure drill on loopback; the last line is a JSON summary. Exit 1 when a check
    fails (any duplicate charge or lost payment among them)."""
    from gateway.drill import (
        DRILL_NAMES,
        DrillOptions,
        DrillReport,
        render_table,
        run_named_drill,
    )
    from gateway.drill.process import GatewayProcessError

    if name not in DRILL_NAMES:
        raise fail(f"unknown drill {name!r}; choose one of {', '.join(DRILL_NAMES)}", code=2)
    if primary is not None and primary not in ("stripe", "adyen", "checkout"):
        raise fail(f"unknown provider {primary!r} for --primary; choose stripe, adyen or checkout", code=2)
    options = DrillOptions(payments=payments, concurrency=concurrency, log_dir=log_dir, max_seconds=max_seconds,
                           kills=kills, seed=seed, primary=primary, replicas=replicas, workers=workers)
    show_progress = not as_json and sys.stdout.isatty()

    async def main() -> DrillReport:
        if not show_progress:
            return await run_named_drill(name, options)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn(f"drill {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as progress:
            task = progress.add_task(name, total=payments)
            return await run_named_drill(
                name, options, on_progress=lambda done, total: progress.update(task, completed=done, total=total))

    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            report = runner.run(main())
    except (OSError, GatewayProcessError) as exc:
        raise fail(f"drill {name}: {exc}") from None
    if not as_json:
        from rich.console import Console

        Console().print(render_table(report.summary))
    import orjson

    typer.echo(orjson.dumps(report.summary).decode())
    raise typer.Exit(report.exit_code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

