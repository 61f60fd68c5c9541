"""Time `gateway logs analyze` over N synthetic transaction-log lines (default 1 000 000).

The lines have the real shape (gateway/orchestrator.py `log_transaction`, one JSON object per
line with its cumulative attempts) and a realistic mix: approvals, hard and soft declines with
one cascade, retries after a 503, failovers, unknown outcomes settled by a status query or left
pending for a reconciliation line, captures and refunds, and a primary outage (stripe refuses
connections 20:00-20:05 UTC; its breaker opens, the router skips it, a half-open trial every
10 s fails again). The files mimic the rotating writer: rotated ``transactions-<stamp>.jsonl.gz``
plus the live ``transactions.jsonl``.

    .venv/bin/python bench/bench_analyze.py                 # 1e6 lines
    .venv/bin/python bench/bench_analyze.py --lines 200000 --keep /tmp/logs

Prints the generation time, then the analysis time and lines/s, and the headline (which must
name the outage). Bounded: at most 5e6 lines, written to a temporary directory removed at exit
unless --keep is given.
"""

from __future__ import annotations

import argparse
import calendar
import gzip
import heapq
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_LINES = 5_000_000
START = calendar.timegm((2025, 11, 28, 19, 0, 0))  # Black Friday, 19:00 UTC
OUTAGE = (calendar.timegm((2025, 11, 28, 20, 0, 0)), calendar.timegm((2025, 11, 28, 20, 5, 0)))
RATE_PER_S = 140.0  # payments per second: 1e6 lines span about two hours
BREAKER_FAIL_MAX = 5
BREAKER_RESET_S = 10.0

ROUTES = {
    "EUR": ("eu", ("stripe", "adyen")),
    "USD": ("us", ("stripe", "checkout")),
    "GBP": ("uk", ("adyen", "checkout")),
}
CURRENCIES = ("EUR", "EUR", "EUR", "USD", "USD", "GBP")
LATENCY_MS = {"stripe": 170.0, "adyen": 210.0, "checkout": 240.0}
REF_PREFIX = {"stripe": "pi_", "adyen": "psp", "checkout": "pay_"}
SUCCESS_CODE = {"stripe": "succeeded", "adyen": "Authorised", "checkout": "Authorized"}
HARD = ("insufficient_funds", "insufficient_funds", "stolen_card", "invalid_card", "fraudulent", "expired_card")
BINS = (("visa", "424242", "4242"), ("mastercard", "555555", "4444"), ("amex", "378282", "0005"))


def _ts_text(epoch: float, _cache: dict[int, str] = {}) -> str:  # noqa: B006 - per-second cache
    sec = int(epoch)
    prefix = _cache.get(sec)
    if prefix is None:
        if len(_cache) > 4096:
            _cache.clear()
        prefix = _cache[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{prefix}.{int((epoch - sec) * 1e6):06d}Z"


class _Breaker:
    """Just enough of the gateway's breaker to give the outage its real log shape."""

    def __init__(self) -> None:
        self.failures = 0
        self.opened_at: float | None = None

    def state(self, now: float) -> str:
        if self.opened_at is None:
            return "closed"
        return "open"

    def allows(self, now: float) -> bool:
        return self.opened_at is None or now - self.opened_at >= BREAKER_RESET_S

    def record(self, now: float, ok: bool) -> None:
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.opened_at is not None or self.failures >= BREAKER_FAIL_MAX:
            self.opened_at = now


class Synth:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.breakers = {name: _Breaker() for name in LATENCY_MS}
        self.counter = 0

    def latency(self, provider: str) -> float:
        return round(self.rng.lognormvariate(0, 0.35) * LATENCY_MS[provider], 3)

    def attempt(self, provider: str, try_no: int, op: str, outcome: str, raw: str, http: int | None,
                latency: float | None, state: str, reason: str | None, started: float) -> dict:
        return {"provider": provider, "try": try_no, "operation": op, "outcome": outcome, "raw_code": raw,
                "http_status": http, "latency_ms": latency, "breaker_state": state, "failover_reason": reason,
                "started_at": started}

    def payment(self, now: float) -> tuple[dict, list[tuple[float, str, dict]]]:
        """One payment line and the later lines (capture, refund, reconciliation) it schedules."""
        rng = self.rng
        self.counter += 1
        pid = f"pay_{self.counter:028x}"
        currency = rng.choice(CURRENCIES)
        route, candidates = ROUTES[currency]
        brand, card_bin, last4 = rng.choice(BINS)
        attempts: list[dict] = []
        t = now
        status, provider, outcome, decline, error, ref = "failed", None, None, None, None, None
        failovers = retries = 0
        reason: str | None = None
        cascaded = False
        r = rng.random()
        for position, name in enumerate(candidates):
            breaker = self.breakers[name]
            down = name == "stripe" and OUTAGE[0] <= t < OUTAGE[1]
            if not breaker.allows(t):
                attempts.append(self.attempt(name, 0, "authorize", "skipped", "breaker_open", None, None,
                                             "open", None, t))
                continue
            provider = name
            first = True
            result = None
            for try_no in (1, 2):
                state = breaker.state(t)
                if down:
                    lat = round(rng.uniform(0.2, 1.5), 3)
                    attempts.append(self.attempt(name, try_no, "authorize", "unavailable", "connect_failed", None,
                                                 lat, state, reason if first else None, t))
                    breaker.record(t, ok=False)
                    t += lat / 1000 + 0.01
                    first = False
                    retries += try_no > 1
                    if not breaker.allows(t):
                        break
                    continue
                lat = self.latency(name)
                if position == 0 and try_no == 1 and 0.95 <= r < 0.975:
                    attempts.append(self.attempt(name, 1, "authorize", "unavailable", "http_503", 503, lat, state,
                                                 reason, t))
                    retries += 1
                    t += lat / 1000 + 0.02
                    first = False
                    continue
                if position == 0 and 0.975 <= r < 0.98:
                    attempts.append(self.attempt(name, try_no, "authorize", "unavailable", "connect_timeout", None,
                                                 300.0, state, reason if first else None, t))
                    retries += try_no == 1
                    t += 0.31
                    first = False
                    continue
                if position == 0 and 0.98 <= r < 0.983:
                    attempts.append(self.attempt(name, try_no, "authorize", "unknown", "read_timeout", None, 1000.0,
                                                 state, reason if first else None, t))
                    t += 1.0
                    found = rng.random() < 0.5
                    attempts.append(self.attempt(name, try_no, "status", "unknown" if not found else "approved",
                                                 "read_timeout" if not found else SUCCESS_CODE[name], None,
                                                 self.latency(name), state, None, t))
                    result = ("pending", "unknown", None) if not found else ("approved", "approved", None)
                    break
                if position == 0 and 0.90 <= r < 0.93:
                    code = rng.choice(HARD)
                    attempts.append(self.attempt(name, try_no, "authorize", "hard_decline", code, 402, lat, state,
                                                 reason if first else None, t))
                    result = ("declined", "hard_decline", code)
                    t += lat / 1000
                    break
                if not cascaded and 0.93 <= r < 0.95 and position + 1 < len(candidates):
                    attempts.append(self.attempt(name, try_no, "authorize", "soft_decline", "do_not_honor", 402, lat,
                                                 state, reason if first else None, t))
                    result = ("cascade", "soft_decline", "do_not_honor")
                    t += lat / 1000
                    break
                if cascaded and rng.random() < 0.4:
                    attempts.append(self.attempt(name, try_no, "authorize", "soft_decline", "do_not_honor", 402, lat,
                                                 state, reason if first else None, t))
                    result = ("declined", "soft_decline", "do_not_honor")
                    t += lat / 1000
                    break
                attempts.append(self.attempt(name, try_no, "authorize", "approved", SUCCESS_CODE[name], 200, lat,
                                             state, reason if first else None, t))
                breaker.record(t, ok=True)
                result = ("approved", "approved", None)
                t += lat / 1000
                break
            if result is None:  # unavailable after the tries: fail over
                reason = "unavailable:connect_failed" if down else "unavailable:connect_timeout"
                failovers += position + 1 < len(candidates)
                outcome, error = "unavailable", attempts[-1]["raw_code"]
                continue
            status, outcome, decline = result
            if status == "cascade":
                cascaded = True
                reason = "soft_decline:do_not_honor"
                failovers += 1
                continue
            if status == "approved":
                ref = f"{REF_PREFIX[name]}{self.counter:016x}"
            if status == "pending":
                error = "read_timeout"
            break
        if status in ("failed", "cascade"):
            status = "failed" if status == "failed" or decline is None else "declined"
            if status == "failed":
                error = f"all_providers_unavailable:{error or 'breaker_open'}"
        line = {
            "payment_id": pid, "client": "checkout", "merchant_reference": f"order-{self.counter}",
            "amount": rng.randrange(500, 50_000), "currency": currency, "country": None, "card_brand": brand,
            "card_bin": card_bin, "card_last4": last4, "route": route, "status": status, "provider": provider,
            "provider_reference": ref, "outcome": outcome, "decline_code": decline,
            "error_code": error if status != "approved" else None, "attempts": attempts,
            "failovers": failovers, "retries": retries, "metadata": {}, "created_at": now,
            "latency_ms": round((t - now) * 1000 + 2.5, 3), "event": "payment",
        }
        later: list[tuple[float, str, dict]] = []
        if status == "approved" and provider is not None and rng.random() < 0.3:
            when = t + rng.uniform(5, 120)
            later.append((when, "capture", line))
            if rng.random() < 0.1:
                later.append((when + rng.uniform(60, 600), "refund", line))
        if status == "pending" and provider is not None:
            later.append((t + rng.uniform(5, 30), "reconciliation", line))
        return line, later

    def follow_up(self, when: float, kind: str, base: dict) -> dict:
        provider = base["provider"]
        attempts = list(base["attempts"])
        line = dict(base)
        if kind == "reconciliation":
            found = self.rng.random() < 0.6
            attempts.append(self.attempt(provider, 0, "status", "approved" if found else "unavailable",
                                         SUCCESS_CODE[provider] if found else "not_found", 200 if found else 404,
                                         self.latency(provider), "closed", None, when))
            line.update(status="approved" if found else "failed", outcome="approved" if found else "unknown",
                        error_code=None if found else "not_charged", attempts=attempts, event="reconciliation")
            line.pop("latency_ms", None)
            if found:
                line["provider_reference"] = f"{REF_PREFIX[provider]}{self.counter:016x}"
            base.update(attempts=attempts)
            return line
        if provider == "stripe" and OUTAGE[0] <= when < OUTAGE[1]:
            # Follow-ups stay with their provider: during its outage they fail (breaker open).
            attempts.append(self.attempt(provider, 1, kind, "unavailable", "breaker_open", None, 0.01, "open", None,
                                         when))
            line.update(attempts=attempts, event=kind, latency_ms=0.5,
                        follow_up={"operation": kind, "amount": None, "outcome": "unavailable",
                                   "raw_code": "breaker_open"})
            base.update(attempts=attempts)
            return line
        lat = self.latency(provider)
        attempts.append(self.attempt(provider, 1, kind, "approved", "succeeded", 200, lat, "closed", None, when))
        status = "captured" if kind == "capture" else "refunded"
        line.update(status=status, attempts=attempts, event=kind, latency_ms=round(lat + 3.0, 3),
                    follow_up={"operation": kind, "amount": None, "outcome": "approved", "raw_code": "succeeded"})
        base.update(attempts=attempts, status=status)
        return line


def synthesize(directory: Path, lines: int, *, seed: int = 7, lines_per_file: int = 250_000,
               start: float = START) -> list[Path]:
    """Write `lines` lines like the rotating writer would; returns the files, oldest first."""
    if not 0 < lines <= MAX_LINES:
        raise ValueError(f"lines must be in 1..{MAX_LINES}")
    directory.mkdir(parents=True, exist_ok=True)
    synth = Synth(seed)
    rng = random.Random(seed + 1)
    pending: list[tuple[float, int, str, dict]] = []
    seq = 0
    now = start
    written = 0
    chunk: list[bytes] = []
    files: list[Path] = []
    live = directory / "transactions.jsonl"

    def emit(line: dict, when: float) -> None:
        nonlocal written
        line = dict(line)
        line["ts"] = _ts_text(when)
        chunk.append(orjson.dumps(line))
        written += 1
        if len(chunk) >= lines_per_file:
            rotate()

    def rotate() -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{len(files):06d}"
        target = directory / f"transactions-{stamp}.jsonl.gz"
        with gzip.open(target, "wb", compresslevel=1) as gz:
            gz.write(b"\n".join(chunk) + b"\n")
        files.append(target)
        chunk.clear()

    while written < lines:
        now += rng.expovariate(RATE_PER_S)
        while pending and pending[0][0] <= now and written < lines:
            when, _, kind, base = heapq.heappop(pending)
            emit(synth.follow_up(when, kind, base), when)
        if written >= lines:
            break
        line, later = synth.payment(now)
        emit(line, now + line["latency_ms"] / 1000)
        for when, kind, base in later:
            seq += 1
            heapq.heappush(pending, (when, seq, kind, base))
    live.write_bytes(b"\n".join(chunk) + b"\n" if chunk else b"")
    files.append(live)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=float, default=1e6, help=f"lines to generate (max {MAX_LINES:.0e})")
    parser.add_argument("--bucket", default="1m")
    parser.add_argument("--keep", type=Path, help="write the logs here and keep them")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    count = int(args.lines)
    if not 0 < count <= MAX_LINES:
        parser.error(f"--lines must be in 1..{MAX_LINES}")

    from gateway.analysis.report import analyze, parse_bucket

    tmp = None
    directory = args.keep
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="bench-analyze-")
        directory = Path(tmp)
    try:
        t0 = time.perf_counter()
        files = synthesize(directory, count, seed=args.seed)
        gen_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in files)
        print(f"generated {count:,} lines in {len(files)} files ({size / 2**20:.0f} MiB on disk) in {gen_s:.1f} s")
        t0 = time.perf_counter()
        report = analyze(files, bucket_s=parse_bucket(args.bucket))
        took = time.perf_counter() - t0
        print(f"analyze: {report.summary['lines']:,} lines in {took:.2f} s = {count / took:,.0f} lines/s")
        print(f"headline: {report.headline_text}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
