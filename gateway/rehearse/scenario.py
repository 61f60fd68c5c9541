"""The rehearsal's scenario as data: what goes wrong, at which point of the run, to whom.

Faults are placed around the profile's peak (`RateProfile.peak`, fractions of the run), because
that is when they hurt: before the peak the primary browns out (slow answers and some 503s),
then it fails (connections refused) until the peak is over; at the peak's start a backup's mTLS
client certificate expires (an expired pair installed over its files, as `gateway certs
issue-dev --days -1` does, so the certificate watcher and the handshakes meet it as ops would);
and for the whole run the primary's account quota is below the peak rate (the emulator answers
past it with its provider's real 429).

Roles, not names: `primary` is the first provider of the configuration's first route, `backup`
its last, so the same scenario fits any production configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from emulators.faults import FaultRule

Role = Literal["primary", "backup"]
AUTHORIZE = ("authorize",)
BROWNOUT = "brownout"  # a window's fault label for a brownout ends with it (the verdict looks for it)


@dataclass(frozen=True, slots=True)
class Brownout:
    role: Role
    latency_ms: float
    jitter_ms: float
    error_share: float

    def rules(self) -> tuple[FaultRule, ...]:
        return (FaultRule(kind="latency", latency_ms=self.latency_ms, jitter_ms=self.jitter_ms, operations=AUTHORIZE),
                FaultRule(kind="error", status=503, share=self.error_share, operations=AUTHORIZE))

    def short(self, name: str) -> str:
        return f"{name} {BROWNOUT}"

    def describe(self, name: str) -> str:
        return (f"{name} browns out: +{self.latency_ms:g}-{self.latency_ms + self.jitter_ms:g} ms, "
                f"{self.error_share:.0%} 503")


@dataclass(frozen=True, slots=True)
class Outage:
    role: Role

    def short(self, name: str) -> str:
        return f"{name} down"

    def describe(self, name: str) -> str:
        return f"{name} fails: connections refused"


@dataclass(frozen=True, slots=True)
class Recover:
    """The role's faults end (brownout rules cleared, listener back)."""

    role: Role

    def short(self, name: str) -> str:
        return f"{name} back"

    def describe(self, name: str) -> str:
        return f"{name} recovers"


@dataclass(frozen=True, slots=True)
class CertificateExpires:
    role: Role

    def short(self, name: str) -> str:
        return f"{name} cert expired"

    def describe(self, name: str) -> str:
        return f"{name}'s client certificate expires"


@dataclass(frozen=True, slots=True)
class QuotaBelowPeak:
    """The role's account quota, as a share of the profile's peak rate."""

    role: Role
    share_of_peak: float
    burst_s: float = 0.5  # the bucket holds this many seconds' worth

    def rate(self, peak_rate: float) -> float:
        return max(1.0, self.share_of_peak * peak_rate)

    def burst(self, peak_rate: float) -> int:
        return max(1, round(self.rate(peak_rate) * self.burst_s))

    def describe(self, name: str, peak_rate: float) -> str:
        return f"{name}'s quota is {self.rate(peak_rate):.0f}/s (peak {peak_rate:.0f}/s)"


Action = Brownout | Outage | Recover | CertificateExpires


@dataclass(frozen=True, slots=True)
class Event:
    at: float  # fraction of the run
    action: Action


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    quota: QuotaBelowPeak | None
    events: tuple[Event, ...]
    # ---- The one place the rehearsal sets the gateway's own per-provider quota ----------------
    # `providers.<name>.rate_limit_per_s` / `rate_limit_burst` (issue 18 section 3): the gateway
    # keeps each provider under this share of its account quota and spills over before the 429s.
    # Applied by `config_gen.gateway_quotas` only when this build's configuration has the fields.
    gateway_quota_share: float | None = 0.9


def peak_scenario(peak: tuple[float, float], *, quota_share_of_peak: float = 0.6) -> Scenario:
    """The scenario around a peak at fractions [start, end) of the run (see the module doc)."""
    start, end = peak
    brownout_at = max(0.0, start - 0.2)
    fail_at = max(brownout_at, start - 0.07)
    return Scenario("peak", QuotaBelowPeak("primary", quota_share_of_peak), (
        Event(brownout_at, Brownout("primary", latency_ms=600, jitter_ms=600, error_share=0.1)),
        Event(fail_at, Outage("primary")),
        Event(start, CertificateExpires("backup")),
        Event(end, Recover("primary")),
    ))


def no_fault_scenario() -> Scenario:
    return Scenario("none", None, ())
