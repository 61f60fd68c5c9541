"""`gateway webhooks list|replay`: the merchant notifications out, for ops.

`list` shows what the outbox holds (newest first): each event's type, payment, delivery state,
attempts and last error. `replay` sends events again (delivered or given up alike: the checkout
lost them, or its endpoint was down past the retry window): they become pending with a fresh
retry window, and the running gateways' senders deliver them on their next poll. The checkout
deduplicates by event id, so a replay of a delivered event is safe.

Exit codes: 0 done; 1 nothing matched (`--event` unknown, or nothing since `--since`); 2 could
not run (bad options or configuration, the journal unreachable).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import orjson
import typer

from gateway.cli.errors import fail, load_or_exit
from gateway.config import GatewayConfig
from gateway.journal.errors import JournalUnavailable, SchemaMismatch, StoreUnavailable
from gateway.journal.store import Store
from gateway.notifications.records import Notification

T = TypeVar("T")
webhooks_app = typer.Typer(no_args_is_help=True, help="Merchant notifications out: list and replay.")

DEFAULT_CONFIG = Path("config/gateway.yaml")
EXIT_OK, EXIT_NONE, EXIT_ERROR = 0, 1, 2
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file")]
SinceOpt = Annotated[Optional[str], typer.Option("--since", help="created at or after: ISO-8601 or HH:MM (today, "
                                                                 "UTC)")]
EventOpt = Annotated[Optional[str], typer.Option("--event", help="one event id (evt_...)")]


@webhooks_app.command("list")
def list_events(config: ConfigOpt = DEFAULT_CONFIG, since: SinceOpt = None, event: EventOpt = None,
                limit: Annotated[int, typer.Option(min=1, max=100_000, help="at most this many")] = 100,
                as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False) -> None:
    """Notifications, newest first. Exit 0, 1 when none matched, 2 on error."""
    cfg = load_or_exit(config, EXIT_ERROR)
    start = _since(since)
    rows = _on_store(cfg, lambda store: store.list_notifications(since=start, event_id=event, limit=limit))
    for row in rows:
        doc = describe(row)
        if as_json:
            typer.echo(orjson.dumps(doc).decode())
        else:
            typer.echo(f"{doc['event_id']}  {doc['type']:<17}  {doc['payment_id']}  {doc['state']:<9}  "
                       f"attempts={doc['attempts']}  created={_iso(row.created_at)}"
                       + (f"  last_error={row.last_error}" if row.last_error else ""))
    if not rows:
        if not as_json:
            typer.echo("no notifications match", err=True)
        raise typer.Exit(EXIT_NONE)


@webhooks_app.command()
def replay(config: ConfigOpt = DEFAULT_CONFIG, since: SinceOpt = None, event: EventOpt = None) -> None:
    """Deliver again: one `--event`, or every event `--since` a time. Exit 0, 1 when none matched."""
    if (since is None) == (event is None):
        raise fail("give exactly one of --event ID or --since T", EXIT_ERROR)
    cfg = load_or_exit(config, EXIT_ERROR)
    start = _since(since)
    count = _on_store(cfg, lambda store: store.replay_notifications(since=start, event_id=event))
    typer.echo(f"replayed {count} notification(s); the gateway delivers them within "
               f"{cfg.notifications.poll_interval_s:g} s")
    if not count:
        raise typer.Exit(EXIT_NONE)


def describe(row: Notification) -> dict[str, Any]:
    """A row as `list --json` prints it (never the body: the payment is in GET /v1/payments/{id})."""
    return {"event_id": row.event_id, "type": row.event_type, "payment_id": row.payment_id,
            "state": row.state.value, "attempts": row.attempts, "created_at": row.created_at,
            "next_attempt_at": row.next_attempt_at, "delivered_at": row.delivered_at,
            "last_status": row.last_status, "last_error": row.last_error}


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    from gateway.analysis.report import parse_time

    try:
        return parse_time(text).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError as exc:
        raise fail(f"--since: {exc}", EXIT_ERROR) from None


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _on_store(cfg: GatewayConfig, action: Callable[[Store], Awaitable[T]]) -> T:
    from gateway.app import make_store

    async def run() -> T:
        store = make_store(cfg)
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (JournalUnavailable, SchemaMismatch, StoreUnavailable) as exc:
        raise fail(str(exc), EXIT_ERROR) from None
