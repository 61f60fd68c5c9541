"""The verdict as a person reads it: the headline, the windows, the suggestions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


def _signed(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:+g}"


def verdict_table(report: Mapping[str, Any]) -> Group:
    head = Table(title=f"rehearsal {report['profile']}: verdict", show_header=False)
    head.add_column("measure")
    head.add_column("value", overflow="fold")
    cost = report["failover_cost"]
    rows = (
        ("max sustained rate", f"{report['max_sustained_rate']:g}/s (peak offered {report['peak_rate']:g}/s), "
                               f"p99 {report['p99_ms_at_max_sustained']} ms (target {report['p99_target_ms']:g})"),
        ("limited by", f"{report['limited_by']}: {report['limited_by_detail']}"),
        ("duplicates / lost / journal mismatches",
         f"{report['duplicates']} / {report['lost']} / {report['journal_mismatches']}"),
        ("failed by a 429 / spilled over", f"{report['failed_by_429']} / {report['spilled_over']}"),
        ("failover cost (p50 added)", f"failed over {_signed(cost['failed_over']['added_p50_ms'])} ms "
                                      f"({cost['failed_over']['payments']} payments), rerouted "
                                      f"{_signed(cost['rerouted']['added_p50_ms'])} ms "
                                      f"({cost['rerouted']['payments']})"),
        ("sent / approved / declined / pending / failed",
         f"{report['sent']} / {report['approved']} / {report['declined']} / {report['pending']} / {report['failed']}"),
        ("shed / client cap", f"{report['shed']} / {report['client_cap']}"),
        ("p50 / p99", f"{report['p50_ms']} / {report['p99_ms']} ms"),
        ("gateway CPU / harness CPU (max)",
         f"{report['gateway_cpu_max_cores']} / {report['harness_cpu_max_cores']} cores"),
        ("run dir", report["run_dir"]),
    )
    for label, value in rows:
        head.add_row(label, str(value))
    windows = Table(title="windows (constant rate, constant faults)")
    for col in ("t (s)", "rate/s", "label", "faults", "sent", "p99 ms", "before / in gw", "failed", "429s", "cpu",
                "sustained"):
        windows.add_column(col)
    for w in report["windows"]:
        windows.add_row(f"{w['start_s']:.0f}-{w['end_s']:.0f}", f"{w['rate']:g}", w["label"],
                        "; ".join(w["faults"]) or "-", str(w["sent"]), f"{w['p99_ms']:.0f}",
                        f"{w['p99_before_gateway_ms']:.0f} / {w['p99_in_gateway_ms']:.0f}", str(w["failed"]),
                        str(sum(w["provider_429s"].values())), f"{w['gateway_cpu_cores']:.2f}",
                        "[green]yes[/green]" if w["sustained"] else f"[red]no[/red] {', '.join(w['why_not'])}")
    notes = report["caveats"]
    tips = Text("\n".join(f"• {s}" for s in report["suggestions"]) or "• nothing to change for this profile")
    parts = [head, windows, Text("suggestions:", style="bold"), tips]
    if notes:
        parts += [Text("caveats:", style="bold"), Text("\n".join(f"• {n}" for n in notes))]
    return Group(*parts)
