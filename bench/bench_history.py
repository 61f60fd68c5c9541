"""Is the gateway's cost flat as history grows? The same load on an empty journal and on one
holding N settled payments and their keys, in one run.

    python bench/bench_history.py [--rows 1000000] [--db PATH] [--concurrency 16]
                                  [--duration 5] [--repeat 3] [--readme README.md]

`--db` is seeded first (bench/seed_journal.py: keys falling due over the next retention period,
so the reconciler's expiry of old records runs at its steady rate; `--expired` makes a share of
them a backlog already past it) unless it already holds at least `--rows` payments, so one
seeding serves several runs (a backlog is gone after the first). Both gateways are `gateway serve` on SQLite as `make bench`
runs it, calling the same mTLS emulator; each gets wrk's warm-up, then `--repeat` runs of
`--duration` s, and the report gives min / median of requests/s, p50, p99 and CPU per payment,
and the ratios history ÷ empty (issue 18's goal: CPU and p99 within 10 %). The seeded file
keeps the few thousand payments a run adds.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import replace_between_markers  # noqa: E402
from bench.run_bench import wrk_run  # noqa: E402
from bench.seed_journal import MAX_ROWS, seed  # noqa: E402
from bench.targets import gateway, stack  # noqa: E402

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- bench:history:begin (written by bench/bench_history.py --readme; edit the script, not this) -->"
END = "<!-- bench:history:end -->"
WARMUP_S = 3.0
KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "rss_mb")


def _payments(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM payments").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _keys(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM idempotency").fetchone()[0]
    finally:
        conn.close()


def _expired_keys(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM idempotency WHERE expires_at <= ?", (time.time(),)).fetchone()[0]
    finally:
        conn.close()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    have = _payments(args.db)
    if have < args.rows:
        if args.db.exists():
            sys.exit(f"error: {args.db} holds {have:,} payments, fewer than --rows; remove it to seed anew")
        seed(args.db, args.rows, args.expired)
    history, keys, expired = _payments(args.db), _keys(args.db), _expired_keys(args.db)
    out: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                           "history_rows": history, "history_keys": keys, "expired_at_start": expired, "db_mb": args.db.stat().st_size / 2**20,
                           "concurrency": args.concurrency, "duration_s": args.duration, "repeat": args.repeat,
                           "targets": {}}
    with tempfile.TemporaryDirectory(prefix="gw-history-") as tmp, stack(Path(tmp)) as s:
        for name, path in (("empty", None), ("history", args.db)):
            with gateway(s, postgres=False, sqlite_path=path, name=f"gateway_{name}") as target:
                wrk_run(target, args.concurrency, WARMUP_S)
                runs = [wrk_run(target, args.concurrency, args.duration) for _ in range(args.repeat)]
            out["targets"][name] = {"runs": runs,
                                    "min": {k: min(r[k] for r in runs) for k in KEYS},
                                    "median": {k: statistics.median(r[k] for r in runs) for k in KEYS},
                                    "errors": sum(r["errors"] for r in runs)}
            print(f"  {name:8} " + "  ".join(f"{k} {out['targets'][name]['median'][k]:.2f}" for k in KEYS), flush=True)
    e, h = out["targets"]["empty"]["median"], out["targets"]["history"]["median"]
    out["ratios"] = {k: h[k] / e[k] for k in KEYS if e[k]}
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Measured {doc['started_at']} by `bench/bench_history.py`: wrk c={doc['concurrency']}, "
             f"{doc['repeat']} × {doc['duration_s']:g} s per journal; the history file holds "
             f"{doc['history_rows']:,} payments and {doc['history_keys']:,} keys ({doc['db_mb']:,.0f} MB), "
             f"{doc['expired_at_start']:,} of the keys past retention at the start. Cells are min / median.", "",
             "| journal | req/s | p50 ms | p99 ms | CPU µs/payment | RSS MB | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in doc["targets"].items():
        lo, md = t["min"], t["median"]
        lines.append(f"| {name} | {lo['rps']:,.0f} / {md['rps']:,.0f} | {lo['p50_ms']:.2f} / {md['p50_ms']:.2f} | "
                     f"{lo['p99_ms']:.2f} / {md['p99_ms']:.2f} | {lo['cpu_us_per_req']:,.0f} / {md['cpu_us_per_req']:,.0f} | "
                     f"{md['rss_mb']:.0f} | {t['errors']} |")
    r = doc["ratios"]
    lines += ["", f"History ÷ empty (medians): CPU {r['cpu_us_per_req']:.2f}×, p99 {r['p99_ms']:.2f}×, "
              f"throughput {r['rps']:.2f}×, RSS {r['rss_mb']:.2f}×."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--db", type=Path, default=HERE / "results" / "history.db")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--expired", type=float, default=0.0, help="share of seeded keys already past retention")
    ap.add_argument("--readme", type=Path)
    args = ap.parse_args()
    if not 0 < args.rows <= MAX_ROWS:
        ap.error(f"--rows: 1..{MAX_ROWS}")
    args.concurrency = min(max(1, args.concurrency), 1024)
    args.duration, args.repeat = min(args.duration, 120.0), min(max(1, args.repeat), 20)
    args.db.parent.mkdir(parents=True, exist_ok=True)
    (HERE / "results").mkdir(exist_ok=True)
    started = time.monotonic()
    doc = measure(args)
    doc["seconds"] = round(time.monotonic() - started, 1)
    out = HERE / "results" / f"history-{doc['started_at'].replace(':', '')}.json"
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(markdown(doc))
    print(f"results: {out.relative_to(HERE.parent)} ({doc['seconds']:g} s)")
    if args.readme is not None:
        replace_between_markers(args.readme, BEGIN, END, markdown(doc))


if __name__ == "__main__":
    main()
