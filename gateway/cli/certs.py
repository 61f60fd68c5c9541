"""`gateway certs …`: dev CA, expiry check, validated rotation and rollback.

Exit codes, the same for every command here:

* 0: done / every certificate is ok;
* 1: the answer is "no": `check` found a certificate that is warn, critical, expired, not yet
  valid or invalid (a missing or garbled file, an endpoint that does not verify or does not
  answer); `rotate`/`rollback` refused (nothing was changed, every reason is printed);
* 2: the command could not run: the configuration is missing or invalid, bad options, or a file
  could not be written.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from gateway.certs.check import CertReport, Thresholds, collect, worst
from gateway.certs.inspect import CertStatus
from gateway.certs.rotate import (
    PairTarget,
    RotationRefused,
    RotationResult,
    install_pair,
    provider_target,
    rollback,
    rotate,
    server_target,
)
from gateway.cli.errors import fail, load_or_exit
from gateway.config import GatewayConfig

certs_app = typer.Typer(no_args_is_help=True, help="Certificates: dev CA, checks, rotation.")

DEFAULT_CONFIG = Path("config/gateway.yaml")
DEFAULT_CERTS = Path("certs")
EXIT_OK, EXIT_PROBLEM, EXIT_ERROR = 0, 1, 2

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file")]
CertsOpt = Annotated[Path, typer.Option("--certs", help="dev certificate root")]
ServerOpt = Annotated[bool, typer.Option("--server", help="the gateway's own server certificate")]

_STATUS_STYLE = {CertStatus.OK: "green", CertStatus.WARN: "yellow", CertStatus.CRITICAL: "red",
                 CertStatus.EXPIRED: "bold red", CertStatus.NOT_YET_VALID: "bold red",
                 CertStatus.INVALID: "bold red"}


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    return fail(message, code)


def _load(path: Path) -> GatewayConfig:
    return load_or_exit(path, EXIT_ERROR)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {what} {path}: {exc.strerror}") from None


@certs_app.command("dev-init")
def dev_init(certs_dir: CertsOpt = DEFAULT_CERTS,
             force: Annotated[bool, typer.Option(help="reissue everything")] = False) -> None:
    """Create (or renew) the dev CA and every dev certificate; never for production."""
    from gateway.certs.devca import generate_dev_certs
    from providers.registry import KINDS

    layout = generate_dev_certs(certs_dir, sorted(KINDS), force=force)
    typer.echo(f"dev certificates ready under {layout.root}")


@certs_app.command("check")
def check(
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="handshake with each provider endpoint")] = True,
    thresholds: Annotated[str, typer.Option(help="days left: warn under the first, critical under the last")]
    = "30,14,7",
    timeout: Annotated[float, typer.Option(help="seconds per endpoint handshake", min=0.1)] = 3.0,
) -> None:
    """Every certificate the gateway uses, with days left. Exit 0 all ok, 1 any problem, 2 error."""
    try:
        limits = Thresholds.parse(thresholds)
    except ValueError as exc:
        raise _fail(f"--thresholds: {exc}") from None
    cfg = _load(config)
    reports = asyncio.run(collect(cfg, now=datetime.now(UTC), probe_endpoints=probe, timeout_s=timeout,
                                  thresholds=limits))
    status = worst(reports)
    if as_json:
        typer.echo(json.dumps({"status": status.value, "thresholds_days": list(limits.days),
                               "certificates": [r.to_dict() for r in reports]}, indent=2))
    else:
        _print_table(reports)
    raise typer.Exit(EXIT_OK if status is CertStatus.OK else EXIT_PROBLEM)


@certs_app.command("rotate")
def rotate_command(
    cert: Annotated[Path, typer.Option("--cert", help="new certificate (PEM; leaf first, then intermediates)")],
    key: Annotated[Path, typer.Option("--key", help="its private key (PEM, unencrypted)")],
    provider: Annotated[Optional[str], typer.Argument(help="provider whose client certificate to replace")] = None,
    ca: Annotated[Optional[Path], typer.Option("--ca", help="CA bundle the new certificate must chain to "
                                                            "(default: the one the config trusts on that side)")]
    = None,
    min_days: Annotated[float, typer.Option("--min-days", help="refuse a certificate with fewer days left")] = 7,
    server: ServerOpt = False,
    hostname: Annotated[Optional[list[str]], typer.Option("--hostname", help="--server: a name clients use "
                                                                             "(default server.host; repeatable)")]
    = None,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Validate a new pair, then swap it in atomically, keeping the old one as <file>.prev.

    The running gateway loads it on its watcher's next pass (or an admin reload): no restart.
    """
    cfg = _load(config)
    target = _target(cfg, provider, server, tuple(hostname or ()))
    cert_pem, key_pem = _read(cert, "certificate"), _read(key, "key")
    ca_pem = _read(ca, "CA bundle") if ca is not None else None
    try:
        result = rotate(target, cert_pem, key_pem, now=datetime.now(UTC), min_days=min_days, ca_pem=ca_pem,
                        ca_source=str(ca) if ca is not None else None)
    except RotationRefused as exc:
        raise _refused(exc) from None
    except OSError as exc:
        raise _fail(f"writing {target.cert}: {exc}") from None
    _report_swap("rotated", result)


@certs_app.command("rollback")
def rollback_command(
    provider: Annotated[Optional[str], typer.Argument(help="provider whose client certificate to restore")] = None,
    server: ServerOpt = False,
    config: ConfigOpt = DEFAULT_CONFIG,
) -> None:
    """Put the <file>.prev pair back (the pair it replaces becomes .prev)."""
    cfg = _load(config)
    target = _target(cfg, provider, server, ())
    try:
        result = rollback(target, now=datetime.now(UTC))
    except RotationRefused as exc:
        raise _refused(exc) from None
    except OSError as exc:
        raise _fail(f"writing {target.cert}: {exc}") from None
    _report_swap("rolled back", result)


@certs_app.command("issue-dev")
def issue_dev(
    provider: Annotated[Optional[str], typer.Option("--provider", help="issue the client certificate for it")]
    = None,
    server: ServerOpt = False,
    days: Annotated[float, typer.Option("--days", help="valid for N more days (negative: already expired)")] = 365,
    not_before_days: Annotated[float, typer.Option("--not-before-days", help="valid only from N days from now")]
    = 0,
    san: Annotated[Optional[list[str]], typer.Option("--san", help="--server: a DNS name or IP (repeatable)")]
    = None,
    certs_dir: CertsOpt = DEFAULT_CERTS,
    out_cert: Annotated[Optional[Path], typer.Option("--out-cert", help="write here instead of installing")]
    = None,
    out_key: Annotated[Optional[Path], typer.Option("--out-key")] = None,
) -> None:
    """DEV ONLY: a pair from the dev CA with a chosen expiry, to stage warnings and rotations.

    Without --out-cert/--out-key it replaces the live dev pair under --certs (the old one kept
    as .prev, so `certs rollback` restores it) without any validation: expired on purpose is fine.
    """
    from gateway.certs.devca import DevCertLayout, issue_dev_pair, write_pem_pair

    if (provider is None) == (not server):
        raise _fail("give exactly one of --provider NAME or --server")
    if (out_cert is None) != (out_key is None):
        raise _fail("--out-cert and --out-key go together")
    layout = DevCertLayout(certs_dir)
    if not layout.ca_cert().exists():
        raise _fail(f"no dev CA under {certs_dir}: run `gateway certs dev-init --certs {certs_dir}` first")
    if provider is not None:
        name, usage = f"gateway-client-{provider}", "client"
        try:
            live = (layout.client_cert(provider), layout.client_key(provider))
        except ValueError as exc:
            raise _fail(str(exc)) from None
    else:
        name, usage, live = "gateway", "server", (layout.server_cert(), layout.server_key())
    cert_pem, key_pem = issue_dev_pair(layout, usage=usage, common_name=name, days_valid=days,
                                       not_before_days=not_before_days, sans=tuple(san) if san else None)
    now = datetime.now(UTC)
    if out_cert is not None and out_key is not None:
        write_pem_pair(cert_pem, key_pem, out_cert, out_key)
        typer.echo(f"wrote {out_cert} and {out_key} ({usage}, {days:g} days)")
        return
    target = PairTarget(f"dev {usage} certificate", usage, live[0], live[1], layout.ca_cert())
    _report_swap("installed (unvalidated, dev)", install_pair(target, cert_pem, key_pem, now=now))


def _target(cfg: GatewayConfig, provider: str | None, server: bool, hostnames: tuple[str, ...]) -> PairTarget:
    if (provider is None) == (not server):
        raise _fail("give exactly one of PROVIDER or --server")
    try:
        return server_target(cfg, hostnames) if server else provider_target(cfg, provider or "")
    except RotationRefused as exc:
        raise _refused(exc) from None


def _refused(exc: RotationRefused) -> typer.Exit:
    if exc.recovered:
        _report_recovered(exc.recovered)
    changed = "nothing else was changed" if exc.recovered else "nothing was changed"
    typer.secho(f"refused: {exc.target}: {changed}", fg=typer.colors.RED, err=True)
    for reason in exc.reasons:
        typer.secho(f"  - {reason}", err=True)
    return typer.Exit(EXIT_PROBLEM)


def _report_recovered(operation: str) -> None:
    typer.secho(f"completed an interrupted {operation} first (the process doing it had stopped mid-way)",
                fg=typer.colors.YELLOW, err=True)


def _report_swap(verb: str, result: RotationResult) -> None:
    info, target = result.installed, result.target
    if result.recovered:
        _report_recovered(result.recovered)
    if result.unchanged:
        typer.echo(f"{target.label}: serial {info.serial} is already in service; nothing was changed")
        return
    previous = f"serial {result.previous_serial}" if result.previous_serial else "nothing"
    not_after = f"{info.not_after:%Y-%m-%d %H:%M} UTC" if info.not_after else "?"
    typer.echo(f"{verb} {target.label}: {previous} -> serial {info.serial} ({info.subject}, "
               f"expires {not_after}, {info.days_left:.1f} days)")
    if not result.previous_kept:
        typer.echo(f"the pair replaced did not match its key, so it was not kept: {target.prev_cert} is "
                   "unchanged and still what `rollback` restores")
    elif result.previous_serial:
        typer.echo(f"previous pair kept as {target.prev_cert} / {target.prev_key}")
    typer.echo("a running gateway loads it on its certificate watcher's next pass, without a restart")


def _print_table(reports: list[CertReport]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="certificates", title_justify="left")
    for column in ("provider", "kind", "status", "days left", "expires (UTC)"):
        table.add_column(column, no_wrap=True)
    for column in ("subject", "where", "problem"):
        table.add_column(column, overflow="fold")
    for r in reports:
        style = _STATUS_STYLE[r.status]
        table.add_row(r.provider, r.kind, f"[{style}]{r.status.value}[/]",
                      f"{r.days_left:.1f}" if r.seen else "-",
                      f"{r.not_after:%Y-%m-%d %H:%M}" if r.not_after else "-",
                      r.subject or "-", r.location, r.error or "")
    # Off a terminal (CI logs, pipes) rich assumes 80 columns and folds paths letter by letter.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
