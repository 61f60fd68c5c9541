"""Every drill by name: the fault-injection scenarios `run_drill` runs, and the drills with a
runner of their own (crash-restart and followup-crash kill a gateway process, cert-expiry drives
the certificate watcher, fleet runs replicas behind HAProxy, threeds has shoppers act on challenges). `gateway drill NAME` goes through here."""

from __future__ import annotations

from gateway.drill.cert_expiry import run_cert_expiry_drill
from gateway.drill.crash import run_crash_drill
from gateway.drill.fleet import run_fleet_drill
from gateway.drill.runner import DrillOptions, DrillReport, ProgressHook, run_drill
from gateway.drill.scenarios import CERT_EXPIRY, CRASH_RESTART, DRILL_NAMES, FLEET, FOLLOWUP_CRASH, THREEDS
from gateway.drill.threeds import run_threeds_drill


async def run_named_drill(name: str, options: DrillOptions | None = None, *,
                          on_progress: ProgressHook | None = None) -> DrillReport:
    """Run the drill called `name` (one of DRILL_NAMES); KeyError for an unknown name."""
    options = options if options is not None else DrillOptions()
    if name in (CRASH_RESTART.name, FOLLOWUP_CRASH.name):
        scenario = CRASH_RESTART if name == CRASH_RESTART.name else FOLLOWUP_CRASH
        return await run_crash_drill(options, scenario=scenario, on_progress=on_progress)
    if name == CERT_EXPIRY.name:
        return await run_cert_expiry_drill(options, on_progress=on_progress)
    if name == FLEET.name:
        return await run_fleet_drill(options, on_progress=on_progress)
    if name == THREEDS.name:
        return await run_threeds_drill(options, on_progress=on_progress)
    return await run_drill(name, options, on_progress=on_progress)


__all__ = ["DRILL_NAMES", "run_named_drill"]
