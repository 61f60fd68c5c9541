"""The bench's results as people read them: a rich table, the budget's ratios, README's table.

The ratios are issue 18's goals measured in the same run, against the forwarder on the same
upstream (mTLS, as the gateway): gateway CPU per payment ÷ the forwarder's (goal ≤ 1.5×),
throughput at concurrency 64 ÷ the forwarder's (goal ≥ 0.65×), added p50 at concurrency 1
(goal ≤ 0.5 ms). They are reported, never asserted: timings live in bench/, not in tests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

BEGIN = "<!-- bench:results:begin (written by bench/run_bench.py --readme; edit the script, not this) -->"
END = "<!-- bench:results:end -->"
BASELINE = "forwarder_mtls"
GATEWAYS = ("gateway_sqlite", "gateway_pg", "gateway_sqlite_w2", "gateway_sqlite_baseline")
# `serve --workers 2` against one worker on the same journal (goal: CPU per payment within 10 %).
WORKERS = ("gateway_sqlite_w2", "gateway_sqlite")


def _point(doc: dict[str, Any], target: str, c: int) -> dict[str, Any] | None:
    for t in doc["targets"]:
        if t["name"] == target:
            return t["concurrency"].get(str(c))
    return None


def ratios(doc: dict[str, Any]) -> dict[str, Any]:
    """Each gateway against the mTLS forwarder, medians of the same run."""
    out: dict[str, Any] = {}
    for gw in GATEWAYS:
        per_c: dict[str, Any] = {}
        for c in doc["settings"]["concurrency"]:
            g, f = _point(doc, gw, c), _point(doc, BASELINE, c)
            if g is None or f is None:
                continue
            gm, fm = g["median"], f["median"]
            per_c[str(c)] = {"cpu_ratio": gm["cpu_us_per_req"] / fm["cpu_us_per_req"],
                             "throughput_ratio": gm["rps"] / fm["rps"],
                             "added_p50_ms": gm["p50_ms"] - fm["p50_ms"]}
        if per_c:
            out[gw] = per_c
    many, one = WORKERS
    per_c = {}
    for c in doc["settings"]["concurrency"]:
        w, g = _point(doc, many, c), _point(doc, one, c)
        if w is not None and g is not None:
            per_c[str(c)] = {"cpu_ratio": w["median"]["cpu_us_per_req"] / g["median"]["cpu_us_per_req"],
                             "throughput_ratio": w["median"]["rps"] / g["median"]["rps"]}
    if per_c:
        out["workers"] = per_c
    return out


def _cell(point: dict[str, Any], key: str, fmt: str) -> str:
    return f"{format(point['min'][key], fmt)} / {format(point['median'][key], fmt)}"


ROWS = (("req/s", "rps", ",.0f"), ("p50 ms", "p50_ms", ".2f"), ("p99 ms", "p99_ms", ".2f"),
        ("CPU µs/req", "cpu_us_per_req", ",.0f"), ("emulator CPU µs/req", "upstream_cpu_us_per_req", ",.0f"))


def _errors(point: dict[str, Any]) -> str:
    """Non-2xx answers and socket errors over the point's runs, by kind (wrk's counters)."""
    if not point["errors"]:
        return "0"
    kinds: dict[str, int] = {}
    for run in point["runs"]:
        for kind, n in run["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    detail = ", ".join(f"{kind.removesuffix('_errors')} {n}" for kind, n in kinds.items())
    return f"{point['errors']} ({detail})"


def print_table(doc: dict[str, Any]) -> None:
    table = Table(title="make bench: min / median over repeats (loopback, shared 2-core machine)")
    table.add_column("target")
    table.add_column("c", justify="right")
    for title, _key, _fmt in ROWS:
        table.add_column(title, justify="right")
    table.add_column("RSS MB", justify="right")
    table.add_column("errors", justify="right")
    for t in doc["targets"]:
        for c, point in t["concurrency"].items():
            table.add_row(t["label"], c, *(_cell(point, key, fmt) for _t, key, fmt in ROWS),
                          f"{point['max']['rss_mb']:.0f}", _errors(point))
        table.add_section()
    console = Console(width=None if Console().is_terminal else 170)  # a log file gets the whole table
    console.print(table)
    for gw, per_c in _against_forwarder(doc):
        console.print(f"{gw} vs {BASELINE}: " + "  ".join(
            f"c={c}: CPU {r['cpu_ratio']:.2f}×, throughput {r['throughput_ratio']:.2f}×, "
            f"p50 {r['added_p50_ms']:+.2f} ms" for c, r in per_c.items()))
    if "workers" in doc["ratios"]:
        console.print(_workers_line(doc["ratios"]["workers"]))
    for name, why in doc["skipped"].items():
        console.print(f"[yellow]skipped {name}: {why}[/yellow]")


def _against_forwarder(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(gw, per_c) for gw, per_c in doc["ratios"].items() if gw in GATEWAYS]


def _workers_line(per_c: dict[str, Any]) -> str:
    many, one = WORKERS
    return (f"{many} against {one} (medians, CPU per payment summed over the workers): "
            + "; ".join(f"c={c} CPU {r['cpu_ratio']:.2f}×, throughput {r['throughput_ratio']:.2f}×"
                        for c, r in per_c.items()) + ".")


def markdown(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    lines = [f"Run of {doc['started_at']} ({doc['seconds']:g} s): wrk, 1 thread, {s['repeat']} × {s['duration_s']:g} s "
             f"per point after a {s['warmup_s']:g} s warm-up; {m['cpus']} CPUs, load average before "
             f"{' '.join(m['loadavg_before'])}, after {' '.join(m['loadavg_after'])}. Cells are min / median.",
             "",
             "| target | c | req/s | p50 ms | p99 ms | CPU µs/req | emulator CPU µs/req | RSS MB | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in doc["targets"]:
        for c, point in t["concurrency"].items():
            lines.append(f"| {t['label']} | {c} | " + " | ".join(_cell(point, key, fmt) for _t, key, fmt in ROWS)
                         + f" | {point['max']['rss_mb']:.0f} | {_errors(point)} |")
    notes = [f"{t['label']}: {note}" for t in doc["targets"] for note in t["notes"]]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    for gw, per_c in _against_forwarder(doc):
        lines += ["", f"{gw} against the mTLS forwarder (medians): "
                  + "; ".join(f"c={c} CPU {r['cpu_ratio']:.2f}×, throughput {r['throughput_ratio']:.2f}×, "
                              f"p50 {r['added_p50_ms']:+.2f} ms" for c, r in per_c.items()) + "."]
    if "workers" in doc["ratios"]:
        lines += ["", _workers_line(doc["ratios"]["workers"])]
    for name, why in doc["skipped"].items():
        lines += ["", f"Skipped {name}: {why}"]
    return "\n".join(lines)


def replace_between_markers(path: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between `begin` and `end` in `path` (README's generated tables); refuse
    (rather than append) if the markers are missing."""
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: {path} has no markers ({begin} … {end})")
    path.write_text(pattern.sub(lambda _m: f"{begin}\n{body}\n{end}", text))


def update_readme(path: Path, doc: dict[str, Any]) -> None:
    replace_between_markers(path, BEGIN, END, markdown(doc))


if __name__ == "__main__":  # README's table again from a kept result: python bench/report.py RESULT.json README.md
    import sys

    result = orjson.loads(Path(sys.argv[1]).read_bytes())
    print_table(result)
    update_readme(Path(sys.argv[2]), result)
