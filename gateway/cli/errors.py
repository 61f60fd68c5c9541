"""How every `gateway` sub-command fails: one red line on stderr and a non-zero exit code."""

from __future__ import annotations

from pathlib import Path

import typer

from gateway.config import ConfigError, GatewayConfig, load_config


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def load_or_exit(path: Path, code: int = 1) -> GatewayConfig:
    """The configuration, or exit with the field path of what is wrong."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(f"{path}: {exc}", code) from None
