"""The live console for a peak sale: `GET /console`, behind the admin API key.

Per provider: approval rate and latency p50/p99 over the last minutes, breaker state and when
it last changed, bulkhead use, failovers per minute; for the gateway: pending payments and the
retry budget left; certificates with days left; the last failures with their classified
reason. It updates live over server-sent events, and lets an operator force a breaker open or
closed and wake the reconciler, each with a confirmation and an audit line in the ops log.

`Console` (console.py) is its state, handed what it shows by the composition root
(`gateway.app`); `routes.add_routes(app)` adds its handlers; `ConsoleStats` (stats.py) is the
sliding window the payment service feeds.
"""

from gateway.console.console import Console
from gateway.console.session import COOKIE, SessionSigner
from gateway.console.stats import ConsoleStats

__all__ = ["COOKIE", "Console", "ConsoleStats", "SessionSigner"]
