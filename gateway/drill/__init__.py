"""Failure drills: the gateway and every provider emulator on loopback, a scenario's faults
injected, real HTTP load, and a summary that counts double charges and lost payments.

`gateway drill NAME` is the command; `run_drill` is the same thing from Python.
"""

from gateway.drill.report import SendResult, percentile, render_table, summarize
from gateway.drill.runner import MAX_CONCURRENCY, MAX_PAYMENTS, DrillOptions, DrillReport, run_drill
from gateway.drill.scenarios import SCENARIOS, Scenario, get_scenario

__all__ = [
    "MAX_CONCURRENCY",
    "MAX_PAYMENTS",
    "SCENARIOS",
    "DrillOptions",
    "DrillReport",
    "Scenario",
    "SendResult",
    "get_scenario",
    "percentile",
    "render_table",
    "run_drill",
    "summarize",
]
