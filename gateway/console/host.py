"""The host's figures, added up from each process's report.

With `serve --workers N` every worker keeps its own traffic window (the payment service feeds it
in-process, so the hot path never leaves the worker), its own requests in flight, retry budget
and bulkheads. A snapshot on any worker adds every worker's report (`Console.seat_report`, fetched
through `gateway.workers.peers`) into the host's: windows and histograms summed, the last
failures merged by time, in-flight payments united. A single process is the case of one report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.console.stats import Traffic

FAILURES_SHOWN = 15
BULKHEAD_FIELDS = ("active", "waiting", "max_concurrent", "max_queue")


@dataclass(slots=True)
class HostFigures:
    workers: int = 1  # seats on this host
    missing: list[int] = field(default_factory=list)  # seats that did not answer
    reporting: int = 0  # reports added up (this process's included)
    traffic: dict[str, Traffic] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # newest first
    in_flight: set[str] = field(default_factory=set)  # ids (each report lists at most a bounded number)
    in_flight_count: int = 0
    retry_budget_left: float = 0.0
    bulkheads: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, reports: Iterable[dict[str, Any]], *, workers: int = 1, missing: Iterable[int] = ()) -> HostFigures:
        host = cls(workers=workers, missing=list(missing))
        for report in reports:
            host.reporting += 1
            for key, doc in report["traffic"].items():
                traffic = Traffic.from_wire(doc)
                if key in host.traffic:
                    host.traffic[key].add(traffic)
                else:
                    host.traffic[key] = traffic
            host.failures.extend(report["failures"])
            host.in_flight.update(report["in_flight"])
            host.in_flight_count += int(report["in_flight_count"])
            host.retry_budget_left += float(report["retry_budget_left"])
            for name, bulkhead in report["bulkheads"].items():
                total = host.bulkheads.setdefault(name, dict.fromkeys(BULKHEAD_FIELDS, 0))
                for key in BULKHEAD_FIELDS:
                    total[key] += int(bulkhead[key])
        host.failures.sort(key=lambda f: f["at"], reverse=True)
        del host.failures[FAILURES_SHOWN:]
        return host

    def who(self) -> dict[str, Any]:
        """The snapshot's `host`: how many seats, how many answered, which did not."""
        return {"workers": self.workers, "reporting": self.reporting, "missing": self.missing}
