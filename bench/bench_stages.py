"""What each stage of a payment costs, in µs of CPU: py-spy over the gateway under wrk load.

    python bench/bench_stages.py [--backend sqlite|postgres] [--concurrency 16] [--seconds 10]
                                 [--rate 250] [--readme README.md]

The gateway (`gateway serve`, the embedded default over mTLS to a Stripe emulator, as in
`make bench`) takes wrk's payments while py-spy samples it without pausing it (`--nonblocking`,
every thread). Each sample's stack is assigned to one stage by its deepest frame that a stage
owns (STAGES below, by module and qualified function name), so a metric increment inside the
provider client counts as metrics and a redaction inside the log line as the log line.

Where µs come from: py-spy counts only samples of a thread holding the GIL (`--gil`), that is
running Python or C called from Python, never waiting for the GIL, a lock, a queue, epoll or
the disk. A thread's CPU over the same window comes from /proc (/proc/<pid>/task/<tid>/stat),
and each stage gets the share of that CPU its samples have: µs per payment = share × the
thread's CPU ÷ the payments answered in the window. Samples are wall-clock, so on a shared
machine a thread descheduled while it holds the GIL still counts; that noise falls on every
stage alike, which is why shares (not raw sample times) carry the result. Samples whose only
frame is the loop's entry point are uvloop's own C code (sockets, TLS records, callbacks).
The other threads' CPU is listed with the stages their GIL-holding samples show; their C work
without the GIL (SQLite's statements, fsync under synchronous=FULL, file writes) has no
samples and lies in their /proc CPU; the event-loop thread's (OpenSSL's record encryption,
socket calls) is spread over its stages in proportion, a bias this method cannot remove.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import thread_cpu_seconds  # noqa: E402
from bench.report import replace_between_markers  # noqa: E402
from bench.run_bench import wrk_run  # noqa: E402
from bench.targets import gateway, stack  # noqa: E402

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- bench:stages:begin (written by bench/bench_stages.py --readme; edit the script, not this) -->"
END = "<!-- bench:stages:end -->"
WARMUP_S = 3.0
LEAD_S = 1.0  # wrk runs this long before py-spy starts and after it stops: the window is all load


@dataclass(frozen=True)
class Stage:
    name: str
    patterns: tuple[str, ...]  # regexes on "qualname (file" of a frame


# The issue's stages first, then what else a payment runs through. The deepest matching frame of
# a stack decides; within one frame, the first stage listed that matches it.
STAGES = (
    # gateway/api/ or gateway/http/: main moved the front door's input modules to gateway/http/.
    Stage("parse + validate", (r" \(gateway/(api|http)/(inputs|schemas|strict_json|free_text|currencies|auth)\.py",
                               r"^_new_payment \(gateway/api/payments\.py", r"\(domain/cards\.py")),
    Stage("idempotency claim", (r"\.claim_idempotency\b", r"\(gateway/(api|http)/idempotency\.py")),
    Stage("routing", (r"\(gateway/router\.py", r"^PaymentService\._plan ", r"\(gateway/success_window\.py")),
    Stage("provider call", (r"\(providers/transport\.py", r"^ProviderClient\._exchange ", r"\(aiohttp/client",
                            r"\(aiohttp/connector\.py", r"\(aiohttp/tracing\.py", r"(^|\.)build \(providers/")),
    # The front door is plain HTTP (as in config/gateway.yaml): every TLS record is the provider's mTLS.
    Stage("provider call: TLS records (ssl)", (r"\(ssl\.py",)),
    Stage("parse", (r"(^|\.)_?parse\w* \(providers/", r"\(providers/classify\.py")),
    Stage("final commit", (r"^PaymentService\.commit ", r"\.save_payment\b")),
    Stage("log line", (r"^PaymentService\.transaction_line ", r"\(gateway/txlog/", r"\(gateway/redaction\.py",
                       r"\(structlog/")),
    Stage("tracing", (r"\(gateway/tracing/", r"\(gateway/api/tracing\.py", r"\(opentelemetry/")),
    Stage("metrics", (r"\(gateway/metrics\.py", r"\(prometheus_client/", r"\(gateway/console/stats\.py")),
    Stage("answer", (r"\(gateway/answers\.py", r"^_write \(gateway/api/payments\.py")),
    Stage("engine (orchestrator, executor, breaker, bulkhead)", (
        r"\(gateway/(orchestrator|executor|bulkhead|breaker|retry_policy|policy|provider_client)\.py",
        r"\(pybreaker/", r"\(tenacity/")),
    # aiohttp's writer, parser and streams serve both sides: their caller (web_* or client*) decides.
    Stage("HTTP server (aiohttp)", (r"\(aiohttp/web_", r"\(gateway/(api|http)/")),
    Stage("journal transaction (group commit)", (r"^SqliteStore\._(execute|run) ", r"^PostgresStore\.", r"\(asyncpg/")),
)
# Leaves of a thread that waits: not cost.
IDLE_LEAVES = (r"^Condition\.wait ", r"^Queue\.get ", r"^_worker \(concurrent/futures/thread\.py",
               r"^SimpleQueue\.get ", r"^Event\.wait ", r"^select ", r"^sleep ")
LOOP_LEAF = r"^(run_app|run_until_complete|run_forever|_run|_serve_one) \("
_COMPILED = [(s.name, [re.compile(p) for p in s.patterns]) for s in STAGES]


def classify(frames: list[str]) -> str:
    """The stage of the deepest frame a stage owns; 'other' when none does."""
    for frame in reversed(frames):
        for name, patterns in _COMPILED:
            if any(p.search(frame) for p in patterns):
                return name
    return "other"


@dataclass
class Profile:
    by_thread: dict[str, Counter[str]]  # thread name -> stage -> samples
    tids: dict[str, set[int]]


def parse_raw(text: str) -> Profile:
    """py-spy's raw format with --threads: `thread (TID): NAME;frame;...;frame COUNT`."""
    by_thread: dict[str, Counter[str]] = {}
    tids: dict[str, set[int]] = {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        head, *frames = stack.split(";")
        m = re.match(r"thread \((\d+)\): (.*)", head)
        if m is None or not count_text.isdigit():
            continue
        tid, thread = int(m.group(1)), re.sub(r"[_:].*$", "", m.group(2))  # uvloop_0 -> uvloop
        count = int(count_text)
        tids.setdefault(thread, set()).add(tid)
        leaf = frames[-1] if frames else ""
        if any(re.search(p, leaf) for p in IDLE_LEAVES):
            stage = "idle"
        elif re.search(LOOP_LEAF, leaf):
            stage = "event loop C (uvloop: sockets, TLS, callbacks)"
        else:
            stage = classify(frames)
        by_thread.setdefault(thread, Counter())[stage] += count
    return Profile(by_thread, tids)


def profile(backend: str, concurrency: int, seconds: float, rate: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gw-stages-") as tmp, stack(Path(tmp)) as s, \
            gateway(s, postgres=backend == "postgres") as target:
        target.upstream.reset()
        wrk_run(target, concurrency, WARMUP_S)
        plain = wrk_run(target, concurrency, seconds)  # the cost without a profiler attached
        out = Path(tmp) / "profile.txt"
        result: dict[str, Any] = {}
        load = threading.Thread(target=lambda: result.update(wrk_run(target, concurrency, seconds + 2 * LEAD_S)))
        load.start()
        time.sleep(LEAD_S)  # let wrk's connections open: the window must be steady load only
        pid = target.pids[0]
        cpu0 = thread_cpu_seconds(pid)
        spy = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate",
                              str(rate), "--duration", f"{seconds:g}", "--nonblocking", "--gil", "--threads", "--format", "raw",
                              "-o", str(out)], capture_output=True, text=True, timeout=seconds + 60)
        cpu1 = thread_cpu_seconds(pid)
        load.join(seconds + 90)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {spy.stderr}")
        raw = out.read_text()
        prof = parse_raw(raw)
    payments = max(1.0, result["rps"] * seconds)
    threads: dict[str, Any] = {}
    for thread, stages in prof.by_thread.items():
        cpu_us = sum(cpu1.get(tid, 0.0) - cpu0.get(tid, 0.0) for tid in prof.tids[thread]) * 1e6 / payments
        busy = {k: n for k, n in stages.items() if k != "idle"}
        total = sum(busy.values()) or 1
        us = {stage: n / total * cpu_us for stage, n in busy.items()}
        threads[thread] = {"cpu_us_per_payment": cpu_us, "samples": sum(stages.values()),
                           "stages_us": dict(sorted(us.items(), key=lambda kv: -kv[1]))}
    process_us = sum(cpu1.get(tid, 0.0) - cpu0.get(tid, 0.0) for tid in cpu1) * 1e6 / payments
    return {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "backend": backend,
            "concurrency": concurrency, "seconds": seconds, "rate_hz": rate, "profiled_rps": result["rps"],
            "unprofiled": plain, "process_cpu_us_per_payment": process_us, "threads": threads, "raw": raw}


ISSUE_ORDER = ("parse + validate", "idempotency claim", "routing", "provider call", "provider call: TLS records (ssl)",
               "parse", "final commit", "log line", "metrics")


def markdown(doc: dict[str, Any]) -> str:
    main = doc["threads"].get("MainThread", {"stages_us": {}, "cpu_us_per_payment": 0.0})
    st = main["stages_us"]
    rest = [k for k in st if k not in ISSUE_ORDER]
    lines = [f"Measured {doc['started_at']} by `bench/bench_stages.py` ({doc['backend']}, wrk c={doc['concurrency']}, "
             f"{doc['seconds']:g} s at {doc['profiled_rps']:.0f} payments/s under py-spy; unprofiled the same load "
             f"costs {doc['unprofiled']['cpu_us_per_req']:.0f} µs of gateway CPU per payment at "
             f"{doc['unprofiled']['rps']:.0f}/s).", "",
             "| stage (event-loop thread) | µs per payment | share of the thread's CPU |", "|---|---:|---:|"]
    total = main["cpu_us_per_payment"] or 1.0
    for k in (*ISSUE_ORDER, *rest):
        if k in st:
            lines.append(f"| {k} | {st[k]:.0f} | {st[k] / total:.0%} |")
    lines.append(f"| **event-loop thread, /proc** | **{main['cpu_us_per_payment']:.0f}** | 100% |")
    for thread, t in doc["threads"].items():
        if thread == "MainThread" or t["cpu_us_per_payment"] < 1:
            continue
        busy = ", ".join(f"{k} {v:.0f}" for k, v in t["stages_us"].items() if k != "idle" and v >= 1)
        lines.append(f"| {thread} thread, /proc ({busy or 'waits only'}) | {t['cpu_us_per_payment']:.0f} | |")
    unlisted = doc["process_cpu_us_per_payment"] - sum(t["cpu_us_per_payment"] for t in doc["threads"].values())
    lines.append(f"| threads with no GIL-holding sample, /proc | {max(0.0, unlisted):.0f} | |")
    lines.append(f"| **gateway process, /proc** | **{doc['process_cpu_us_per_payment']:.0f}** | |")
    return "\n".join(lines)


def update_readme(path: Path, doc: dict[str, Any]) -> None:
    replace_between_markers(path, BEGIN, END, markdown(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--readme", type=Path)
    args = ap.parse_args()
    doc = profile(args.backend, min(args.concurrency, 1024), min(args.seconds, 120.0), min(args.rate, 1000))
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / f"stages-{doc['started_at'].replace(':', '')}.json"
    # The raw stacks beside the numbers: `flamegraph.pl` or speedscope read them as they are.
    out.with_suffix(".stacks.txt").write_text(doc.pop("raw"))
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(markdown(doc))
    print(f"results: {out.relative_to(HERE.parent)}")
    if args.readme is not None:
        update_readme(args.readme, doc)


if __name__ == "__main__":
    main()
