"""`gateway webhooks-in list`: the provider notifications the journal holds, for ops.

Above all the orphans: notifications for a payment the journal does not know (another system on
the same provider account, a reference we never sent), kept so nobody loses track of money the
provider moved. (`gateway webhooks list|replay` are the merchant notifications going out.)
Exit 0 listed, 2 could not run (bad configuration, journal unreachable).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.errors import fail, load_or_exit
from gateway.config import GatewayConfig
from gateway.journal.errors import JournalUnavailable, SchemaMismatch, StoreUnavailable
from gateway.journal.webhook_events import WebhookEventRecord, WebhookState

webhooks_in_app = typer.Typer(no_args_is_help=True, help="Provider notifications in the journal (orphans first).")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file")]


@webhooks_in_app.command("list")
def list_events(config: ConfigOpt = Path("config/gateway.yaml"),
                state: Annotated[WebhookState | None, typer.Option(help="only events in this state")] = None,
                limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
                as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False) -> None:
    """Newest first: when, provider, event id and type, state, payment, what applying it did."""
    cfg = load_or_exit(config, 2)
    try:
        events = asyncio.run(_events(cfg, state, limit))
    except (JournalUnavailable, SchemaMismatch, StoreUnavailable) as exc:
        raise fail(f"journal: {exc}", 2) from None
    for event in events:
        doc = _doc(event)
        typer.echo(json.dumps(doc) if as_json else
                   f"{doc['received_at']}  {doc['provider']:<10} {doc['state']:<9} {doc['type']:<28} "
                   f"{doc['event_id']}  payment={doc['payment_id'] or doc['reference'] or '-'}  {doc['outcome'] or ''}")


async def _events(cfg: GatewayConfig, state: WebhookState | None, limit: int) -> list[WebhookEventRecord]:
    from gateway.app import make_store  # the composition root's one way to build the store

    store = make_store(cfg)
    await store.open()
    try:
        return await store.webhook_events(state, limit)
    finally:
        await store.close()


def _doc(record: WebhookEventRecord) -> dict[str, object]:
    event = record.event
    return {"received_at": datetime.fromtimestamp(record.received_at, UTC).isoformat(timespec="seconds"),
            "provider": record.provider, "event_id": event.event_id, "type": event.type, "kind": event.kind.value,
            "success": event.success, "state": record.state.value, "payment_id": record.payment_id,
            "reference": event.payment_reference or event.follow_up_reference,
            "provider_reference": event.provider_reference, "amount": event.amount, "currency": event.currency,
            "outcome": record.outcome}
