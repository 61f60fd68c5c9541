"""The certificate watcher: expiry metrics and warnings, routing around unusable client
certificates, and restart-free reloads of rotated pairs.

Every ``interval_s`` it:

* reads the certificate files in a thread (never blocking the event loop) and probes each HTTPS
  provider endpoint with a real handshake (`gateway.certs.check`);
* for each live pair (each provider's client certificate, the gateway's server certificate when
  given its server context) first completes a swap that a crashed `gateway certs rotate` or
  `rollback` left half done (`gateway.certs.swap`), then compares the files with what is
  loaded. Changed and usable now (key matches, within its validity dates) -> loaded into the
  live ``SSLContext`` with `reload_cert_chain`: new connections present it, connections in
  flight keep theirs. Changed but not usable -> not loaded, a warning once, the loaded pair
  stays in service;
* gives a provider context that trusts no CA yet (its bundle did not load at start) the bundle
  once it loads;
* reports a provider whose *loaded* client certificate is expired, not yet valid or unreadable,
  or whose context has no CA, as unusable through its ``on_certificate_problem`` callback (the
  composition root hands the provider pool's setter), so the router skips it before calls fail,
  and reports ``None`` once good files are loaded. The first pass reports every provider, so it
  also settles what the pool found when it built the contexts;
* exports ``gateway_certificate_expiry_seconds{provider,kind,subject}`` (seconds until
  not-after, negative once expired) and ``gateway_certificate_status{provider,kind}``
  (0 ok, 1 warn, 2 critical, 3 expired/not yet valid/invalid; the worst of the kind);
* logs one warning per certificate each time it crosses a threshold (30/14/7 days by default)
  or becomes expired/invalid: not on every tick. A new certificate (new serial) starts afresh.

An endpoint that does not answer keeps its last metric values (an outage is the breaker's
business, not a certificate problem) and is logged once until it answers again.

Changes are detected by content (SHA-256 of certificate and key), not by mtime, so a rotation
within the same second, or a copy that keeps the mtime, is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import ssl
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Gauge

from gateway.certs.check import (
    CLIENT_PROBLEM,
    GATEWAY,
    CertificateProblem,
    CertReport,
    Kind,
    PairFiles,
    Thresholds,
    collect_files,
    probe_provider_endpoints,
    rate_pair,
    unusable_reason,
)
from gateway.certs.inspect import CertStatus, inspect_pem
from gateway.certs.swap import PairLocation, SwapError, recover_unless_busy
from gateway.certs.tls import reload_cert_chain
from gateway.config import GatewayConfig
from gateway.metrics import Metrics

OpsLog = structlog.typing.FilteringBoundLogger

STATUS_VALUE = {CertStatus.OK: 0, CertStatus.WARN: 1, CertStatus.CRITICAL: 2, CertStatus.EXPIRED: 3,
                CertStatus.NOT_YET_VALID: 3, CertStatus.INVALID: 3}


class CertificateGauges:
    """The two certificate gauges on one registry, created once however many watchers use it."""

    _on: weakref.WeakKeyDictionary[CollectorRegistry, CertificateGauges] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.expiry = Gauge("gateway_certificate_expiry_seconds",
                            "Seconds until the certificate's not-after (negative once expired)",
                            ["provider", "kind", "subject"], multiprocess_mode="livemin", registry=registry)
        self.status = Gauge("gateway_certificate_status",
                            "Worst certificate of the kind: 0 ok, 1 warn, 2 critical, 3 expired/not yet valid/invalid",
                            ["provider", "kind"], multiprocess_mode="livemax", registry=registry)

    @classmethod
    def on(cls, registry: CollectorRegistry) -> CertificateGauges:
        gauges = cls._on.get(registry)
        if gauges is None:
            gauges = cls._on[registry] = cls(registry)
        return gauges


@dataclass(slots=True)
class _Slot:
    """One live pair: where its files are, the context it is loaded in, and what is loaded."""

    provider: str
    kind: Kind
    cert: Path
    key: Path
    ctx: ssl.SSLContext
    loaded_pem: bytes | None = None  # certificate currently in `ctx`, as far as we know
    loaded_digest: bytes | None = None  # `PairFiles.digest` of what was loaded
    refused_digest: bytes | None = None  # last changed pair we refused (warned about once)
    swap_error: str | None = None  # why an interrupted swap could not be completed (warned about once)


class CertificateWatcher:
    """See the module docstring. One per process; `run_forever` is its background task."""

    def __init__(self, config: GatewayConfig, client_contexts: Mapping[str, ssl.SSLContext], metrics: Metrics,
                 ops_log: OpsLog, *, on_certificate_problem: Callable[[str, str | None], None],
                 interval_s: float = 60.0, thresholds: Thresholds = Thresholds(),
                 server_ssl_context: ssl.SSLContext | None = None, probe_endpoints: bool = True,
                 probe_timeout_s: float = 3.0, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._config = config
        self._ops = ops_log
        self._gauges = CertificateGauges.on(metrics.registry)
        self._interval_s = interval_s
        self._thresholds = thresholds
        self._probe = probe_endpoints
        self._probe_timeout_s = probe_timeout_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._on_problem = on_certificate_problem
        self._problems: dict[str, str | None] = {}  # provider -> problem last reported
        self._contexts = dict(client_contexts)
        self._slots = _slots(config, client_contexts, server_ssl_context)
        self._slot_keys = {(slot.provider, slot.kind) for slot in self._slots}
        self._levels: dict[tuple[str, str, str], tuple[str, int]] = {}  # cert -> (serial, rank) last logged
        self._series: dict[tuple[str, str, str], tuple[str, str, str]] = {}  # cert -> expiry gauge labels
        self._unreachable: dict[str, str] = {}  # endpoint -> error already logged
        self.reports: list[CertReport] = []  # from the last run, for an admin endpoint

    async def run_once(self, *, probe_endpoints: bool | None = None) -> list[CertReport]:
        """One full pass; returns the reports (for each live pair: the pair in service)."""
        probe = self._probe if probe_endpoints is None else probe_endpoints
        async with self._lock:
            now = self._clock()
            await self._trust_missing_cas()
            reports = [await self._sync(slot, now) for slot in self._slots]
            reports += await asyncio.to_thread(collect_files, self._config, now=now, thresholds=self._thresholds,
                                               skip_pairs=self._slot_keys)
            if probe:
                reports += await probe_provider_endpoints(self._config, now=now, thresholds=self._thresholds,
                                                          timeout_s=self._probe_timeout_s)
            self._mark_providers(reports)
            self._export(reports, now)
            self._log_crossings(reports)
            self.reports = reports
            return reports

    async def reload_now(self) -> list[CertReport]:
        """Pick up rotated files at once (for an admin endpoint): files only, no endpoint probes."""
        return await self.run_once(probe_endpoints=False)

    async def run_forever(self, *, first_delay_s: float = 0.0) -> None:
        delay = first_delay_s
        while True:
            if delay > 0:
                await asyncio.sleep(delay)
            delay = self._interval_s
            try:
                await self.run_once()
            except Exception:  # one bad pass must not end the watch
                self._ops.exception("certificate_watch_failed")

    async def _sync(self, slot: _Slot, now: datetime) -> CertReport:
        """Load the pair on disk if it changed and is usable; report the pair in service."""
        await self._complete_interrupted_swap(slot)
        files = await asyncio.to_thread(PairFiles.read, slot.cert, slot.key)
        report = rate_pair(slot.provider, slot.kind, files, now=now, thresholds=self._thresholds)
        if files.digest == slot.loaded_digest:
            return report
        first = slot.loaded_digest is None
        problem = unusable_reason(report) or await self._load(slot, files)
        if problem is None:
            if not first:
                self._ops.info("certificate_reloaded", provider=slot.provider, kind=slot.kind, path=str(slot.cert),
                               serial=report.serial, subject=report.subject,
                               not_after=report.not_after.isoformat() if report.not_after else None)
            return report
        if first:  # the pool tried these very files at start, and they did not load either
            slot.loaded_pem, slot.loaded_digest = files.cert_pem, files.digest
            if unusable_reason(report) is None:  # they look right, yet do not load into the context
                return dataclasses.replace(report, status=CertStatus.INVALID, error=problem)
            return report
        if files.digest != slot.refused_digest:
            slot.refused_digest = files.digest
            self._ops.warning("certificate_not_loaded", provider=slot.provider, kind=slot.kind, path=str(slot.cert),
                              reason=problem, detail="the pair in service stays loaded")
        if slot.loaded_pem is None:
            return report
        info = inspect_pem(slot.loaded_pem, now=now, warn_days=self._thresholds.warn_days,
                           critical_days=self._thresholds.critical_days, path=str(slot.cert))
        return CertReport.from_info(slot.provider, slot.kind, str(slot.cert), info,
                                    error=f"the pair on disk is not loaded: {problem}")

    async def _complete_interrupted_swap(self, slot: _Slot) -> None:
        """A rotation killed between its renames leaves its intent behind: finish it, so the
        pair on disk is whole again (a mismatched pair is never loaded either way)."""
        location = PairLocation(slot.cert, slot.key)
        try:
            operation = await asyncio.to_thread(recover_unless_busy, location)
        except (OSError, SwapError) as exc:
            if str(exc) != slot.swap_error:
                slot.swap_error = str(exc)
                self._ops.warning("certificate_swap_incomplete", provider=slot.provider, kind=slot.kind,
                                  intent=str(location.intent), reason=str(exc),
                                  detail="run `gateway certs rotate` or `rollback` to complete it")
            return
        slot.swap_error = None
        if operation is not None:
            self._ops.warning("certificate_swap_completed", provider=slot.provider, kind=slot.kind,
                              path=str(slot.cert), operation=operation,
                              detail="a certificate command had stopped mid-way; its swap is now complete")

    async def _load(self, slot: _Slot, files: PairFiles) -> str | None:
        """Load exactly the bytes that were judged (a private copy, not the live paths, which
        may change again meanwhile). The load itself runs on the event loop thread on purpose:
        OpenSSL does not allow changing an SSL_CTX while another thread creates connections
        from it, and here every connection is created on this thread. It reads two files of a
        few kilobytes from a private temp directory."""
        assert files.cert_pem is not None and files.key_pem is not None
        staged = await asyncio.to_thread(_stage, files.cert_pem, files.key_pem)
        try:
            reload_cert_chain(slot.ctx, staged / "cert.pem", staged / "key.pem")
        except (ssl.SSLError, OSError) as exc:
            return f"does not load into the TLS context: {exc}"
        finally:
            await asyncio.to_thread(shutil.rmtree, staged, True)
        slot.loaded_pem, slot.loaded_digest = files.cert_pem, files.digest
        return None

    async def _trust_missing_cas(self) -> None:
        """Load the configured CA bundle into each provider context that has none (it did not
        load at start). Read in a thread; loaded on the loop thread, like `_load`."""
        for name, ctx in self._contexts.items():
            ca = self._config.providers[name].tls.ca
            if ca is None or ctx.get_ca_certs():
                continue
            try:
                pem = await asyncio.to_thread(ca.read_bytes)
                ctx.load_verify_locations(cadata=pem.decode("ascii"))
            except (OSError, ValueError):  # unreadable, not ASCII, no certificate: reported by collect_files
                continue
            self._ops.info("certificate_authority_loaded", provider=name, path=str(ca))

    def _mark_providers(self, reports: list[CertReport]) -> None:
        """Tell the pool each provider's problem when it changes, and every one on the first pass."""
        clients = {r.provider: r for r in reports if r.kind == "client"}
        for name, ctx in self._contexts.items():
            problem: str | None = None
            if self._config.providers[name].tls.ca is not None and not ctx.get_ca_certs():
                problem = CertificateProblem.CA_INVALID
            elif name in clients:
                problem = CLIENT_PROBLEM.get(clients[name].status)
            if name in self._problems and problem == self._problems[name]:
                continue
            if problem is not None or name in self._problems:
                log = self._ops.warning if problem else self._ops.info
                log("provider_certificate_state", provider=name, certificate_problem=problem,
                    usable_by_certificate=problem is None)
            self._problems[name] = problem
            self._on_problem(name, problem)

    def _export(self, reports: list[CertReport], now: datetime) -> None:
        worst: dict[tuple[str, str], int] = {}
        for r in reports:
            if not r.seen and r.kind == "endpoint":
                continue  # unreachable: keep the last known values
            key = (r.provider, r.kind, r.location)
            labels = (r.provider, r.kind, r.subject)
            old = self._series.get(key)
            if old is not None and old != labels:
                self._drop_series(key, old)
            if r.not_after is not None:
                self._gauges.expiry.labels(*labels).set((r.not_after - now).total_seconds())
                self._series[key] = labels
            elif old is not None and old == labels:
                self._drop_series(key, old)
            group = (r.provider, r.kind)
            worst[group] = max(worst.get(group, 0), STATUS_VALUE[r.status])
        for (provider, kind), value in worst.items():
            self._gauges.status.labels(provider, kind).set(value)

    def _drop_series(self, key: tuple[str, str, str], labels: tuple[str, str, str]) -> None:
        del self._series[key]
        if labels not in self._series.values():  # another certificate may share the labels
            with contextlib.suppress(KeyError):
                self._gauges.expiry.remove(*labels)

    def _log_crossings(self, reports: list[CertReport]) -> None:
        for r in reports:
            if not r.seen and r.kind == "endpoint":
                if self._unreachable.get(r.location) != r.error:
                    self._unreachable[r.location] = r.error or ""
                    self._ops.warning("certificate_probe_failed", provider=r.provider, endpoint=r.location,
                                      reason=r.error)
                continue
            if r.kind == "endpoint" and self._unreachable.pop(r.location, None) is not None:
                self._ops.info("certificate_probe_recovered", provider=r.provider, endpoint=r.location)
            key = (r.provider, r.kind, r.location)
            rank = self._thresholds.rank(r)
            previous = self._levels.get(key)
            self._levels[key] = (r.serial, rank)
            if rank > 0 and (previous is None or previous[0] != r.serial or rank > previous[1]):
                self._warn(r)

    def _warn(self, r: CertReport) -> None:
        fields = {"provider": r.provider, "kind": r.kind, "location": r.location, "subject": r.subject,
                  "serial": r.serial, "not_after": r.not_after.isoformat() if r.not_after else None}
        if r.status is CertStatus.EXPIRED:
            self._ops.warning("certificate_expired", **fields)
        elif r.status is CertStatus.NOT_YET_VALID:
            self._ops.warning("certificate_not_yet_valid", **fields,
                              not_before=r.not_before.isoformat() if r.not_before else None)
        elif r.status is CertStatus.INVALID:
            self._ops.warning("certificate_invalid", **fields, reason=r.error)
        else:
            self._ops.warning("certificate_expiring", **fields, status=r.status.value,
                              days_left=round(r.days_left, 1), threshold_days=self._thresholds.crossed(r.days_left))


def _slots(config: GatewayConfig, client_contexts: Mapping[str, ssl.SSLContext],
           server_ctx: ssl.SSLContext | None) -> list[_Slot]:
    slots = []
    for name, ctx in client_contexts.items():
        tls = config.providers[name].tls
        if tls.client_cert is not None and tls.client_key is not None:
            slots.append(_Slot(name, "client", tls.client_cert, tls.client_key, ctx))
    server_tls = config.server.tls
    if server_ctx is not None and server_tls is not None:
        slots.append(_Slot(GATEWAY, "server", server_tls.cert, server_tls.key, server_ctx))
    return slots


def _stage(cert_pem: bytes, key_pem: bytes) -> Path:
    """The pair in a fresh private directory (mkdtemp is 0700), for `reload_cert_chain`."""
    directory = Path(tempfile.mkdtemp(prefix="gateway-cert-"))
    (directory / "key.pem").write_bytes(key_pem)
    (directory / "cert.pem").write_bytes(cert_pem)
    return directory
