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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
