"""What the webhook route needs, built by the composition root and kept under the app's
`WEBHOOKS` key: each provider's endpoint (scheme and secrets), the counters, the processor to
wake. A module of its own so the app's keys can name its type without importing the route,
which reads those keys."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.webhooks.metrics import WebhookMetrics
from gateway.webhooks.processor import WebhookProcessor
from gateway.webhooks.schemes import WebhookEndpoint

# The crash tests' hook: `journalled` SIGKILLs the process right after a delivery is journalled,
# before it is answered or applied (the window a restart must close).
CRASH_ENV = "GATEWAY_WEBHOOK_CRASH_AT"


@dataclass(frozen=True, slots=True)
class Webhooks:
    """What the route needs: each provider's endpoint, the counters, the processor to wake."""

    endpoints: dict[str, WebhookEndpoint]
    metrics: WebhookMetrics
    processor: WebhookProcessor
    crash_at: str | None = None  # CRASH_ENV, read once at start
