"""Failure drills: the gateway and every provider emulator on loopback, a scenario's faults
injected, real HTTP load, and a summary that counts double charges and lost payments.

`gateway drill NAME` is the command; `run_named_drill` is the same thing from Python (`run_drill`
for the fault-injection scenarios, `run_crash_drill`, `run_cert_expiry_drill` and
`run_fleet_drill` for the drills with a runner of their own).
"""

from gateway.drill.catalog import run_named_drill
from gateway.drill.cert_expiry import run_cert_expiry_drill
from gateway.drill.crash import run_crash_drill
from gateway.drill.fleet import run_fleet_drill
from gateway.drill.report import SendResult, percentile, render_table, summarize
from gateway.drill.runner import (
    MAX_CONCURRENCY,
    MAX_KILLS,
    MAX_PAYMENTS,
    DrillOptions,
    DrillReport,
    run_drill,
)
from gateway.drill.scenarios import DEDICATED, DRILL_NAMES, SCENARIOS, Scenario, get_scenario

__all__ = [
    "DEDICATED",
    "DRILL_NAMES",
    "MAX_CONCURRENCY",
    "MAX_KILLS",
    "MAX_PAYMENTS",
    "SCENARIOS",
    "DrillOptions",
    "DrillReport",
    "Scenario",
    "SendResult",
    "get_scenario",
    "percentile",
    "render_table",
    "run_cert_expiry_drill",
    "run_crash_drill",
    "run_drill",
    "run_fleet_drill",
    "run_named_drill",
    "summarize",
]
