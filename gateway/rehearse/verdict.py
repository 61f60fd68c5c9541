"""The rehearsal's verdict: pure functions over what the run saw, so the arithmetic is tested
without running anything.

How `max_sustained_rate` is measured. The run is cut into windows: each constant-rate segment
of the profile, cut again wherever the scenario changed a fault, so one window has one offered
rate and one fault state. A window is *sustained* when, for the payments due in it:
- p99 latency (from when each was due, as the checkout waits) is at most the target,
- nothing is lost and nothing is left without an answer (each request without one is asked
  again once with its Idempotency-Key after the load, as a checkout would: `load.ask_again`),
- the gateway shed none (503 `overloaded`) and the client sent every payment due (none held
  back at its cap of requests open),
- at most `max_failed_share` of the payments that were not card declines failed.
`max_sustained_rate` is the highest offered rate R such that *every* window offering at most R
was sustained (0 when the lowest failed): a gateway that collapses at 100/s and recovers to
carry 150/s later (breakers closed again, connections warm) sustains 75/s, not 150/s.
`limited_by` is read from the limiting window (the first, in time, of the lowest-rate windows
that were not sustained): the evidence in it, in this order, names what limited it:
`journal` (a payment lost, the journal unavailable, or the transaction log backed up),
`provider_quota` (a provider's 429s: payments failed after one, its breaker opened on them and
the traffic it shed broke the others, or they came in a window with no fault, no shedding and
CPU to spare), `bulkhead` (attempts refused `bulkhead_full`),
`gateway_cpu` (the gateway's processes at >= 85 % of the cores they may use),
`gateway_in_flight` (shed at `server.max_in_flight`), `breakers` (payments failed with every
provider's breaker open), `provider_faults` (the scenario's faults were in force), else
`latency`. `none` when every window was sustained: the profile never found the limit, so
rehearse with a higher `--target-rate`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.drill.report import FINAL_OR_PENDING, percentile
from gateway.rehearse.cpu import CpuSample
from gateway.rehearse.load import Sent
from gateway.rehearse.profile import Window
from gateway.rehearse.scenario import BROWNOUT

CPU_BUSY_SHARE = 0.85
LOG_BACKED_UP = "transaction log"  # in the message of the gateway's log-backlog 503
MIN_WINDOW_PAYMENTS = 10  # fewer payments due in a window prove no rate, sustained or not
AT_QUOTA = "request quota"  # in the message of the 503 for a route whose every provider is at its quota
# error_code of a payment that failed with nothing left to try (gateway/orchestrator.py)
BREAKERS_OPEN = ("no_provider_available", "all_providers_unavailable:breaker_open")


@dataclass(frozen=True, slots=True)
class FaultMark:
    """A scenario change at `at_s`; `clears` names the fault it ends (None: it starts `label`)."""

    at_s: float
    label: str
    role_key: str  # faults of one provider replace each other (brownout, then outage)
    clears: bool = False


@dataclass(frozen=True, slots=True)
class VerdictWindow:
    start_s: float
    end_s: float
    rate: float
    label: str
    faults: tuple[str, ...]


def split_windows(windows: Sequence[Window], marks: Sequence[FaultMark]) -> list[VerdictWindow]:
    """The profile's windows cut at every fault change (see the module doc)."""
    cuts = sorted({m.at_s for m in marks})
    active: dict[str, str] = {}
    ordered = sorted(marks, key=lambda m: m.at_s)
    out: list[VerdictWindow] = []
    i = 0
    for w in windows:
        edges = [w.start_s, *(c for c in cuts if w.start_s < c < w.end_s), w.end_s]
        for a, b in zip(edges, edges[1:], strict=False):
            while i < len(ordered) and ordered[i].at_s <= a:
                m = ordered[i]
                if m.clears:
                    active.pop(m.role_key, None)
                else:
                    active[m.role_key] = m.label
                i += 1
            out.append(VerdictWindow(a, b, w.rate, w.label, tuple(active.values())))
    return out


@dataclass(slots=True)
class Evidence:
    provider_429s: Counter[str] = field(default_factory=Counter)
    bulkhead_full: Counter[str] = field(default_factory=Counter)
    failed_by_429: int = 0
    spilled_over: Counter[str] = field(default_factory=Counter)  # by what moved it: raw code of the skip or 429
    journal_unavailable: int = 0
    connect_timeouts: Counter[str] = field(default_factory=Counter)
    failed_breakers_open: int = 0  # failed with no provider to send to (every breaker open)


def _attempts(line: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [a for a in line.get("attempts") or () if isinstance(a, Mapping)]


def spilled(line: Mapping[str, Any]) -> str | None:
    """An authorisation tried at a second provider after the first was skipped or answered 429:
    the skip's raw code (`breaker_open`, `client_certificate_expired`, the gateway's own quota)
    or `http_429`; None when it did not spill over."""
    auth = [a for a in _attempts(line) if a.get("operation", "authorize") == "authorize"]
    for i, a in enumerate(auth):
        if a.get("outcome") == "skipped" or a.get("http_status") == 429:
            if any(b.get("provider") != a.get("provider") for b in auth[i + 1:]):
                return "http_429" if a.get("http_status") == 429 else str(a.get("raw_code") or "skipped")
    return None


def failed_by_429(line: Mapping[str, Any]) -> bool:
    return line.get("status") == "failed" and any(a.get("http_status") == 429 for a in _attempts(line))


def evidence(lines: Iterable[Mapping[str, Any]]) -> Evidence:
    """What the transaction log's payment lines say (one line per payment: event `payment`)."""
    ev = Evidence()
    for line in lines:
        for a in _attempts(line):
            if a.get("http_status") == 429:
                ev.provider_429s[str(a.get("provider"))] += 1
            if a.get("raw_code") == "bulkhead_full":
                ev.bulkhead_full[str(a.get("provider"))] += 1
            if a.get("raw_code") == "connect_timeout":
                ev.connect_timeouts[str(a.get("provider"))] += 1
        ev.failed_breakers_open += line.get("status") == "failed" and str(line.get("error_code") or "").startswith(
            BREAKERS_OPEN)
        ev.failed_by_429 += failed_by_429(line)
        if (reason := spilled(line)) is not None:
            ev.spilled_over[reason] += 1
        ev.journal_unavailable += line.get("error_code") == "journal_unavailable"
    return ev


@dataclass(slots=True)
class WindowStats:
    window: VerdictWindow
    sent: int = 0
    approved: int = 0
    declined: int = 0
    pending: int = 0
    failed: int = 0
    shed: int = 0
    shed_log: int = 0
    shed_quota: int = 0  # 503: every provider of the route at the gateway's quota for it
    no_answer: int = 0
    lost: int = 0
    client_cap: int = 0  # due in the window, never sent: the client had max_in_flight open
    p99_ms: float = 0.0
    # The checkout's latency split at the gateway's payment record: from when the payment was due
    # to the record's `created_at` (the harness sending, the connection, the gateway's loop
    # getting to the request), and the gateway's own `latency_ms` (journal claim to answer).
    p99_before_gateway_ms: float = 0.0
    p99_in_gateway_ms: float = 0.0
    cpu_cores: float = 0.0
    evidence: Evidence = field(default_factory=Evidence)
    sustained: bool = True
    why_not: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        w = self.window
        return {"start_s": round(w.start_s, 2), "end_s": round(w.end_s, 2), "rate": round(w.rate, 2),
                "label": w.label, "faults": list(w.faults), "sent": self.sent, "approved": self.approved,
                "declined": self.declined, "pending": self.pending, "failed": self.failed, "shed": self.shed,
                "no_answer": self.no_answer, "lost": self.lost, "client_cap": self.client_cap,
                "p99_ms": round(self.p99_ms, 1),
                "p99_before_gateway_ms": round(self.p99_before_gateway_ms, 1),
                "p99_in_gateway_ms": round(self.p99_in_gateway_ms, 1),
                "gateway_cpu_cores": round(self.cpu_cores, 2),
                "provider_429s": dict(self.evidence.provider_429s), "bulkhead_full": dict(self.evidence.bulkhead_full),
                "failed_by_429": self.evidence.failed_by_429,
                "connect_timeouts": dict(self.evidence.connect_timeouts),
                "failed_breakers_open": self.evidence.failed_breakers_open, "sustained": self.sustained,
                "why_not": self.why_not}


def is_lost(sent: Sent, by_ref: Mapping[str, Mapping[str, Any]]) -> bool:
    """As the drills count it: accepted (a payment id, or no answer) without a final or
    pending record in the journal."""
    r = sent.result
    if r.payment_id is None and r.http_status is not None:
        return False  # refused at the door
    doc = by_ref.get(r.merchant_reference)
    return doc is None or doc.get("status") not in FINAL_OR_PENDING


def _in(t: float, w: VerdictWindow) -> bool:
    return w.start_s <= t < w.end_s


def window_stats(windows: Sequence[VerdictWindow], sends: Sequence[Sent], journal: Iterable[Mapping[str, Any]],
                 lines: Sequence[Mapping[str, Any]], run_epoch: float, cpu: Sequence[CpuSample],
                 capped: Sequence[float] = (), *,
                 p99_target_ms: float, max_failed_share: float) -> list[WindowStats]:
    by_ref = {str(d.get("merchant_reference")): d for d in journal}
    due = {s.result.merchant_reference: s.due_s for s in sends}
    out = []
    for w in windows:
        st = WindowStats(w)
        mine = [s for s in sends if _in(s.due_s, w)]
        st.sent = len(mine)
        st.client_cap = sum(1 for t in capped if _in(t, w))
        latencies = []
        for s in mine:
            r = s.result
            if r.http_status is None:
                st.no_answer += 1
            else:
                latencies.append(r.latency_ms)
            if r.error == "overloaded":
                st.shed += 1
                st.shed_log += LOG_BACKED_UP in (s.message or "")
                st.shed_quota += AT_QUOTA in (s.message or "")
            if r.status == "approved":
                st.approved += 1
            elif r.status == "declined":
                st.declined += 1
            elif r.status == "pending":
                st.pending += 1
            else:
                st.failed += 1
            st.lost += is_lost(s, by_ref)
        st.p99_ms = percentile(latencies, 99) if latencies else 0.0
        mine_lines = [ln for ln in lines if _in(due.get(str(ln.get("merchant_reference")), -1.0), w)]
        st.evidence = evidence(mine_lines)
        before = [(float(ln["created_at"]) - run_epoch - due[str(ln["merchant_reference"])]) * 1000
                  for ln in mine_lines if ln.get("created_at") is not None]
        inside = [float(ln["latency_ms"]) for ln in mine_lines if ln.get("latency_ms") is not None]
        st.p99_before_gateway_ms = percentile(before, 99) if before else 0.0
        st.p99_in_gateway_ms = percentile(inside, 99) if inside else 0.0
        samples = [c.cores for c in cpu if _in(c.t_s, w)]
        st.cpu_cores = sum(samples) / len(samples) if samples else 0.0
        if st.p99_ms > p99_target_ms:
            st.why_not.append(f"p99 {st.p99_ms:.0f} ms > {p99_target_ms:g} ms")
        if st.lost or st.no_answer:
            st.why_not.append(f"{st.lost} lost, {st.no_answer} without an answer")
        if st.shed:
            st.why_not.append(f"{st.shed} shed")
        if st.client_cap:
            st.why_not.append(f"{st.client_cap} not sent (the client's requests open at its cap)")
        if st.failed > max_failed_share * max(1, st.sent - st.declined):
            st.why_not.append(f"{st.failed} failed")
        st.sustained = st.sent + st.client_cap > 0 and not st.why_not
        out.append(st)
    return out


LIMITS = ("journal", "provider_quota", "bulkhead", "gateway_cpu", "gateway_in_flight", "breakers", "provider_faults",
          "latency", "none")


def limit_of(st: WindowStats, cpu_capacity: float) -> tuple[str, str]:
    """(limit, what showed it) for one window that was not sustained (see the module doc)."""
    ev = st.evidence
    if st.lost or st.shed_log or ev.journal_unavailable:
        return "journal", (f"{st.lost} lost, {st.shed_log} shed for the log backlog, "
                           f"{ev.journal_unavailable} journal errors")
    who_429 = ", ".join(f"{p} {n}" for p, n in ev.provider_429s.most_common())
    if ev.failed_by_429:
        return "provider_quota", f"{ev.failed_by_429} payments failed after 429s ({who_429})"
    cascade = ""
    if ev.failed_breakers_open:
        timeouts = ", ".join(f"{p} {n}" for p, n in ev.connect_timeouts.most_common())
        cascade = (f"{ev.failed_breakers_open} payments failed with every breaker open"
                   + (f" (connect timeouts as traffic moved: {timeouts})" if timeouts else ""))
    if ev.provider_429s and cascade and not st.window.faults:
        return "provider_quota", f"429s ({who_429}) opened the primary's breaker; then {cascade}"
    split = (f"p99 {st.p99_ms:.0f} ms as the checkout saw it: {st.p99_before_gateway_ms:.0f} ms before the gateway "
             f"took the request, {st.p99_in_gateway_ms:.0f} ms inside it")
    if ev.provider_429s and not st.window.faults and not st.shed and st.cpu_cores < CPU_BUSY_SHARE * cpu_capacity:
        return "provider_quota", (f"the window where the quota was passed ({who_429} 429s): traffic moved to the "
                                  f"backups; {split}")
    if st.shed_quota:
        return "provider_quota", (f"{st.shed_quota} payments answered 503 with every provider of their route at "
                                  "its quota (providers.<name>.rate_limit_per_s)")
    if ev.bulkhead_full:
        who = ", ".join(f"{p} {n}" for p, n in ev.bulkhead_full.most_common())
        return "bulkhead", f"attempts refused bulkhead_full ({who})"
    if st.cpu_cores >= CPU_BUSY_SHARE * cpu_capacity:
        return "gateway_cpu", f"gateway at {st.cpu_cores:.2f} of {cpu_capacity:g} cores"
    if st.shed:
        return "gateway_in_flight", f"{st.shed} payments shed at server.max_in_flight"
    if cascade:
        return "breakers", cascade
    if st.window.faults:
        return "provider_faults", f"{'; '.join(st.window.faults)}: {split}"
    return "latency", split


@dataclass(frozen=True, slots=True)
class Verdict:
    max_sustained_rate: float
    p99_ms_at_max: float | None
    limited_by: str
    limited_by_detail: str
    limiting_window: dict[str, Any] | None


def decide(stats: Sequence[WindowStats], cpu_capacity: float, min_payments: int = MIN_WINDOW_PAYMENTS) -> Verdict:
    """See the module doc: the highest rate below which every window was sustained. A window
    with fewer than `min_payments` payments due says nothing either way (one payment answered
    in time is no "3800/s sustained"): it is left out."""
    offered = [s for s in stats if s.sent + s.client_cap >= max(1, min_payments)]
    if not offered:
        return Verdict(0.0, None, "none", f"no window had {min_payments} payments due: too few to judge a "
                       "rate (rehearse longer, or at a larger --scale or a smaller --speedup)", None)
    failing = [s for s in offered if not s.sustained]
    if not failing:
        best = max(offered, key=lambda s: (s.window.rate, -s.p99_ms), default=None)
        return Verdict(best.window.rate if best else 0.0, best.p99_ms if best else None, "none",
                       "every window was sustained: the limit is above this profile's peak", None)
    floor = min(s.window.rate for s in failing)
    limiting = next(s for s in failing if s.window.rate == floor)
    below = [s for s in offered if s.window.rate < floor]
    best = max(below, key=lambda s: (s.window.rate, -s.p99_ms), default=None)
    limit, detail = limit_of(limiting, cpu_capacity)
    return Verdict(best.window.rate if best else 0.0, best.p99_ms if best else None, limit, detail,
                   limiting.as_dict())


def route_kind(line: Mapping[str, Any]) -> str:
    """How an approved payment got there: `direct` (one provider, no skip), `rerouted` (the
    router skipped a provider it knew to be unusable, no call lost), `failed_over` (a call at
    one provider failed, then another provider approved)."""
    auth = [a for a in _attempts(line) if a.get("operation", "authorize") == "authorize"]
    final = line.get("provider")
    if any(a.get("provider") != final and a.get("outcome") != "skipped" for a in auth):
        return "failed_over"
    if any(a.get("outcome") == "skipped" for a in auth):
        return "rerouted"
    return "direct"


def failover_cost_ms(lines: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """p50 and p99 of the gateway's own latency (transaction log `latency_ms`) of approved
    payments by `route_kind`, and what a failover or a reroute added to the direct p50."""
    groups: dict[str, list[float]] = {"direct": [], "rerouted": [], "failed_over": []}
    for ln in lines:
        if ln.get("status") == "approved" and ln.get("latency_ms") is not None:
            groups[route_kind(ln)].append(float(ln["latency_ms"]))

    def q(xs: list[float], p: float) -> float | None:
        return round(percentile(xs, p), 1) if xs else None

    out: dict[str, Any] = {}
    for kind, xs in groups.items():
        out[kind] = {"payments": len(xs), "p50_ms": q(xs, 50), "p99_ms": q(xs, 99)}
    base = out["direct"]["p50_ms"]
    for kind in ("rerouted", "failed_over"):
        p50 = out[kind]["p50_ms"]
        out[kind]["added_p50_ms"] = round(p50 - base, 1) if p50 is not None and base is not None else None
    return out


def suggestions(stats: Sequence[WindowStats], config: Mapping[str, Any], *, peak_rate: float,
                quotas: Mapping[str, float], gateway_quotas: Mapping[str, Any], workers: int,
                cpu_capacity: float, p99_target_ms: float) -> list[str]:
    """Configuration changes that would raise the sustained rate, from what the windows showed."""
    out: list[str] = []
    total = Evidence()
    for s in stats:
        total.provider_429s.update(s.evidence.provider_429s)
        total.bulkhead_full.update(s.evidence.bulkhead_full)
        total.connect_timeouts.update(s.evidence.connect_timeouts)
        total.failed_by_429 += s.evidence.failed_by_429
        total.failed_breakers_open += s.evidence.failed_breakers_open
    providers = config.get("providers", {})
    for name, n in total.provider_429s.most_common():
        if name in gateway_quotas:
            continue
        quota = quotas.get(name)
        limit = f"{math.floor(quota * 0.9)}" if quota else "about 90 % of its account quota"
        out.append(f"set providers.{name}.rate_limit_per_s: {limit} (and rate_limit_burst) so the gateway spills "
                   f"over to the next provider before {name}'s 429s ({n} seen, {total.failed_by_429} payments "
                   "failed after one)")
    for name, n in total.connect_timeouts.most_common():
        current = (providers.get(name) or {}).get("connect_timeout_ms", 1000)
        out.append(f"raise providers.{name}.connect_timeout_ms from {current} ({n} connect timeouts: traffic that "
                   "moved to it at once opened many new mTLS connections together)")
    for name, n in total.bulkhead_full.most_common():
        current = (providers.get(name, {}).get("bulkhead") or {}).get("max_concurrent", 200)
        needed = max(current * 2, math.ceil(peak_rate * p99_target_ms / 1000 * 2))
        out.append(f"raise providers.{name}.bulkhead.max_concurrent from {current} to {needed} "
                   f"({n} attempts refused bulkhead_full)")
    if total.failed_breakers_open:
        out.append(f"{total.failed_breakers_open} payments failed with every breaker open: keep one provider's "
                   "failures (a quota's 429s, a brownout) from opening the others' breakers: raise "
                   "providers.<name>.breaker.fail_max on the backups, shorten breaker.reset_timeout_s")
    if any(s.cpu_cores >= CPU_BUSY_SHARE * cpu_capacity and not s.sustained for s in stats):
        out.append(f"the gateway's CPU was the limit: run `gateway serve --workers {workers + 1}` (a core each) "
                   "or add a replica behind HAProxy")
    if any(s.shed_quota for s in stats):
        out.append("every provider of a route was at its quota at the peak: ask the providers for a higher "
                   "rate limit and raise providers.<name>.rate_limit_per_s with it, or add a provider to the route")
    if any(s.shed > s.shed_log + s.shed_quota for s in stats):
        current = (config.get("server") or {}).get("max_in_flight", 1000)
        out.append(f"raise server.max_in_flight from {current} (payments were shed with the gateway at capacity)")
    if any(s.shed_log or s.lost for s in stats):
        out.append("the journal or transaction log fell behind: raise log.max_outbox_backlog, put logs and the "
                   "journal on a faster disk, or move the journal to PostgreSQL (storage.backend: postgres)")
    slow = [(f, s) for s in stats if s.p99_ms > p99_target_ms for f in s.window.faults if f.endswith(f" {BROWNOUT}")]
    if slow:
        name = slow[0][0].removesuffix(f" {BROWNOUT}")
        timeout = (providers.get(name) or {}).get("timeout_ms")
        demotes = any(r.get("demote_below") is not None for r in config.get("routes") or ())
        out.append(f"while {name} browned out p99 reached {max(s.p99_ms for _, s in slow):.0f} ms: lower "
                   f"providers.{name}.timeout_ms (now {timeout}) so its slow calls are cut and failed over sooner"
                   + ("" if demotes else ", and set routes[].demote_below so a failing primary is tried last"))
    return out
