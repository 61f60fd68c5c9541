"""Prometheus metrics, one registry per app so tests and replicas never share state.

Under `serve --workers N` (`multiprocess_dir` given, and PROMETHEUS_MULTIPROC_DIR set by the
supervisor before the worker's first metric) prometheus-client keeps every value in files shared
by the host's workers, and `render` sums them (`MultiProcessCollector`): `/metrics` on any worker
shows the host's totals. Each gauge says how workers combine (`multiprocess_mode`, ignored in
one process): sums for what is in flight, the worst for states, the lowest for "is ready".
Values a callback reads at scrape time (`observe`) cannot be read across processes, so there
each worker copies them into its gauges every `REFRESH_INTERVAL_S` (`refresh_forever`).

Names follow Prometheus's conventions (base units: `_seconds`; counters end in `_total`; no
payment id, key or other unbounded value as a label). Series whose label values are known up
front (each provider, each shed reason) exist at 0 from the start, so `rate()` and `increase()`
see their first event and a dashboard shows every provider. README's "Metrics" lists them all;
`deploy/prometheus/alerts.yml` alerts on them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from domain.outcome import Outcome
from domain.types import Operation
from gateway.router import LATENCY, SUCCESS_RATE

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
DEMOTION_REASONS = (SUCCESS_RATE, LATENCY)
REFRESH_INTERVAL_S = 1.0
# Why a request or a retry was refused (`gateway_shed_total{reason}`): the front door's in-flight
# cap, the transaction log's queue or outbox, the journal's write queue, the retry budget, every
# candidate provider at its request quota.
SHED_REASONS = ("in_flight", "log_queue", "journal", "retry_budget", "quota")


class BulkheadReading(Protocol):
    """What the metrics read of a provider's bulkhead (`gateway.bulkhead.Bulkhead`)."""

    active: int
    waiting: int
    max_concurrent: int


class Metrics:
    def __init__(self, *, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self._refreshers: list[Callable[[], None]] = []
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.payments = Counter("gateway_payments_total", "Payments by final status", ["status"], registry=r)
        self.attempts = Counter("gateway_attempts_total", "Provider attempts by outcome class",
                                ["provider", "operation", "outcome"], registry=r)
        self.attempt_latency = Histogram("gateway_attempt_seconds", "Provider attempt latency", ["provider"],
                                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.payment_latency = Histogram("gateway_payment_seconds", "Payment latency at the front door",
                                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.failovers = Counter("gateway_failovers_total", "Moves to the next provider", ["from_provider", "reason"],
                                 registry=r)
        self.retries = Counter("gateway_retries_total", "Retries to the same provider", ["provider"], registry=r)
        self.breaker_state = Gauge("gateway_breaker_state", "0 closed, 1 half-open, 2 open", ["provider"],
                                   multiprocess_mode="livemax", registry=r)
        self.breaker_changes = Counter("gateway_breaker_transitions_total", "Breaker state changes",
                                       ["provider", "to_state"], registry=r)
        self.bulkhead_active = Gauge("gateway_bulkhead_active", "Calls in flight per provider", ["provider"],
                                     multiprocess_mode="livesum", registry=r)
        self.bulkhead_waiting = Gauge("gateway_bulkhead_waiting", "Calls waiting for a bulkhead slot per provider",
                                      ["provider"], multiprocess_mode="livesum", registry=r)
        self.bulkhead_max = Gauge("gateway_bulkhead_max_concurrent", "Bulkhead slots per provider (its limit)",
                                  ["provider"], multiprocess_mode="livesum", registry=r)
        self.retry_budget_remaining = Gauge("gateway_retry_budget_remaining",
                                            "Retries the retry budget still allows in its window",
                                            multiprocess_mode="livesum", registry=r)
        self.shed = Counter("gateway_shed_total", "Requests (or retries) refused to protect the gateway or a provider",
                            ["reason"], registry=r)
        for reason in SHED_REASONS:
            self.shed.labels(reason)
        self.client_disconnects = Counter("gateway_client_disconnects_total",
                                          "Requests whose client hung up before they were answered", registry=r)
        self.malformed_http = Counter("gateway_malformed_http_total",
                                      "Requests the HTTP parser refused before any handler", registry=r)
        self.in_flight = Gauge("gateway_in_flight_requests", "Payments and follow-ups being processed",
                               multiprocess_mode="livesum", registry=r)
        self.duplicates_suspected = Counter(
            "gateway_duplicate_charges_suspected_total",
            "Payments for which a status query found more than one charge", ["provider"], registry=r)
        self.reconciled = Counter("gateway_reconciled_total", "Payments settled by the reconciler", ["status"],
                                  registry=r)
        # What the reconciler still holds after its last pass (gateway.reconciler): a fleet sums
        # the counts (each replica leases its own rows) and takes the oldest.
        self.pending = Gauge("gateway_pending_payments",
                             "Payments (or follow-ups) awaiting the reconciler after its last pass",
                             multiprocess_mode="livesum", registry=r)
        self.pending_oldest_age = Gauge("gateway_pending_oldest_age_seconds",
                                        "Age of the oldest payment (or follow-up) awaiting the reconciler",
                                        multiprocess_mode="livemax", registry=r)
        # The journal (gateway.journal): readiness probe, and the PostgreSQL pool.
        self.journal_ready = Gauge("gateway_journal_ready", "1 while the journal takes writes (readiness probe)",
                                   multiprocess_mode="livemin", registry=r)
        self.journal_errors = Counter("gateway_journal_errors_total", "Journal operations that found it unavailable",
                                      ["kind"], registry=r)
        self.journal_pool_size = Gauge("gateway_journal_pool_connections", "PostgreSQL connections open",
                                       multiprocess_mode="livesum", registry=r)
        self.journal_pool_in_use = Gauge("gateway_journal_pool_in_use", "PostgreSQL connections in use",
                                         multiprocess_mode="livesum", registry=r)
        self.journal_pool_max = Gauge("gateway_journal_pool_max_connections", "PostgreSQL pool maximum size",
                                      multiprocess_mode="livesum", registry=r)
        self.journal_acquire = Histogram("gateway_journal_pool_acquire_seconds",
                                         "Wait for a PostgreSQL pool connection",
                                         buckets=(.0001, .0005, .001, .005, .01, .05, .1, .5, 1, 2.5, 5), registry=r)
        # Merchant notifications out (gateway.notifications): every delivery attempt, and what waits.
        self.notification_deliveries = Counter("gateway_notification_deliveries_total",
                                               "Merchant notification delivery attempts (delivered, failed, given_up)",
                                               ["outcome"], registry=r)
        self.notifications_pending = Gauge("gateway_notifications_pending",
                                           "Merchant notifications not yet delivered (the shared outbox)",
                                           multiprocess_mode="livemax", registry=r)
        # Breaker state shared through Redis (gateway.breaker_sync): optional, so degraded, never unready.
        self.breaker_sync_connected = Gauge("gateway_breaker_sync_connected",
                                            "1 while subscribed to the fleet's breaker state in Redis",
                                            multiprocess_mode="livemin", registry=r)
        # Provider quotas kept by the gateway (gateway.quota) and the router's demotions.
        self.quota_denied = Counter("gateway_quota_denied_total",
                                    "Provider requests not sent because the provider's quota had no token "
                                    "(skipped at routing or refused at the call)", ["provider"], registry=r)
        self.quota_spillovers = Counter("gateway_quota_spillovers_total",
                                        "Payments sent on to the next provider because this one was at its quota",
                                        ["provider"], registry=r)
        self.quota_shared = Gauge("gateway_quota_shared",
                                  "1 while the provider's quota bucket is shared in Redis, 0 while this process "
                                  "keeps its local share", ["provider"], multiprocess_mode="livemin", registry=r)
        self.latency_p99 = Gauge("gateway_provider_latency_p99_seconds",
                                 "p99 of the provider's recent authorisation calls (the router's latency window)",
                                 ["provider"], multiprocess_mode="livemax", registry=r)
        self.demotions = Counter("gateway_route_demotions_total",
                                 "Payments routed with this provider moved behind the others (success_rate, latency)",
                                 ["provider", "reason"], registry=r)
        self.breaker_sync_errors = Counter("gateway_breaker_sync_errors_total",
                                           "Breaker sync trouble (disconnect, publish, dropped, bad_message)",
                                           ["kind"], registry=r)

    def observe(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """`gauge` shows `read()`: at each scrape in one process, every refresh across workers."""
        if self.multiprocess_dir is None:
            gauge.set_function(read)
        else:
            self._refreshers.append(lambda: gauge.set(read()))

    def track_provider(self, provider: str, bulkhead: BulkheadReading) -> None:
        """A provider's series from the start: its breaker closed, its bulkhead read at each
        scrape (in flight, waiting, limit), its retry, suspected-duplicate and authorisation
        counters at 0."""
        self.breaker_state.labels(provider).set(BREAKER_STATES["closed"])
        self.retries.labels(provider)
        self.duplicates_suspected.labels(provider)
        self.attempt_latency.labels(provider)
        for outcome in Outcome:
            self.attempts.labels(provider, Operation.AUTHORIZE.value, outcome.value)
        self.observe(self.bulkhead_active.labels(provider), lambda: bulkhead.active)
        self.observe(self.bulkhead_waiting.labels(provider), lambda: bulkhead.waiting)
        self.bulkhead_max.labels(provider).set(bulkhead.max_concurrent)

    def track_quota(self, provider: str, shared: Callable[[], bool]) -> None:
        """A provider with a quota: its denial and spill-over counters at 0, its bucket's mode
        read at each scrape."""
        self.quota_denied.labels(provider)
        self.quota_spillovers.labels(provider)
        self.observe(self.quota_shared.labels(provider), lambda: 1.0 if shared() else 0.0)

    def track_latency(self, provider: str, p99_ms: Callable[[], float | None]) -> None:
        """The router's latency window of a provider, read at each scrape (0 while too few calls),
        and its demotion counters at 0."""
        for reason in DEMOTION_REASONS:
            self.demotions.labels(provider, reason)
        self.observe(self.latency_p99.labels(provider), lambda: (p99_ms() or 0.0) / 1000)

    def pending_seen(self, count: int, oldest_since: float | None, now: float) -> None:
        """The reconciler's pass left `count` unsettled, the oldest waiting since `oldest_since`."""
        self.pending.set(count)
        self.pending_oldest_age.set(0.0 if oldest_since is None else max(0.0, now - oldest_since))

    def track_transaction_log(self, *, write_errors: Callable[[], int], refused: Callable[[], int],
                              backlog: Callable[[], int], healthy: Callable[[], bool]) -> None:
        """Export the transaction log's own counters, read at each scrape (they are plain ints
        kept by the writer, which must not call into prometheus_client per line)."""
        if self.multiprocess_dir is None:
            self.registry.register(_TransactionLogCollector(write_errors, refused, backlog, healthy))
            return
        r = self.registry
        self._copy_count(Counter("gateway_txlog_write_errors", _WRITE_ERRORS_HELP, registry=r), write_errors)
        self._copy_count(Counter("gateway_txlog_refused_lines", _REFUSED_HELP, registry=r), refused)
        self.observe(Gauge("gateway_txlog_outbox_backlog", _BACKLOG_HELP, multiprocess_mode="livesum", registry=r),
                     backlog)
        self.observe(Gauge("gateway_txlog_writable", _WRITABLE_HELP, multiprocess_mode="livemin", registry=r),
                     lambda: 1 if healthy() else 0)

    def _copy_count(self, counter: Counter, read: Callable[[], int]) -> None:
        """Across workers: add what `read()` grew by since the last refresh."""
        counted = [0]

        def copy() -> None:
            now = read()
            counter.inc(now - counted[0])
            counted[0] = now

        self._refreshers.append(copy)

    def refresh(self) -> None:
        for refresh in self._refreshers:
            refresh()

    async def refresh_forever(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(interval_s)

    def breaker_changed(self, provider: str, _old: str, new: str) -> None:
        self.breaker_state.labels(provider).set(BREAKER_STATES.get(new, -1))
        self.breaker_changes.labels(provider, new).inc()

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.refresh()  # this worker's own readings are current; the others' at most one interval old
        host = CollectorRegistry()
        MultiProcessCollector(host, path=str(self.multiprocess_dir))
        return generate_latest(host)


_WRITE_ERRORS_HELP = "Failed transaction log disk operations (each is retried, no line is dropped)"
_REFUSED_HELP = ("Transaction lines the writer's full queue refused (kept in the journal's outbox, "
                 "written by a later sweep)")
_BACKLOG_HELP = "Transaction lines emitted and not yet on disk (held in the journal's outbox)"
_WRITABLE_HELP = "1 while the transaction log file can be written, else 0"


class _TransactionLogCollector:
    def __init__(self, write_errors: Callable[[], int], refused: Callable[[], int], backlog: Callable[[], int],
                 healthy: Callable[[], bool]) -> None:
        self._write_errors, self._refused, self._backlog, self._healthy = write_errors, refused, backlog, healthy

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("gateway_txlog_write_errors", _WRITE_ERRORS_HELP, value=self._write_errors())
        yield CounterMetricFamily("gateway_txlog_refused_lines", _REFUSED_HELP, value=self._refused())
        yield GaugeMetricFamily("gateway_txlog_outbox_backlog", _BACKLOG_HELP, value=self._backlog())
        yield GaugeMetricFamily("gateway_txlog_writable", _WRITABLE_HELP, value=1 if self._healthy() else 0)
