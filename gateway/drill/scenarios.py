"""Drill scenarios as data: which provider misbehaves, how, and for how long.

A scenario names the route (ordered provider kinds; the first is the *primary*), the fault
steps applied to emulators for the whole load phase, which share of payments carry a
hard-decline card, and the scenario's own pass criteria on top of the invariants every drill
checks (no duplicate charge, nothing lost, no charge without an approved or pending answer,
no hard decline failed over).

Cards. The gateway sends the same card number to whichever provider it routes to, so approved
traffic uses the primary's `scenario_cards()["approve"]` (4242 4242 4242 4242 for Stripe), a
number every emulator approves: the Stripe emulator approves it explicitly (and approves any
unlisted Luhn-valid number, as Stripe's test mode does), and the backups must approve it too,
or primary-outage would show declines. Decline-storm payments use the *primary's* own
hard-decline cards (`insufficient_funds`, `stolen_card`): the primary declines them, and the
engine must then never try the backups.

Fault rules only hit `authorize` calls, so the status queries that settle an unknown outcome
see the provider as it really is; that is what makes failover after "no charge" safe.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from emulators.faults import FaultPlan, FaultRule
from emulators.quota import QuotaPlan
from emulators.server import EmulatorServer

ROUTE: tuple[str, ...] = ("stripe", "adyen", "checkout")
PRIMARY = 0  # index of the primary in a scenario's route

# The drill's engine settings (see runner.drill_config_data): faults are sized against them.
PER_TRY_TIMEOUT_MS = 400
DEADLINE_MS = 3000
FLAP_PERIOD_S = 0.5
AUTHORIZE_ONLY = ("authorize",)
FOLLOW_UP_OPS = ("capture", "refund")

Summary = Mapping[str, Any]


class Injection(Protocol):
    """A fault in force on one emulator; `lift` ends it and leaves the emulator healthy."""

    async def lift(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Outage:
    """The provider refuses connections (listener closed) for the whole run."""

    provider: int = PRIMARY

    async def inject(self, server: EmulatorServer, seed: int) -> Injection:
        await server.set_outage(True)
        return _OutageLifted(server)


@dataclass(frozen=True, slots=True)
class Flap:
    """The provider goes down and comes back every `period_s` (± `jitter_s`, seeded, so the
    toggles do not phase-lock with the breaker's reset timeout): failures in bursts."""

    provider: int = PRIMARY
    period_s: float = FLAP_PERIOD_S
    jitter_s: float = FLAP_PERIOD_S * 0.4

    async def inject(self, server: EmulatorServer, seed: int) -> Injection:
        flapper = _Flapper(server, self.period_s, self.jitter_s, random.Random(seed))
        await flapper.start()
        return flapper


@dataclass(frozen=True, slots=True)
class Faults:
    """A fault plan (emulator rules with shares) on the provider for the whole run."""

    rules: tuple[FaultRule, ...]
    provider: int = PRIMARY

    async def inject(self, server: EmulatorServer, seed: int) -> Injection:
        server.emulator.faults.set(FaultPlan(rules=self.rules, seed=seed))
        return _PlanLifted(server)


@dataclass(frozen=True, slots=True)
class Quota:
    """The provider account's request quota for the whole run: the emulator answers its real
    429 past `emulator_per_s`, and the drill's gateway keeps `gateway_per_s`
    (providers.<name>.rate_limit_per_s; None: the gateway is not told of the quota)."""

    emulator_per_s: float
    gateway_per_s: float | None = None
    provider: int = PRIMARY

    async def inject(self, server: EmulatorServer, seed: int) -> Injection:
        server.emulator.quota.set(QuotaPlan(rate_limit_per_s=self.emulator_per_s))
        return _QuotaLifted(server)


Step = Outage | Flap | Faults | Quota


@dataclass(frozen=True, slots=True)
class Check:
    """One pass criterion: `test(summary)` is True when the drill met it."""

    name: str
    test: Callable[[Summary], bool]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    route: tuple[str, ...] = ROUTE
    steps: tuple[Step, ...] = ()
    decline_share: float = 0.0  # share of payments paid with a hard-decline card of the primary
    decline_cards: tuple[str, ...] = ()  # scenario_cards() behaviours, used in turn
    checks: tuple[Check, ...] = ()
    # Authorise only (`capture: false`), then capture and partially refund every approved
    # payment (`gateway.drill.follow_ups`) while the faults are in force.
    follow_ups: bool = False

    @property
    def primary(self) -> str:
        return self.route[PRIMARY]

    def with_primary(self, kind: str) -> Scenario:
        """The same scenario with `kind` as the primary, the others after it in their order."""
        if kind not in self.route:
            raise KeyError(f"{kind!r} is not on the drill's route ({', '.join(self.route)})")
        return replace(self, route=(kind, *(k for k in self.route if k != kind)))


def _approval_at_least(share: float) -> Check:
    return Check(f"approval_rate>={share}", lambda s: s["approval_rate"] >= share)


def _answered_at_least(share: float) -> Check:
    """Approved or pending (the reconciler owns those): nothing the caller must give up on."""
    return Check(f"approved_or_pending_rate>={share}",
                 lambda s: (s["approved"] + s["pending"]) >= share * max(1, s["sent"] - s["declined"]))


ACCOUNT_QUOTA_PER_S = 20.0  # quota-spillover: the primary's account, and what the gateway keeps of it
GATEWAY_QUOTA_PER_S = 18.0


def _primary_within_quota(s: Summary) -> bool:
    """At most a full bucket (one second's worth) plus the rate over the load phase."""
    return s["charges_by_provider"].get(s["primary"], 0) <= GATEWAY_QUOTA_PER_S * (1 + s["load_seconds"]) + 1


def _spilled_over_past_quota(s: Summary) -> bool:
    """More payments than the primary's quota let through went to the backups (a load phase
    slow enough to stay under the quota has nothing to spill)."""
    primary = s["charges_by_provider"].get(s["primary"], 0)
    backups = sum(s["charges_by_provider"].values()) - primary
    return primary > 0 and (backups > 0 or s["sent"] <= GATEWAY_QUOTA_PER_S * (1 + s["load_seconds"]))


# Every drill, whatever the scenario. The first two are the contract's exit condition.
INVARIANTS: tuple[Check, ...] = (
    Check("duplicates==0", lambda s: s["duplicates"] == 0),
    Check("lost==0", lambda s: s["lost"] == 0),
    Check("journal_mismatches==0", lambda s: s["journal_mismatches"] == 0),
    Check("declines_failed_over==0", lambda s: s["declines_failed_over"] == 0),
    Check("charged_without_approval==0", lambda s: s["charged_without_approval"] == 0),
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "baseline",
            "No faults: every payment approved by the primary.",
            checks=(_approval_at_least(0.999),),
        ),
        Scenario(
            "primary-outage",
            "The primary refuses connections for the whole run; backups approve everything.",
            steps=(Outage(),),
            checks=(
                _approval_at_least(0.999),
                Check("failovers>0", lambda s: s["failovers"] > 0),
                Check("no_charge_at_primary", lambda s: s["charges_by_provider"].get(s["primary"], 0) == 0),
            ),
        ),
        Scenario(
            "brownout",
            f"30% of the primary's authorisations take {PER_TRY_TIMEOUT_MS + 300} ms, past the "
            f"{PER_TRY_TIMEOUT_MS} ms per-try timeout: unknown outcomes, settled or left pending, never re-sent.",
            steps=(Faults((FaultRule(kind="latency", share=0.3, latency_ms=PER_TRY_TIMEOUT_MS + 300,
                                     operations=AUTHORIZE_ONLY),)),),
            checks=(_answered_at_least(0.999),),
        ),
        Scenario(
            "flapping",
            f"The primary goes down and comes back every ~{FLAP_PERIOD_S} s: connections refused in bursts, "
            "open connections cut.",
            steps=(Flap(),),
        ),
        Scenario(
            "timeout-after-processing",
            "20% of the primary's authorisations charge, then hang past the per-try timeout: the status "
            "query must find the charge, so nothing fails over.",
            steps=(Faults((FaultRule(kind="timeout_after", share=0.2, hang_s=DEADLINE_MS / 1000,
                                     operations=AUTHORIZE_ONLY),)),),
            checks=(_answered_at_least(1.0),),
        ),
        Scenario(
            "decline-storm",
            "30% of payments carry the primary's hard-decline cards (insufficient funds, stolen card): "
            "declined once, never sent to a backup.",
            decline_share=0.3,
            decline_cards=("insufficient_funds", "stolen_card"),
            checks=(
                Check("declined==expected_declines", lambda s: s["declined"] == s["expected_declines"]),
                _approval_at_least(0.999),
            ),
        ),
        Scenario(
            "ambiguous-5xx",
            "30% of the primary's authorisations are processed, then answered 503 (a proxy in front of the "
            "provider, or the provider itself): unknown, never failed over before a status query proves no "
            "charge; whatever stays unsettled is pending and reconciled.",
            steps=(Faults((FaultRule(kind="error", share=0.3, status=503, after_processing=True,
                                     operations=AUTHORIZE_ONLY),)),),
            checks=(_answered_at_least(1.0),),
        ),
        Scenario(
            "followup-unknown",
            "Every approved payment is captured, then partly refunded; 30% of the primary's captures and "
            "refunds are processed and answered 500 (Stripe and Adyen replay that stored 500 for the key), "
            "15% processed and never answered, and half of its status queries fail: each is settled by the "
            "status query right after it or answered 202 and settled by the reconciler from the provider's "
            "list of the payment's follow-ups, never made twice.",
            steps=(Faults((FaultRule(kind="error", share=0.3, status=500, after_processing=True,
                                     operations=FOLLOW_UP_OPS),
                           FaultRule(kind="timeout_after", share=0.15, hang_s=DEADLINE_MS / 1000,
                                     operations=FOLLOW_UP_OPS),
                           FaultRule(kind="error", share=0.5, status=503, operations=("status",)))),),
            follow_ups=True,
            checks=(_approval_at_least(0.999), Check("follow_ups_pending==0", lambda s: s["follow_ups_pending"] == 0)),
        ),
        Scenario(
            "webhook-chaos",
            "Adyen primary: 30% of its authorisations charge, then hang past the per-try timeout, and 15% are "
            "processed, then answered 500 (which Adyen replays for the key): those left unknown are pending, "
            "and only their notification can settle them (the gateway never asks Adyen); every approved payment is "
            "captured, then partly refunded (answered received: pending until notified), 10% of those "
            "refused by notification; notifications duplicated, reordered, delayed, some dropped then "
            "retried, a few forged. Checks: everything settled from its notification, nothing forged taken.",
            route=("adyen", "stripe", "checkout"),
            steps=(Faults((FaultRule(kind="timeout_after", share=0.3, hang_s=DEADLINE_MS / 1000,
                                     operations=AUTHORIZE_ONLY),
                           FaultRule(kind="error", share=0.15, status=500, after_processing=True,
                                     operations=AUTHORIZE_ONLY),
                           FaultRule(kind="fail_by_notification", share=0.1, operations=FOLLOW_UP_OPS),
                           FaultRule(kind="webhook_duplicate", share=0.3, copies=2),
                           FaultRule(kind="webhook_reorder", share=0.2, hang_s=0.5),
                           FaultRule(kind="webhook_delay", share=0.3, latency_ms=200, jitter_ms=200),
                           FaultRule(kind="webhook_drop", share=0.2, drops=2),
                           FaultRule(kind="webhook_forge", share=0.05))),),
            follow_ups=True,
            checks=(
                _answered_at_least(0.999),
                Check("wrong_final_states==0", lambda s: s["wrong_final_states"] == 0),
                Check("pending_left==0", lambda s: s["pending_left"] == 0),
                Check("forged_accepted==0", lambda s: s["forged_accepted"] == 0),
                Check("no_lookup_at_adyen", lambda s: s["lookups_by_provider"].get("adyen", 0) == 0),
                Check("notifications_missing==0", lambda s: s["notifications_missing"] == 0),
                Check("notifications_repeated==0", lambda s: s["notifications_repeated"] == 0),
            ),
        ),
        Scenario(
            "quota-spillover",
            "The primary's account takes 20 requests/s (its real 429 past that); the gateway keeps it at "
            "18/s and spills the excess over to the backups before the 429s start: no payment fails on one "
            "(`quota_429s` counts those the account answered: a cold start, its first tokens taken while "
            "the connections are still being opened, can bunch a few; each is retried or spilled over).",
            steps=(Quota(emulator_per_s=ACCOUNT_QUOTA_PER_S, gateway_per_s=GATEWAY_QUOTA_PER_S),),
            checks=(
                _approval_at_least(0.999),
                Check("failed==0", lambda s: s["failed"] == 0),
                Check("primary_within_quota", _primary_within_quota),
                Check("spilled_over_past_quota", _spilled_over_past_quota),
            ),
        ),
        Scenario(
            "rate-limited",
            "30% of the primary's authorisations answer 429 with Retry-After: 0.2: retried after the "
            "hint with the same key, failed over when that is spent.",
            steps=(Faults((FaultRule(kind="rate_limit", share=0.3, retry_after_s=0.2, operations=AUTHORIZE_ONLY),)),),
            checks=(
                Check("retries_or_failovers>0", lambda s: s["retries"] + s["failovers"] > 0),
                _approval_at_least(0.999),
            ),
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown drill {name!r}; choose one of {', '.join(SCENARIOS)}") from None


# -- the fault injections in force ------------------------------------------------------------


class _OutageLifted:
    def __init__(self, server: EmulatorServer) -> None:
        self._server = server

    async def lift(self) -> None:
        await self._server.set_outage(False)


class _PlanLifted:
    def __init__(self, server: EmulatorServer) -> None:
        self._server = server

    async def lift(self) -> None:
        self._server.emulator.faults.clear()


class _QuotaLifted:
    """Lifting keeps the count of requests the quota answered 429 (`quota_429s`), which
    clearing the plan resets."""

    def __init__(self, server: EmulatorServer) -> None:
        self._server = server
        self.quota_429s = 0

    async def lift(self) -> None:
        self.quota_429s = self._server.emulator.quota.limited
        self._server.emulator.quota.clear()


class _Flapper:
    """Toggles the outage from a background task; stops between toggles, never mid-toggle,
    so the listener is never left half stopped."""

    def __init__(self, server: EmulatorServer, period_s: float, jitter_s: float, rng: random.Random) -> None:
        self._server = server
        self._period_s = period_s
        self._jitter_s = jitter_s
        self._rng = rng
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.toggles = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"drill-flap-{self._server.emulator.name}")

    async def _run(self) -> None:
        down = True
        while not self._stop.is_set():
            await self._server.set_outage(down)
            self.toggles += 1
            try:
                await asyncio.wait_for(self._stop.wait(),
                                       self._period_s + self._rng.uniform(-self._jitter_s, self._jitter_s))
            except TimeoutError:
                pass
            down = not down

    async def lift(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self._server.set_outage(False)


# -- drills with a runner of their own ------------------------------------------------------------
# Not in SCENARIOS: `run_drill` cannot run them (they kill a gateway process, or rotate a
# certificate mid-run); `gateway.drill.catalog` dispatches every name.

CRASH_LATENCY_MS = 100  # + up to CRASH_JITTER_MS: inside the per-try timeout, so calls complete
CRASH_JITTER_MS = 250  # yet many payments are mid-call when the process dies
CRASH_SLOW_MS = 1500  # past the per-try timeout and a restart: still "processing" when reconciled

CRASH_RESTART = Scenario(
    "crash-restart",
    "The gateway runs as its own process and is SIGKILLed under load at seeded random points, then "
    "restarted on the same port, journal and log directory; the checkout client retries with the same "
    "Idempotency-Key. Primary: 60% of authorisations take 100-350 ms and 5% another 1.5 s (still processing "
    "when the restarted gateway reconciles), 10% charge and then hang, 20% answer 503 before processing; "
    "first backup: 50% take 100-300 ms.",
    steps=(
        Faults((FaultRule(kind="latency", share=0.6, latency_ms=CRASH_LATENCY_MS, jitter_ms=CRASH_JITTER_MS,
                          operations=AUTHORIZE_ONLY),
                FaultRule(kind="latency", share=0.05, latency_ms=CRASH_SLOW_MS, operations=AUTHORIZE_ONLY),
                FaultRule(kind="timeout_after", share=0.1, hang_s=DEADLINE_MS / 1000, operations=AUTHORIZE_ONLY),
                FaultRule(kind="error", share=0.2, status=503, operations=AUTHORIZE_ONLY))),
        Faults((FaultRule(kind="latency", share=0.5, latency_ms=CRASH_LATENCY_MS, jitter_ms=CRASH_JITTER_MS - 50,
                          operations=AUTHORIZE_ONLY),), provider=PRIMARY + 1),
    ),
    checks=(
        Check("restarts==kills", lambda s: s["restarts"] == s["kills"]),
        Check("charged_at_other_provider==0", lambda s: s["charged_at_other_provider"] == 0),
    ),
)


FOLLOWUP_CRASH = Scenario(
    "followup-crash",
    "Every approved payment is captured, then partly refunded, while the gateway (its own process) is "
    "SIGKILLed at seeded points of the follow-up phase and restarted on the same port and journal; the "
    "checkout retries each follow-up with the same Idempotency-Key. Primary: 60% of captures and refunds "
    "take 100-350 ms and 5% another 1.5 s, so kills land mid-call: every follow-up the provider made is in "
    "the journal, none is made twice.",
    steps=(Faults((FaultRule(kind="latency", share=0.6, latency_ms=CRASH_LATENCY_MS, jitter_ms=CRASH_JITTER_MS,
                             operations=FOLLOW_UP_OPS),
                   FaultRule(kind="latency", share=0.05, latency_ms=CRASH_SLOW_MS, operations=FOLLOW_UP_OPS))),),
    follow_ups=True,
    checks=(
        Check("restarts==kills", lambda s: s["restarts"] == s["kills"]),
        Check("follow_ups_pending==0", lambda s: s["follow_ups_pending"] == 0),
    ),
)


def _phase(s: Summary, name: str) -> Mapping[str, Any]:
    return s["phases"][name]


def _carried_by(s: Summary, phase: str, providers: Callable[[str], bool]) -> int:
    return sum(n for p, n in _phase(s, phase)["charges_by_provider"].items() if providers(p))


CERT_EXPIRY = Scenario(
    "cert-expiry",
    "The primary's mTLS client certificate expires mid-run: the certificate watcher marks it, the router "
    "routes around it and the backups carry the payments; a fresh pair is rotated in (validated, swapped, "
    "reloaded without a restart) and the primary carries the payments again.",
    checks=(
        Check("primary_marked_expired", lambda s: s["certificate"]["problem_while_expired"]
              == "client_certificate_expired"),
        Check("during:no_charge_at_primary", lambda s: _carried_by(s, "during", lambda p: p == s["primary"]) == 0),
        Check("during:backups_carried_all",
              lambda s: _carried_by(s, "during", lambda p: p != s["primary"]) == _phase(s, "during")["sent"] > 0),
        Check("after:primary_carried_all",
              lambda s: _carried_by(s, "after", lambda p: p == s["primary"]) == _phase(s, "after")["sent"] > 0),
        Check("primary_cleared_after_rotation", lambda s: s["certificate"]["problem_after_rotation"] is None),
    ),
)

BREAKER_SPREAD_MAX_MS = 1000.0  # every replica skips a tripped provider within this of the first

FLEET = Scenario(
    "fleet",
    "Three gateway processes (`serve`, optionally `--workers N`) behind a real HAProxy health-checking "
    "/readyz, on one PostgreSQL schema and one Redis of the drill's own. Payments through HAProxy, each "
    "approved one captured and partly refunded (a third of them with the capture and the refund sent at "
    "once to two different replicas directly); mid-run the primary refuses connections, one replica is "
    "SIGKILLed and restarted, Redis is stopped and restarted empty, the fleet's PostgreSQL sessions are "
    "terminated, and a migration is applied live, followed by a rolling restart behind HAProxy draining. "
    "Primary: 30% of calls take 50-200 ms, so kills land mid-call.",
    steps=(Faults((FaultRule(kind="latency", share=0.3, latency_ms=50, jitter_ms=150,
                             operations=("authorize", *FOLLOW_UP_OPS)),)),),
    follow_ups=True,
    checks=(
        Check("http_500==0", lambda s: s["http_500"] == 0),
        Check("txlog_missing==0", lambda s: s["txlog_missing"] == 0),
        Check("txlog_repeated==0", lambda s: s["txlog_repeated"] == 0),
        Check("reconciled_twice==0", lambda s: s["reconciled_twice"] == 0),
        Check("follow_ups_pending==0", lambda s: s["follow_ups_pending"] == 0),
        Check("open_after_settling==0", lambda s: s["open_after_settling"] == 0),
        Check(f"breaker_spread_ms<={BREAKER_SPREAD_MAX_MS:g}",
              lambda s: s["breaker_spread_ms"] is not None and s["breaker_spread_ms"] <= BREAKER_SPREAD_MAX_MS),
        Check("every_event_ran", lambda s: s["events_failed"] == 0),
        Check("schema_migrated_live", lambda s: s["schema"]["after"] == s["schema"]["latest"]),
        Check("racing_refunds_made", lambda s: s["racing"]["refunds_made"] == s["racing"]["payments"]),
        Check("charged_at_other_provider==0", lambda s: s["charged_at_other_provider"] == 0),
    ),
)

THREEDS = Scenario(
    "threeds",
    "3-D Secure: 40% of the cards are the primary's challenge cards, 20% frictionless; every payment brings a "
    "return URL. The shoppers of challenged payments complete (60%), fail (20%) or abandon (20%) the emulator's "
    "challenge page; /complete finishes the first two, the reconciler cancels the abandoned ones at the provider "
    "once they expire. The route lists the action's own codes in cascade_on, and 15% of the primary's "
    "authorisations answer 503 before processing and 10% are processed and never answered: no payment is ever "
    "sent to a second provider after an action.",
    steps=(Faults((FaultRule(kind="error", share=0.15, status=503, operations=AUTHORIZE_ONLY),
                   FaultRule(kind="timeout_after", share=0.1, hang_s=DEADLINE_MS / 1000, operations=AUTHORIZE_ONLY))),),
    checks=(
        Check("action_required>0", lambda s: s["action_required"] > 0),
        Check("failed_over_after_action==0", lambda s: s["failed_over_after_action"] == 0),
        Check("abandoned_expired==shoppers_abandoned", lambda s: s["abandoned_expired"] == s["shoppers_abandoned"]),
        Check("still_waiting==0", lambda s: s["still_waiting"] == 0),
    ),
)

DEDICATED: dict[str, Scenario] = {s.name: s for s in (CRASH_RESTART, FOLLOWUP_CRASH, CERT_EXPIRY, FLEET, THREEDS)}
DRILL_NAMES: tuple[str, ...] = (*SCENARIOS, *DEDICATED)
