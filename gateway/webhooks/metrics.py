"""The webhook counters, registered in the app's registry (`gateway.metrics.Metrics`), children
cached per provider at first use like the rest."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.received = Counter("gateway_webhooks_received_total",
                                "Webhook notification items journalled (new) or repeated (duplicate)",
                                ["provider", "result"], registry=r)
        self.rejected = Counter("gateway_webhooks_rejected_total",
                                "Webhook deliveries refused: bad or missing signature, or an unreadable body",
                                ["provider", "reason"], registry=r)
        self.processed = Counter("gateway_webhooks_processed_total",
                                 "Journalled webhook events applied (applied, unchanged, orphan)",
                                 ["provider", "state"], registry=r)
