"""`gateway rehearse`: the sale before the sale. A traffic profile (`profile`, `from_log`), a
scenario of faults at its peak (`scenario`), the production configuration on loopback
(`config_gen`), an open-loop load (`load`) against the gateway as its own process and the
emulators, and a verdict (`verdict`): the highest rate sustained, what limited it, and the
configuration changes that would raise it. `runner.rehearse` is the whole run from Python.
"""

from gateway.rehearse.runner import RehearsalOptions, rehearse

__all__ = ["RehearsalOptions", "rehearse"]
