"""The live view of a rehearsal: what the last seconds looked like, refreshed twice a second.

Only on a terminal and without `--json` (the CLI decides); the numbers come from the answers the
load has had so far (`LoadState`), the gateway's CPU meter and the scenario's timeline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.table import Table

from gateway.drill.report import percentile
from gateway.rehearse.cpu import CpuMeter
from gateway.rehearse.load import LoadState
from gateway.rehearse.profile import RateProfile

RECENT_S = 2.0  # rate, approval and p99 over the answers of the last seconds


def live_table(profile: RateProfile, state: LoadState, cpu: CpuMeter, harness: CpuMeter, happened: Sequence[str],
               now: float | None = None) -> Table:
    now = time.monotonic() if now is None else now
    t = now - state.started_at if state.started_at else 0.0
    recent_from = t - RECENT_S
    recent = [s for s in state.sent[-5000:] if s.due_s + s.result.latency_ms / 1000 >= recent_from]
    answered = [s for s in recent if s.result.http_status is not None]
    approved = sum(1 for s in recent if s.result.status == "approved")
    declined = sum(1 for s in recent if s.result.status == "declined")
    sent = state.sent
    table = Table(title=f"gateway rehearse {profile.name}: {t:5.1f} / {profile.duration_s:.0f} s", show_header=False)
    table.add_column("measure")
    table.add_column("value")
    table.add_row("offered rate", f"{profile.rate_at(t):.0f}/s")
    table.add_row("answered rate", f"{len(answered) / RECENT_S:.0f}/s  (in flight {state.in_flight})")
    table.add_row("approval (non-declined)", f"{approved / max(1, len(recent) - declined):.1%}")
    table.add_row("p99 (last 2 s)", f"{percentile([s.result.latency_ms for s in answered], 99):.0f} ms"
                  if answered else "-")
    table.add_row("failovers", str(sum(s.failovers for s in sent)))
    table.add_row("shed (503 overloaded)", str(sum(1 for s in sent if s.result.error == "overloaded")))
    table.add_row("provider 429s seen", str(sum(s.provider_429s for s in sent)))
    table.add_row("client cap hit", str(state.client_cap))
    table.add_row("gateway CPU / harness CPU", f"{cpu.latest:.2f} / {harness.latest:.2f} cores")
    table.add_row("sent / answered", f"{state.scheduled} / {len(sent)}")
    table.add_row("scenario", happened[-1] if happened else "-")
    return table
