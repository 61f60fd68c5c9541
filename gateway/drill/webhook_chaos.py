"""What the webhook-chaos drill measures beyond every drill's invariants: pure functions over
the journal, the emulators' ledgers and their webhook feeds.

- `wrong_final_states`: settled payments whose journal state is not the provider's: charged at
  the provider the journal names but journalled as not (declined, failed), journalled as charged
  with no charge there, or captured / refunded / voided amounts that differ. A payment or
  follow-up still pending is not judged here: it is `pending_left`.
- `pending_left`: payments still `pending` or with a follow-up pending once the drill settled:
  with Adyen, whose notifications are the only way they settle, each is a notification the
  gateway failed to apply.
- `forged_accepted`: forged deliveries (the emulator's `webhook_forge`: the outcome turned
  around and signed with a wrong key) that the gateway answered with a 2xx.
- `lookups_by_provider`: the status queries each emulator received (its request counter): the
  gateway must never ask Adyen.
- `webhook_deliveries`: delivery attempts by copy (original, duplicate, forged) and answer.
- `notifications_missing` / `notifications_repeated`: merchant notifications, as the drill's
  own receiver (`NotificationReceiver`) got them (see `notification_measures`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from emulators.server import EmulatorServer
from gateway.drill.report import FOLLOW_UP_PENDING, HOLDS_A_CHARGE, UNSETTLED, LedgerView

STILL_OPEN = UNSETTLED | FOLLOW_UP_PENDING


def final_states(journal: Iterable[Mapping[str, Any]], ledger: Mapping[str, Sequence[LedgerView]]) -> dict[str, int]:
    wrong = left = 0
    for doc in journal:
        status = doc.get("status")
        if status in STILL_OPEN:
            left += 1
            continue
        held = [e for e in ledger.get(doc["id"], ()) if e.approved and e.provider == doc.get("provider")]
        if bool(held) != (status in HOLDS_A_CHARGE):
            wrong += 1
        elif held and (doc.get("captured_amount", 0) != sum(e.captured for e in held)
                       or doc.get("refunded_amount", 0) != sum(e.refunded for e in held)
                       or (status == "voided") != any(e.voided for e in held)):
            wrong += 1
    return {"wrong_final_states": wrong, "pending_left": left}


def feed_measures(servers: Mapping[str, EmulatorServer]) -> dict[str, Any]:
    deliveries: Counter[str] = Counter()
    forged_accepted = 0
    for server in servers.values():
        for delivery in server.emulator.webhooks.deliveries():
            answer = str(delivery.status) if delivery.status is not None else (delivery.error or "none")
            deliveries[f"{delivery.copy}:{answer}"] += 1
            forged_accepted += delivery.copy == "forged" and delivery.accepted
    return {"forged_accepted": forged_accepted,
            "lookups_by_provider": {kind: server.emulator.requests.get("status", 0)
                                    for kind, server in sorted(servers.items())},
            "webhook_deliveries": dict(sorted(deliveries.items()))}


class NotificationReceiver:
    """The checkout's side in a drill: a loopback server that records every merchant
    notification (answering 200), so the drill can count what was told, and how often."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> NotificationReceiver:
        app = web.Application()
        app.router.add_post("/notifications", self._receive)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = next(addr[1] for addr in self._runner.addresses if isinstance(addr, tuple))
        self.url = f"http://127.0.0.1:{port}/notifications"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        try:
            event = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.Response(status=400)
        if isinstance(event, dict):
            self.events.append(event)
        return web.Response(text="ok")


def notification_measures(events: Sequence[Mapping[str, Any]], sends: Iterable[Any],
                          journal: Iterable[Mapping[str, Any]], follow_up_answers: Mapping[str, int]) -> dict[str, int]:
    """`notifications_missing`: late outcomes nobody was told of: a payment answered `pending`
    that is final now without a `payment.*` event, and follow-ups answered 202 beyond the
    `<op>.*` events received. `notifications_repeated`: one outcome (payment, event type) told
    under more than one event id (a receiver deduplicating by event id would act twice)."""
    final = {doc["id"]: doc.get("status") for doc in journal}
    ids_by_outcome: dict[tuple[str, str], set[str]] = {}
    for event in events:
        ids_by_outcome.setdefault((str(event.get("payment_id")), str(event.get("type"))), set()).add(str(event.get("id")))
    told = {outcome for outcome in ids_by_outcome}
    missing = sum(1 for s in sends if s.status == "pending" and s.payment_id is not None
                  and final.get(s.payment_id) in ("approved", "declined", "failed")
                  and (s.payment_id, f"payment.{final[s.payment_id]}") not in told)
    for op in ("capture", "refund", "void"):
        accepted = follow_up_answers.get(f"{op}:202", 0)
        heard = sum(1 for (_pid, kind) in told if kind.startswith(f"{op}."))
        missing += max(0, accepted - heard)
    repeated = sum(1 for ids in ids_by_outcome.values() if len(ids) > 1)
    return {"notifications_missing": missing, "notifications_repeated": repeated,
            "notifications_received": len(events)}
