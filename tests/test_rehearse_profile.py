"""The rehearsal's pure parts: the rate curve and its arrivals, the mix, a day read from a log
turned into a profile, the scenario's placement, the configuration for loopback, and the
verdict's arithmetic (windows, spill-over, what limited the rate)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.certs.devca import DevCertLayout
from gateway.config import ProviderConfig
from gateway.drill.report import SendResult
from gateway.rehearse.config_gen import gateway_quotas, rehearsal_config, secret_env
from gateway.rehearse.from_log import (
    LatencyQuantiles,
    choose_bucket,
    day_segments,
    latency_rules,
    mix_weights,
    peak_fraction,
)
from gateway.rehearse.load import Sent
from gateway.rehearse.profile import Mix, PaymentKind, RateProfile, Segment, peak_sale, scaled
from gateway.rehearse.scenario import Brownout, CertificateExpires, Outage, Recover, peak_scenario
from gateway.rehearse.verdict import (
    FaultMark,
    VerdictWindow,
    WindowStats,
    decide,
    evidence,
    failed_by_429,
    limit_of,
    route_kind,
    spilled,
    split_windows,
    suggestions,
    window_stats,
)

ROOT = Path(__file__).resolve().parents[1]
segments = st.lists(st.builds(Segment, duration_s=st.floats(0.5, 30), rate=st.floats(0, 200), label=st.just("s")),
                    min_size=1, max_size=8)


# -- the rate curve ----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(segments)
def test_arrivals_follow_the_integral_of_the_rate(segs: list[Segment]) -> None:
    profile = RateProfile("p", tuple(segs), peak=(0, 1))
    times = profile.arrivals()
    assert abs(len(times) - profile.expected_payments) <= 0.5 + 1e-6, "the integral, rounded"
    assert times == sorted(times) and all(0 <= t < profile.duration_s for t in times)
    for w in profile.windows():  # each window holds its rate x duration payments, within one
        inside = sum(1 for t in times if w.start_s <= t < w.end_s)
        assert abs(inside - w.rate * (w.end_s - w.start_s)) <= 1
        mid = (w.start_s + w.end_s) / 2
        assert profile.rate_at(mid) == w.rate


@given(st.floats(1, 400), st.floats(4, 1200))
def test_peak_sale_ramps_holds_and_spikes_at_its_peak(rate: float, seconds: float) -> None:
    profile = peak_sale(rate, seconds)
    assert profile.duration_s == pytest.approx(seconds)
    rates = [s.rate for s in profile.segments]
    assert rates[:4] == sorted(rates[:4]) and rates[3] == rate, "a staircase up to the target"
    assert profile.peak_rate == pytest.approx(1.5 * rate)
    spike = next(w for w in profile.windows() if w.rate == profile.peak_rate)
    assert (spike.start_s / seconds, spike.end_s / seconds) == pytest.approx(profile.peak)


def test_a_profile_is_bounded_in_time_and_count() -> None:
    with pytest.raises(ValueError, match="more than 3600"):
        RateProfile("long", (Segment(4000, 1, "x"),), peak=(0, 1))
    with pytest.raises(ValueError, match="payments"):
        RateProfile("many", (Segment(3000, 1000, "x"),), peak=(0, 1))


@given(segments, st.floats(0.5, 50), st.floats(0.1, 5))
def test_scaling_a_day_keeps_its_shape(segs: list[Segment], speedup: float, scale: float) -> None:
    out = scaled(segs, speedup=speedup, scale=scale)
    assert sum(s.duration_s for s in out) == pytest.approx(sum(s.duration_s for s in segs) / speedup)
    assert sum(s.rate * s.duration_s for s in out) == pytest.approx(sum(s.rate * s.duration_s for s in segs) * scale)


def test_the_mix_draws_its_shares_and_repeats_with_its_seed() -> None:
    visa, mc = PaymentKind("EUR", "DE", "visa", False), PaymentKind("USD", "US", "mastercard", True)
    mix = Mix({visa: 3, mc: 1}, seed=7)
    draws = mix.draws(20_000)
    assert Counter(draws)[mc] / len(draws) == pytest.approx(0.25, abs=0.02)
    assert Mix({visa: 3, mc: 1}, seed=7).draws(100) == draws[:100]
    with pytest.raises(ValueError):
        Mix({visa: 0}, seed=1)


# -- a day from a log --------------------------------------------------------------------------

def test_a_day_becomes_one_segment_per_bucket() -> None:
    assert choose_bucket(10) == 1 and choose_bucket(86_400) == 3600 and choose_bucket(600) == 30
    segs = day_segments([60, 0, 120], 60)
    assert [s.rate for s in segs] == [1.0, 0.0, 2.0] and all(s.duration_s == 60 for s in segs)
    assert peak_fraction([1, 5, 2, 2]) == (0.25, 0.5)
    weights = mix_weights([("EUR", "DE", "visa", "approved")] * 3 + [("USD", None, None, "declined")])
    assert weights == {PaymentKind("EUR", "DE", "visa", False): 0.75, PaymentKind("USD", None, "visa", True): 0.25}


def test_a_providers_latency_replays_as_a_body_and_a_tail() -> None:
    body, tail = latency_rules(LatencyQuantiles(p10_ms=20, p90_ms=80, p99_ms=400, calls=1000))
    assert (body.latency_ms, body.jitter_ms, body.share) == (20, 60, 1.0)
    assert (tail.latency_ms, tail.share) == (320, 0.01)
    assert len(latency_rules(LatencyQuantiles(5, 5, 5, 3))) == 1


# -- the scenario and the configuration ---------------------------------------------------------

def test_the_faults_gather_at_the_peak() -> None:
    scenario = peak_scenario((0.75, 0.85))
    kinds = [(e.at, type(e.action)) for e in scenario.events]
    assert kinds == [(pytest.approx(0.55), Brownout), (pytest.approx(0.68), Outage), (0.75, CertificateExpires),
                     (0.85, Recover)]
    assert scenario.quota is not None and scenario.quota.rate(150) == 90 and scenario.quota.role == "primary"
    assert peak_scenario((0.0, 0.1)).events[0].at == 0.0, "clamped to the run"


def _shipped() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())


def test_the_production_config_keeps_its_engine_and_loses_everything_real(tmp_path: Path) -> None:
    prod = _shipped()
    prod["notifications"] = {"url": "https://checkout.example/notify", "secret_env": ["X"]}
    urls = {name: f"https://127.0.0.1:{19300 + i}" for i, name in enumerate(prod["providers"])}
    data = rehearsal_config(prod, run_dir=tmp_path, port=19399, certs=DevCertLayout(tmp_path / "certs"),
                            emulator_urls=urls)
    assert data["engine"] == prod["engine"] and data["routes"] == prod["routes"]
    for name, p in data["providers"].items():
        original = prod["providers"][name]
        assert p["base_url"] == urls[name]
        assert {k: p[k] for k in ("breaker", "retry", "timeout_ms")} == {k: original[k] for k in
                                                                         ("breaker", "retry", "timeout_ms")}
        assert p.get("bulkhead") == original.get("bulkhead")
        assert Path(p["tls"]["client_cert"]).is_relative_to(tmp_path)
    assert data["storage"]["sqlite_path"] == str(tmp_path / "gateway.db") and data["log"]["dir"] == str(tmp_path)
    assert data["server"]["host"] == "127.0.0.1" and data["server"]["port"] == 19399
    assert "notifications" not in data and data["observability"]["tracing"]["enabled"] is False
    env, key = secret_env(data)
    named = {c["key_env"] for c in data["auth"]["clients"]} | {p["api_key_env"] for p in data["providers"].values()}
    named |= {v for p in data["providers"].values() for v in p.get("webhook_key_envs", ())}
    assert named == env.keys() and key == env["GATEWAY_KEY_CHECKOUT"]


def test_the_gateway_quota_is_set_where_production_sets_none(tmp_path: Path) -> None:
    data = {"providers": {"stripe": {"kind": "stripe"}, "adyen": {"kind": "adyen", "rate_limit_per_s": 40.0}}}
    applied = gateway_quotas(data, {"stripe": (54.0, 27), "adyen": (54.0, 27)})
    assert (data["providers"]["stripe"]["rate_limit_per_s"], data["providers"]["stripe"]["rate_limit_burst"]) == (54, 27)
    assert applied["stripe"]["from"] == "rehearsal"
    assert data["providers"]["adyen"]["rate_limit_per_s"] == 40.0 and applied["adyen"]["from"] == "config"
    ProviderConfig.model_validate({**data["providers"]["stripe"], "base_url": "https://127.0.0.1:1",
                                   "api_key_env": "STRIPE_API_KEY"})  # the fields the config knows


# -- the verdict's arithmetic ------------------------------------------------------------------

def _line(*attempts: tuple[str, str, int | None, str | None], status: str = "approved") -> dict[str, Any]:
    return {"status": status, "provider": attempts[-1][0], "latency_ms": 10.0,
            "attempts": [{"provider": p, "outcome": o, "http_status": h, "raw_code": c, "operation": "authorize"}
                         for p, o, h, c in attempts]}


def test_spill_over_failures_by_429_and_how_a_payment_was_routed() -> None:
    quota_429 = _line(("stripe", "unavailable", 429, "rate_limit"), ("adyen", "approved", 200, "Authorised"))
    skipped = _line(("stripe", "skipped", None, "breaker_open"), ("adyen", "approved", 200, "Authorised"))
    retried = _line(("stripe", "unavailable", 429, "rate_limit"), ("stripe", "approved", 200, "succeeded"))
    failed = _line(("stripe", "unavailable", 429, "rate_limit"), ("adyen", "unavailable", 503, "x"), status="failed")
    assert [spilled(x) for x in (quota_429, skipped, retried)] == ["http_429", "breaker_open", None]
    assert [failed_by_429(x) for x in (quota_429, failed)] == [False, True]
    assert [route_kind(x) for x in (quota_429, skipped, retried)] == ["failed_over", "rerouted", "direct"]
    ev = evidence([quota_429, skipped, retried, failed])
    assert ev.provider_429s == {"stripe": 3} and ev.failed_by_429 == 1
    assert ev.spilled_over == {"http_429": 2, "breaker_open": 1}


def test_windows_are_cut_where_a_fault_starts_or_ends() -> None:
    profile = RateProfile("p", (Segment(10, 10, "a"), Segment(10, 20, "b")), peak=(0.5, 1))
    marks = [FaultMark(5, "stripe brownout", "stripe"), FaultMark(12, "stripe down", "stripe"),
             FaultMark(15, "stripe back", "stripe", clears=True)]
    got = [(w.start_s, w.end_s, w.rate, w.faults) for w in split_windows(profile.windows(), marks)]
    assert got == [(0, 5, 10, ()), (5, 10, 10, ("stripe brownout",)), (10, 12, 20, ("stripe brownout",)),
                   (12, 15, 20, ("stripe down",)), (15, 20, 20, ())]


def _sent(i: int, due: float, latency: float, status: str | None = "approved", error: str | None = None) -> Sent:
    ref = f"r-{i}"
    return Sent(SendResult(i, ref, latency, http_status=201 if status else 503, payment_id=f"p{i}" if status else None,
                           status=status, error=error), due)


def test_the_highest_sustained_window_and_what_stopped_the_next() -> None:
    windows = [VerdictWindow(0, 1, 10, "low", ()), VerdictWindow(1, 2, 20, "mid", ()),
               VerdictWindow(2, 3, 30, "high", ())]
    sends = [_sent(0, 0.5, 50), _sent(1, 1.5, 80), _sent(2, 2.5, 2000), _sent(3, 2.6, 40, None, "overloaded")]
    journal = [{"merchant_reference": f"r-{i}", "status": "approved"} for i in range(3)]
    stats = window_stats(windows, sends, journal, [], 0.0, [], p99_target_ms=1000, max_failed_share=0.01)
    assert [s.sustained for s in stats] == [True, True, False]
    assert stats[2].shed == 1 and stats[2].lost == 0
    verdict = decide(stats, cpu_capacity=1, min_payments=1)
    assert (verdict.max_sustained_rate, verdict.limited_by) == (20, "gateway_in_flight")
    assert decide(stats[:2], 1, min_payments=1).limited_by == "none"
    mid_failed = window_stats(windows, [_sent(0, 0.5, 50), _sent(1, 1.5, 3000), _sent(2, 2.5, 40)], journal, [], 0.0,
                              [], p99_target_ms=1000, max_failed_share=0.01)
    late = decide(mid_failed, cpu_capacity=1, min_payments=1)
    assert (late.max_sustained_rate, late.limited_by) == (10, "latency"), "a later, faster window does not count"
    assert late.limited_by_detail.startswith("p99 3000 ms as the checkout saw it")


def test_the_evidence_is_read_in_order_of_what_to_fix_first() -> None:
    w = VerdictWindow(0, 1, 50, "hold", ("stripe brownout",))
    st_ = WindowStats(w, sent=50, sustained=False, why_not=["p99"])
    assert limit_of(st_, 1)[0] == "provider_faults"
    st_.evidence.provider_429s["stripe"] = 5
    assert limit_of(st_, 1)[0] == "provider_faults", "429s under a fault are the fault's"
    assert limit_of(WindowStats(VerdictWindow(0, 1, 50, "hold", ()), evidence=st_.evidence), 1)[0] == "provider_quota"
    st_.cpu_cores = 0.9
    assert limit_of(st_, 1)[0] == "gateway_cpu"
    st_.evidence.bulkhead_full["adyen"] = 3
    assert limit_of(st_, 1)[0] == "bulkhead"
    st_.evidence.failed_by_429 = 2
    assert limit_of(st_, 1)[0] == "provider_quota"
    st_.lost = 1
    assert limit_of(st_, 1)[0] == "journal"


def test_payments_refused_with_every_provider_at_its_quota_are_the_quota() -> None:
    st_ = WindowStats(VerdictWindow(0, 1, 100, "spike", ()), sent=100, sustained=False, shed=12, shed_quota=12)
    limit, detail = limit_of(st_, 1)
    assert limit == "provider_quota" and "12 payments answered 503" in detail


def test_a_quota_that_opens_one_breaker_and_then_the_others_is_the_quota() -> None:
    breakers = _line(("stripe", "skipped", None, "breaker_open"), ("adyen", "skipped", None, "breaker_open"),
                     status="failed") | {"error_code": "no_provider_available"}
    timeout = _line(("adyen", "unavailable", None, "connect_timeout"), ("checkout", "approved", 200, "x"))
    st_ = WindowStats(VerdictWindow(0, 1, 100, "ramp", ()), sent=100, sustained=False)
    st_.evidence = evidence([breakers, timeout])
    limit, detail = limit_of(st_, 1)
    assert (limit, "connect timeouts as traffic moved: adyen 1" in detail) == ("breakers", True)
    st_.evidence.provider_429s["stripe"] = 4
    assert limit_of(st_, 1)[0] == "provider_quota"
    tips = suggestions([st_], {"providers": {"adyen": {"connect_timeout_ms": 500}}}, peak_rate=100, quotas={},
                       gateway_quotas={}, workers=1, cpu_capacity=1, p99_target_ms=1000)
    assert any("providers.adyen.connect_timeout_ms from 500" in t for t in tips)


def test_suggestions_name_the_setting_to_change() -> None:
    w = VerdictWindow(0, 1, 50, "hold", ())
    st_ = WindowStats(w, sent=50, sustained=False)
    st_.evidence.provider_429s["stripe"] = 7
    st_.evidence.bulkhead_full["adyen"] = 2
    config = {"providers": {"stripe": {}, "adyen": {"bulkhead": {"max_concurrent": 20}}}}
    tips = suggestions([st_], config, peak_rate=150, quotas={"stripe": 90.0}, gateway_quotas={}, workers=1,
                       cpu_capacity=1, p99_target_ms=1000)
    assert any("providers.stripe.rate_limit_per_s: 81" in t for t in tips)
    assert any("providers.adyen.bulkhead.max_concurrent from 20 to 300" in t for t in tips)
    tips = suggestions([st_], config, peak_rate=150, quotas={"stripe": 90.0}, gateway_quotas={"stripe": {}},
                       workers=1, cpu_capacity=1, p99_target_ms=1000)
    assert not any("rate_limit_per_s" in t for t in tips), "already set by the rehearsal"
    slow = WindowStats(VerdictWindow(0, 1, 50, "hold", ("stripe brownout",)), sent=50, p99_ms=1500, sustained=False)
    tips = suggestions([slow], {"providers": {"stripe": {"timeout_ms": 2000}}}, peak_rate=150, quotas={},
                       gateway_quotas={}, workers=1, cpu_capacity=1, p99_target_ms=1000)
    assert tips == ["while stripe browned out p99 reached 1500 ms: lower providers.stripe.timeout_ms (now 2000) so "
                    "its slow calls are cut and failed over sooner, and set routes[].demote_below so a failing "
                    "primary is tried last"]


# -- the load's one retry of a request without an answer ------------------------------------------

async def test_a_request_without_an_answer_is_asked_again_with_its_key(aiohttp_server: Any) -> None:
    """A real server on loopback that cuts the connection of each key's first request (the
    gateway took it or not: the checkout cannot tell) and answers the second with the payment."""
    from aiohttp import web

    from gateway.rehearse.load import LoadState, ask_again, client_session, plan, run_load

    seen: Counter[str] = Counter()

    async def payments(request: web.Request) -> web.StreamResponse:
        key = request.headers["Idempotency-Key"]
        seen[key] += 1
        if seen[key] == 1 and key.endswith("1"):
            assert request.transport is not None
            request.transport.abort()  # no answer at all
            return web.Response()
        return web.json_response({"id": f"pay_{key}", "status": "approved", "merchant_reference": key}, status=201)

    app = web.Application()
    app.router.add_post("/v1/payments", payments)
    server = await aiohttp_server(app)
    kind = PaymentKind("EUR", "DE", "visa", False)
    planned = plan([0.0, 0.01, 0.02], [kind] * 3, "t", "4000000000009995", seed=1)
    state = LoadState()
    async with client_session(str(server.make_url("/")), "k", 10, 5.0) as session:
        await run_load(session, planned, state, max_in_flight=10)
        assert [s.result.http_status for s in sorted(state.sent, key=lambda s: s.result.index)] == [201, None, 201]
        first_latency = next(s.result.latency_ms for s in state.sent if s.result.http_status is None)
        assert await ask_again(session, planned, state) == 1
    again = next(s for s in state.sent if s.result.index == 1)
    assert (again.result.status, again.result.payment_id) == ("approved", "pay_rehearse-t-0000001")
    assert again.result.latency_ms == first_latency and again.due_s == planned[1].due_s
    assert seen == {"rehearse-t-0000000": 1, "rehearse-t-0000001": 2, "rehearse-t-0000002": 1}, "the same key"


def test_the_live_view_shows_the_last_seconds() -> None:
    from rich.console import Console

    from gateway.rehearse.cpu import CpuMeter
    from gateway.rehearse.live import live_table
    from gateway.rehearse.load import LoadState

    profile = peak_sale(100, 40)
    state = LoadState(started_at=1000.0, scheduled=3)
    state.sent = [Sent(SendResult(i, f"r-{i}", 20.0 * (i + 1), http_status=201, payment_id=f"p{i}", status="approved"),
                       9.0 + i * 0.1, failovers=i, provider_429s=1) for i in range(3)]
    console = Console(record=True, width=100)
    console.print(live_table(profile, state, CpuMeter(1), CpuMeter(1, tree=False), ["9s stripe browns out"],
                             now=1010.0))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3}
    assert rows["offered rate"] == "75/s", "10 s into 40: the third step of the ramp"
    assert rows["p99 (last 2 s)"] == "60 ms" and rows["failovers"] == "3" and rows["provider 429s seen"] == "3"
    assert rows["sent / answered"] == "3 / 3" and rows["scenario"] == "9s stripe browns out"


def test_windows_too_small_to_prove_a_rate_are_left_out() -> None:
    """One payment answered in time at 3800/s proves no 3800/s (the outside attack's --speedup
    10000 run claimed exactly that)."""
    tiny = [WindowStats(VerdictWindow(0, 0.001, rate, "log", ()), sent=1) for rate in (800.0, 3800.0)]
    verdict = decide(tiny, cpu_capacity=1)
    assert verdict.max_sustained_rate == 0.0 and "too few to judge" in verdict.limited_by_detail
    real = WindowStats(VerdictWindow(0, 10, 50.0, "hold", ()), sent=500)
    assert decide([real, *tiny], cpu_capacity=1).max_sustained_rate == 50.0
