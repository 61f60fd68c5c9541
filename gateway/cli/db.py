"""`gateway db status|migrate`: the journal's schema version, and the one command that changes it.

Ops run `migrate` once per release, before the new replicas start (the production setting is
`storage.auto_migrate: false`, so a replica never runs DDL; deploy/compose.yaml runs it as a
one-shot service). It takes the same lock as a migrating replica, so it is safe while the fleet
serves, and it changes nothing on an up-to-date database.

Exit codes:

* 0: up to date (`status`), or migrated (`migrate`);
* 1: `status`: migrations are pending, or the database is newer than this gateway; `migrate`:
  refused (a newer database) or a step could not take its locks in time (nothing of it applied);
* 2: could not run: bad configuration, or the database cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import asyncpg
import typer

from gateway.cli.errors import fail, load_or_exit
from gateway.config import GatewayConfig
from gateway.journal.postgres import dsn_location
from gateway.journal.schema import (
    Migration,
    SchemaStatus,
    postgres_prepare,
    postgres_status,
    sqlite_prepare,
    sqlite_status,
)
from gateway.journal.errors import JournalUnavailable, SchemaMismatch

T = TypeVar("T")
db_app = typer.Typer(no_args_is_help=True, help="The journal's schema: version and migrations.")

DEFAULT_CONFIG = Path("config/gateway.yaml")
EXIT_OK, EXIT_PROBLEM, EXIT_ERROR = 0, 1, 2
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file")]


@db_app.command()
def status(config: ConfigOpt = DEFAULT_CONFIG,
           as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False) -> None:
    """The schema version and what is pending. Exit 0 up to date, 1 pending or newer, 2 error."""
    cfg = load_or_exit(config, EXIT_ERROR)
    with _one_line_errors(cfg, "read the schema", unavailable=EXIT_ERROR):
        if cfg.storage.backend == "sqlite":
            state = _sqlite_status(Path(cfg.storage.sqlite_path))
        else:
            state = asyncio.run(_on_postgres(cfg, postgres_status))
    if as_json:
        typer.echo(json.dumps({"backend": state.backend, "version": state.current, "latest": state.latest,
                               "legacy": state.legacy, "up_to_date": state.up_to_date,
                               "pending": [m.label for m in state.pending]}))
    else:
        typer.echo(f"{_where(cfg)}: {state.describe()}")
    raise typer.Exit(EXIT_OK if state.up_to_date else EXIT_PROBLEM)


@db_app.command()
def migrate(config: ConfigOpt = DEFAULT_CONFIG,
            to: Annotated[Optional[int], typer.Option("--to", min=1, help="stop at this schema version "
                                                      "(default: the latest this gateway knows)")] = None) -> None:
    """Apply the pending migrations, each printed as it is applied. Exit 0 done, 1 refused, 2 error."""
    cfg = load_or_exit(config, EXIT_ERROR)
    with _one_line_errors(cfg, "migrate", unavailable=EXIT_PROBLEM):
        if cfg.storage.backend == "sqlite":
            applied = _sqlite_migrate(Path(cfg.storage.sqlite_path), to)
        else:
            applied = asyncio.run(_on_postgres(cfg, lambda conn: postgres_prepare(conn, migrate=True, target=to)))
    for step in applied:
        typer.echo(f"applied {step.label}")
    done = f"migrated to schema version {applied[-1].version}" if applied else "already up to date"
    typer.echo(f"{_where(cfg)}: {done}")


def _where(cfg: GatewayConfig) -> str:
    storage = cfg.storage
    if storage.backend == "sqlite":
        return f"SQLite {storage.sqlite_path}"
    return f"PostgreSQL {dsn_location(storage.postgres_dsn.get_secret_value())}"


@contextmanager
def _one_line_errors(cfg: GatewayConfig, doing: str, *, unavailable: int) -> Iterator[None]:
    try:
        yield
    except SchemaMismatch as exc:
        raise fail(str(exc), EXIT_PROBLEM) from None
    except JournalUnavailable as exc:  # a step that could not take its locks in time
        raise fail(f"{_where(cfg)}: {exc}", unavailable) from None
    except (OSError, sqlite3.Error, asyncpg.PostgresError) as exc:
        raise fail(f"{_where(cfg)}: cannot {doing}: {type(exc).__name__}: {exc}", EXIT_ERROR) from None


def _sqlite_status(path: Path) -> SchemaStatus:
    if not path.exists():
        return SchemaStatus("sqlite", 0, legacy=False)  # status never creates the file
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5.0)
    try:
        return sqlite_status(conn)
    finally:
        conn.close()


def _sqlite_migrate(path: Path, target: int | None) -> list[Migration]:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        return sqlite_prepare(conn, migrate=True, target=target)
    finally:
        conn.close()


async def _on_postgres(cfg: GatewayConfig, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    pool = cfg.storage.postgres_pool
    conn = await asyncpg.connect(cfg.storage.postgres_dsn.get_secret_value(), timeout=pool.connect_timeout_s,
                                 command_timeout=pool.command_timeout_s,
                                 server_settings={"application_name": "payment-gateway-migrate"})
    try:
        return await action(conn)
    finally:
        await conn.close()
