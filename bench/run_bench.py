"""`make bench`: every figure side by side in one run, on loopback, load from wrk.

    python bench/run_bench.py [--quick] [--duration S] [--repeat N] [--concurrency 1,16,64,256]
                              [--targets emulator,nginx,...] [--readme README.md]

For each target (bench/targets.py) and each concurrency, wrk runs `--repeat` times for
`--duration` seconds with bench/payments.lua (a fresh Idempotency-Key per request) after a
warm-up. Each run records requests/s, p50/p99 (wrk's), the target's CPU per request (utime +
stime of its process tree from /proc over the run, divided by the requests answered), the
upstream emulator's CPU per request, and RSS. The report gives min and median over the repeats:
the min is the least-disturbed sample on a shared machine, the median the typical one.
Results go to bench/results/bench-<time>.json (and latest.json); `--readme` rewrites the table
between the bench markers in README.md. Environment equivalents: BENCH_QUICK=1,
BENCH_DURATION_S, BENCH_REPEAT, BENCH_CONCURRENCY, BENCH_TARGETS.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import cpu_seconds, rss_bytes  # noqa: E402
from bench.report import print_table, ratios, update_readme  # noqa: E402
from bench.targets import TARGETS, Stack, Target, TargetUnavailable, stack  # noqa: E402
from domain.cards import digitless_tag  # noqa: E402

HERE = Path(__file__).resolve().parent
LUA = HERE / "payments.lua"
RESULTS = HERE / "results"
WRK_GRACE_S = 30  # beyond its duration, the longest one wrk run may take before it is killed
MAX_ERROR_SHARE = 0.01  # a run answering more non-2xx than this is reported, not hidden


def wrk_run(target: Target, concurrency: int, duration_s: float) -> dict[str, Any]:
    """One wrk run; the target's and the emulator's CPU over exactly that run."""
    target.upstream.reset(target.faults)  # every run meets an emulator with an empty ledger and key store
    url = urlsplit(target.url)
    env = {**os.environ, "BENCH_PATH": url.path,
           "BENCH_BODY": target.body, "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in target.headers.items()),
           "BENCH_KEY": f"{target.name}-{digitless_tag(12)}"}
    cpu0, up0 = cpu_seconds(target.pids), cpu_seconds([target.upstream.pid])
    wall0 = time.perf_counter()
    proc = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s:g}s", "--timeout", "10s",
                           "-s", str(LUA), f"{url.scheme}://{url.netloc}"],
                          env=env, capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S)
    wall = time.perf_counter() - wall0
    cpu, up = cpu_seconds(target.pids) - cpu0, cpu_seconds([target.upstream.pid]) - up0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed on {target.name} at c={concurrency}: {proc.stderr or proc.stdout}")
    w = orjson.loads(line.removeprefix("BENCH_RESULT "))
    errors = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["status_errors"] + w["timeouts"]
    ok = max(1, w["requests"] - errors)
    kinds = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    return {"requests": w["requests"], "errors": errors, "error_kinds": {k: w[k] for k in kinds if w[k]}, "rps": w["requests"] / (w["duration_us"] / 1e6),
            "p50_ms": w["p50_us"] / 1000, "p90_ms": w["p90_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
            "cpu_us_per_req": cpu / ok * 1e6, "upstream_cpu_us_per_req": up / ok * 1e6,
            "cpu_share": cpu / wall, "rss_mb": rss_bytes(target.pids) / 2**20}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k not in ("requests", "errors", "error_kinds")]
    return {"runs": runs,
            "min": {k: min(r[k] for r in runs) for k in keys},
            "median": {k: statistics.median(r[k] for r in runs) for k in keys},
            "max": {k: max(r[k] for r in runs) for k in keys},
            "errors": sum(r["errors"] for r in runs), "requests": sum(r["requests"] for r in runs)}


def measure(s: Stack, name: str, args: argparse.Namespace) -> dict[str, Any]:
    with TARGETS[name](s) as target:
        wrk_run(target, 16, args.warmup)  # connections, caches, JIT-free but lazy imports and pools
        by_c: dict[str, Any] = {}
        for c in target.concurrency or args.concurrency:
            runs = [wrk_run(target, c, args.duration) for _ in range(args.repeat)]
            by_c[str(c)] = summarise(runs)
            m = by_c[str(c)]["median"]
            share = by_c[str(c)]["errors"] / max(1, by_c[str(c)]["requests"])
            kinds = sorted({k for r in runs for k in r["error_kinds"]})
            flag = f"  {share:.1%} errors ({', '.join(kinds)})!" if share > MAX_ERROR_SHARE else ""
            print(f"  {name:15} c={c:<4} {m['rps']:8.0f} req/s  p50 {m['p50_ms']:7.2f} ms  p99 {m['p99_ms']:7.2f} ms"
                  f"  CPU {m['cpu_us_per_req']:6.0f} µs/req{flag}", flush=True)
        return {"name": name, "label": target.label, "notes": target.notes, "concurrency": by_c}


def machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "unavailable"

    return {"cpus": os.cpu_count(), "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
            "kernel": platform.release(), "python": platform.python_version(),
            "wrk": version(["wrk", "--version"]), "nginx": version(["nginx", "-v"])}


def parse_args() -> argparse.Namespace:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=quick, help="one short run per point (about 90 s)")
    ap.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION_S", 0)) or None)
    ap.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_REPEAT", 0)) or None)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", default=os.environ.get("BENCH_CONCURRENCY", "1,16,64,256"))
    ap.add_argument("--targets", default=os.environ.get("BENCH_TARGETS", ",".join(TARGETS)))
    ap.add_argument("--readme", type=Path, help="rewrite the table between the bench markers of this file")
    args = ap.parse_args()
    args.duration = min(args.duration or (2.0 if args.quick else 5.0), 120.0)
    args.repeat = min(args.repeat or (1 if args.quick else 3), 20)
    args.warmup = 1.0 if args.quick else args.warmup
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if any(not 1 <= c <= 1024 for c in args.concurrency):
        ap.error("--concurrency: each value from 1 to 1024")
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        ap.error(f"--targets: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    return args


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (make bench installs it: apt-get install wrk)")
    started = datetime.now(UTC)
    doc: dict[str, Any] = {"started_at": started.isoformat(timespec="seconds"), "machine": machine(),
                           "settings": {"duration_s": args.duration, "repeat": args.repeat, "warmup_s": args.warmup,
                                        "concurrency": args.concurrency, "wrk_threads": 1},
                           "targets": [], "skipped": {}}
    print(f"bench: {len(args.targets)} targets × c={args.concurrency} × {args.repeat} × {args.duration:g} s",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp, stack(Path(tmp)) as s:
        for name in args.targets:
            try:
                doc["targets"].append(measure(s, name, args))
            except TargetUnavailable as exc:
                doc["skipped"][name] = str(exc)
                print(f"  {name:15} skipped: {exc}", flush=True)
    doc["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    doc["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    doc["ratios"] = ratios(doc)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (RESULTS / "latest.json").write_bytes(out.read_bytes())
    print_table(doc)
    print(f"results: {out.relative_to(HERE.parent)} ({doc['seconds']:g} s)")
    if args.readme is not None:
        update_readme(args.readme, doc)
        print(f"updated the bench table in {args.readme}")


if __name__ == "__main__":
    main()
