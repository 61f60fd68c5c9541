"""The check an on-call engineer runs the day before a peak sale.

Each check is a small function that returns findings; nothing here raises on a problem it is
looking for. A finding is an ``error`` (the sale is at risk: fix it first) or a ``warn`` (look at
it). What is checked:

* certificates (client, CA, the gateway's own, each provider endpoint's as served now): usable
  today and valid until the end of the window plus a margin;
* providers: a real TLS (mTLS) connection with the client context the gateway would use, and one
  harmless request on it that the real provider has: a status query for a reference that cannot
  exist (the mapping's STATUS operation, always a GET) where the provider has a lookup, else the
  mapping's own probe (Adyen, which has no lookup: `POST /paymentMethods`). No payment is ever
  sent;
* routes: a backup for every route, and backups able to take the route's currencies/countries;
* timing: the retry and timeout settings of a route's providers against ``engine.deadline_ms``,
  plus a few sanity checks of the resilience policy;
* stores: the journal takes a committed write; the log directory takes a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from gateway.certs.check import CertReport, Thresholds, collect
from gateway.certs.inspect import CertStatus
from gateway.config import EngineConfig, GatewayConfig, ProviderConfig
from providers.base import ProviderResponse, reachability_probe
from providers.classify import result_from_transport_error
from providers.errors import TransportError
from gateway.provider_pool import make_handle, provider_ssl_context
from providers.registry import KINDS

Severity = Literal["error", "warn"]
ERROR: Severity = "error"
WARN: Severity = "warn"

DEFAULT_WINDOW = timedelta(days=1)
DEFAULT_MARGIN = timedelta(days=7)
LONG_BREAKER_RESET_S = 300.0  # longer than this, a provider that recovered stays drained for minutes
_TLS_CODES = frozenset({"tls_handshake_failed", "tls_certificate_error"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem. ``id`` is stable for automation (``cert.expires``, ``provider.unreachable``…);
    ``subject`` names what is wrong (a provider, a route, a file) and ``message`` says why."""

    id: str
    severity: Severity
    subject: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# --- the window ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """The sale, in UTC. Certificates must stay valid until ``end`` plus the margin."""

    start: datetime
    end: datetime

    @classmethod
    def default(cls, now: datetime) -> Window:
        return cls(now, now + DEFAULT_WINDOW)

    @classmethod
    def parse(cls, text: str) -> Window:
        """``START/END`` in ISO 8601 (``2026-11-27T00:00Z/2026-11-28T23:59Z``); a time without a
        zone is UTC, and an END that is a bare date means the end of that day."""
        start_text, sep, end_text = text.partition("/")
        if not sep or not start_text.strip() or not end_text.strip():
            raise ValueError(f"expected START/END, e.g. 2026-11-27T00:00Z/2026-11-28T23:59Z; got {text!r}")
        start = _instant(start_text.strip(), end_of_day=False)
        end = _instant(end_text.strip(), end_of_day=True)
        if end <= start:
            raise ValueError(f"the window ends ({end:%Y-%m-%d %H:%M}Z) before it starts ({start:%Y-%m-%d %H:%M}Z)")
        return cls(start, end)

    def to_dict(self) -> dict[str, str]:
        return {"start": _iso(self.start), "end": _iso(self.end)}


def _instant(text: str, *, end_of_day: bool) -> datetime:
    try:
        if len(text) == 10 and "T" not in text:  # a bare date
            day = date.fromisoformat(text)
            at = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return at + timedelta(days=1) if end_of_day else at
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _when(at: datetime) -> str:
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


# --- certificates --------------------------------------------------------------------------------


def certificate_findings(reports: Iterable[CertReport], *, now: datetime, window: Window,
                         margin: timedelta) -> list[Finding]:
    """Every certificate must be usable now and until ``window.end + margin``.

    ``reports`` come from :func:`gateway.certs.check.collect` rated at ``now``; an endpoint that
    could not be reached at all is left to the provider check, which says why.
    """
    limit = window.end + margin
    findings = []
    for r in reports:
        subject = f"{r.provider} {r.kind} certificate"
        where = f" ({r.location})"
        if not r.seen:
            if r.kind != "endpoint":
                findings.append(Finding("cert.invalid", ERROR, subject, f"{r.error}{where}"))
            continue
        if r.status is CertStatus.INVALID:
            findings.append(Finding("cert.invalid", ERROR, subject, f"{r.error or 'invalid'}{where}"))
        elif r.status is CertStatus.EXPIRED and r.not_after is not None:
            findings.append(Finding("cert.expired", ERROR, subject, f"expired on {_when(r.not_after)}{where}"))
        elif r.not_after is not None and r.not_after < limit:
            before = "before the sale starts" if r.not_after < window.start else (
                "during the sale" if r.not_after < window.end else "within the margin after the sale")
            findings.append(Finding("cert.expires", ERROR, subject,
                                    f"expires {_when(r.not_after)}, {before} (must last until {_when(limit)}: "
                                    f"window end + {_days(margin)}){where}"))
        if r.not_before is not None and r.not_before > now:
            if r.not_before > window.start:
                findings.append(Finding("cert.not_yet_valid", ERROR, subject,
                                        f"valid only from {_when(r.not_before)}, after the sale starts{where}"))
            else:
                findings.append(Finding("cert.not_yet_valid", WARN, subject,
                                        f"not valid until {_when(r.not_before)}: anything using it before then "
                                        f"fails{where}"))
    return findings


def _days(delta: timedelta) -> str:
    days = delta.total_seconds() / 86_400
    return f"{days:g} day" + ("" if days == 1 else "s")


# --- providers -----------------------------------------------------------------------------------


def status_probe_reference() -> str:
    """A reference no payment has: the status query must find nothing."""
    return f"preflight_{secrets.token_urlsafe(12)}"


async def probe_provider(name: str, cfg: ProviderConfig) -> list[Finding]:
    """Connect as the gateway would (its client SSLContext, a fresh connection, so a real TLS
    handshake) and send one harmless request (`providers.base.reachability_probe`): a status
    query for a reference that does not exist, or, where the provider has no lookup, the
    mapping's probe. Never a request only our emulator answers: against the real provider that
    would fail for reasons that say nothing about the path.

    Any HTTP answer proves the path; 401/403 mean the provider refuses our API key and 5xx/429
    that it is unwell. A connect or TLS failure is the problem this check exists for.
    """
    subject = f"provider {name}"
    ctx, problem = await asyncio.to_thread(provider_ssl_context, cfg)
    if problem is not None:
        return [Finding("provider.tls_config", ERROR, subject,
                        f"cannot build the TLS client context: {problem.value} (tls.ca {cfg.tls.ca}, "
                        f"tls.client_cert {cfg.tls.client_cert}, tls.client_key {cfg.tls.client_key})")]
    handle = make_handle(name, cfg, EngineConfig(), tls=(ctx, None))
    request = reachability_probe(handle.mapping, status_probe_reference())
    if handle.mapping.has_status_lookup and (request.method != "GET" or request.body):
        # Never let a status query be anything but a read, whatever a mapping turns it into.
        return [Finding("provider.probe_unsafe", ERROR, subject,
                        f"its status query is {request.method} {request.path}"
                        f"{' with a body' if request.body else ''}; preflight sends only reads, so the provider "
                        "was not probed")]
    await handle.transport.start()
    try:  # the gateway's own transport (its error translation), with its per-try bound
        answer: ProviderResponse | TransportError = await handle.transport.send(request, handle.timeout_s)
    except TransportError as exc:
        answer = exc
    finally:
        await handle.transport.close()
    if isinstance(answer, TransportError):  # no HTTP answer
        result = result_from_transport_error(answer)
        detail = (result.message or "").removeprefix(f"{name}: ")
        if result.raw_code in _TLS_CODES:
            return [Finding("provider.tls_refused", ERROR, subject,
                            f"TLS/mTLS handshake with {cfg.base_url} failed: {detail} ({result.raw_code})")]
        refusal = await _tls_refusal(cfg.base_url, ctx, cfg.connect_timeout_ms / 1000) if ctx is not None else None
        if refusal is not None:
            ours = (f"our client certificate {cfg.tls.client_cert}" if cfg.tls.client_cert is not None
                    else "a session without a client certificate")
            return [Finding("provider.tls_refused", ERROR, subject,
                            f"{cfg.base_url} refuses our TLS session: {refusal}; it does not accept {ours}")]
        return [Finding("provider.unreachable", ERROR, subject, f"{cfg.base_url}: {detail} ({result.raw_code})")]
    status = answer.status
    what = "a status query" if handle.mapping.has_status_lookup else f"{request.method} {request.path}"
    if status in (401, 403):
        return [Finding("provider.auth_refused", ERROR, subject,
                        f"reachable, but answers HTTP {status} to {what}: our API key "
                        f"({cfg.api_key_env}) is refused")]
    if status == 429:
        return [Finding("provider.rate_limited", WARN, subject, f"reachable, but rate-limits {what} (HTTP 429)")]
    if status >= 500:
        return [Finding("provider.unhealthy", ERROR, subject,
                        f"reachable, but answers HTTP {status} to {what}")]
    return []


async def _tls_refusal(base_url: str, ctx: ssl.SSLContext, timeout_s: float) -> str | None:
    """How the server refuses our TLS session, if it does; None when it keeps it (or is down).

    Asked only after the probe failed without a TLS error. Under TLS 1.3 a server checks
    our client certificate after our side of the handshake is done, so an HTTP client sees its
    refusal as a plain disconnect (servers often drop the connection without an alert). Connect
    again with the same context, send nothing, and see whether the server hangs up on us.
    """
    url = urlsplit(base_url)
    host, port = url.hostname or "", url.port or 443
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    except ssl.SSLError as exc:
        return f"handshake failed: {exc.reason or exc}"
    except (ConnectionResetError, ConnectionAbortedError):
        return "it dropped the connection during the TLS handshake"
    except (OSError, TimeoutError):
        return None
    try:
        async with asyncio.timeout(min(max(timeout_s, 0.5), 2.0)):
            data = await reader.read(1)
        return None if data else "it closed the TLS session right after the handshake, before any request"
    except ssl.SSLError as exc:
        return f"alert after the handshake: {exc.reason or exc}"
    except (ConnectionResetError, ConnectionAbortedError):
        return "it reset the TLS session right after the handshake, before any request"
    except (OSError, TimeoutError):
        return None  # still open: the session was accepted
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await writer.wait_closed()


# --- routes: backups and what they can take ------------------------------------------------------


def _norm(values: Sequence[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v.upper() for v in values)


def route_backup_findings(config: GatewayConfig) -> list[Finding]:
    """Every route needs a second provider, and for each currency and country the route takes,
    at least two of its providers able to take it (order-free: weights may pick any first)."""
    findings = []
    for route in config.routes:
        subject = f"route {route.name}"
        providers = list(dict.fromkeys(route.providers))
        if len(providers) < 2:
            findings.append(Finding("route.no_backup", ERROR, subject,
                                    f"only {', '.join(providers)}: when it fails, payments fail"))
            continue
        for what, route_values, caps in (
            ("currency", _norm(route.match.currencies), {p: _norm(config.providers[p].currencies) for p in providers}),
            ("country", _norm(route.match.countries), {p: _norm(config.providers[p].countries) for p in providers}),
        ):
            findings.extend(_coverage(subject, what, route_values, caps))
    return findings


def return_url_findings(config: GatewayConfig) -> list[Finding]:
    """A route whose providers may answer with a shopper action (3-D Secure) decides what happens
    to a payment without a return URL: refused (`required`) or sent without asking for a
    redirect (`optional`). Without that decision a challenge can strand the shopper."""
    findings = []
    for route in config.routes:
        redirecting = [p for p in dict.fromkeys(route.providers) if config.providers[p].redirects
                       and KINDS[config.providers[p].kind].mapping_type().redirects]
        if redirecting and route.return_url is None:
            findings.append(Finding("route.no_return_url_policy", ERROR, f"route {route.name}",
                                    f"{', '.join(redirecting)} may send the shopper to authenticate (3-D Secure): "
                                    "set return_url: required or optional"))
    return findings


def _coverage(subject: str, what: str, route_values: frozenset[str] | None,
              caps: dict[str, frozenset[str] | None]) -> list[Finding]:
    findings = []
    anything = [p for p, c in caps.items() if c is None]
    if route_values is None:
        # The route takes any value: one outside every provider's list reaches only the
        # providers with no restriction.
        listed = sorted(set().union(*(c for c in caps.values() if c is not None)))
        if len(anything) < 2:
            takers = ", ".join(anything) or "none of its providers"
            findings.append(Finding("route.backup_cannot_take", ERROR, subject,
                                    f"takes any {what}, but only {takers} can take any {what} (the others only "
                                    f"{', '.join(listed)}): other {_plural(what)} have no backup"))
        values = listed
    else:
        values = sorted(route_values)
    for value in values:
        takers = [p for p, c in caps.items() if c is None or value in c]
        if len(takers) >= 2:
            continue
        if not takers:
            findings.append(Finding("route.backup_cannot_take", ERROR, subject,
                                    f"no provider on the route can take {what} {value}"))
        else:
            findings.append(Finding("route.backup_cannot_take", ERROR, subject,
                                    f"{what} {value}: only {takers[0]} can take it; no backup"))
    return findings


def _plural(what: str) -> str:
    return "currencies" if what == "currency" else "countries"


# --- timing: retries and timeouts against the deadline ------------------------------------------


@dataclass(frozen=True, slots=True)
class WorstCase:
    """The longest one provider can hold a payment before the engine moves on: every try runs
    into its timeout (the transport bounds connect and answer together by ``timeout_ms``) and
    every backoff takes its longest (exponential full jitter: ``min(max_delay, base * 2^n)``).
    A provider's ``Retry-After`` can stretch a backoff further; the deadline then cuts it."""

    tries: int
    timeout_ms: int
    backoff_ms: int

    @classmethod
    def of(cls, cfg: ProviderConfig) -> WorstCase:
        retry = cfg.retry
        backoff = sum(min(retry.max_delay_ms, retry.base_delay_ms * 2 ** n) for n in range(retry.max_attempts - 1))
        return cls(retry.max_attempts, cfg.timeout_ms, backoff)

    @property
    def ms(self) -> int:
        return self.tries * self.timeout_ms + self.backoff_ms

    def explain(self) -> str:
        return f"{self.tries} × {self.timeout_ms} ms + {self.backoff_ms} ms backoff = {self.ms} ms"


def deadline_findings(config: GatewayConfig) -> list[Finding]:
    """Walk each route's providers in order, adding up their worst cases against the deadline.

    Error: the first provider alone can outlast the deadline, so a hung primary is never failed
    over. Warn: the deadline runs out before failover reaches the route's last backup.
    """
    deadline = config.engine.deadline_ms
    findings = []
    for route in config.routes:
        subject = f"route {route.name}"
        total = 0
        for position, name in enumerate(route.providers):
            worst = WorstCase.of(config.providers[name])
            total += worst.ms
            if total <= deadline:
                continue
            if position == 0:
                findings.append(Finding(
                    "route.deadline_first", ERROR, subject,
                    f"{name} alone can take {worst.explain()}, more than engine.deadline_ms {deadline}: when it "
                    f"hangs, its last tries are cut off"
                    + (" and the payment never reaches a backup" if len(route.providers) > 1 else "")))
            else:
                before = total - worst.ms
                earlier, later = route.providers[:position], route.providers[position + 1:]
                verb = "hangs" if len(earlier) == 1 else "hang"
                findings.append(Finding(
                    "route.deadline_failover", WARN, subject,
                    f"if {', '.join(earlier)} {verb}, failover reaches {name} after {before} ms "
                    f"with {deadline - before} ms of engine.deadline_ms {deadline} left, less than its worst case "
                    f"({worst.explain()})" + (f"; {', '.join(later)} never gets a try" if later else "")))
            break
    return findings


def policy_findings(config: GatewayConfig) -> list[Finding]:
    """Settings that do nothing or work against the sale."""
    findings = []
    used = {p for route in config.routes for p in route.providers}
    engine = config.engine
    for name, cfg in config.providers.items():
        subject = f"provider {name}"
        if name not in used:
            findings.append(Finding("policy.unused_provider", WARN, subject,
                                    "no route sends it payments: a backup that was forgotten?"))
        if cfg.connect_timeout_ms >= cfg.timeout_ms:
            findings.append(Finding("policy.connect_timeout", WARN, subject,
                                    f"connect_timeout_ms {cfg.connect_timeout_ms} ≥ timeout_ms {cfg.timeout_ms}: "
                                    "the per-try timeout covers the connect too, so the connect timeout never "
                                    "fires and an unreachable provider costs a whole try"))
        if cfg.retry.max_delay_ms < cfg.retry.base_delay_ms:
            findings.append(Finding("policy.backoff", WARN, subject,
                                    f"retry.max_delay_ms {cfg.retry.max_delay_ms} < base_delay_ms "
                                    f"{cfg.retry.base_delay_ms}: every backoff is capped below its base"))
        if cfg.breaker.reset_timeout_s > LONG_BREAKER_RESET_S:
            findings.append(Finding("policy.breaker_reset", WARN, subject,
                                    f"breaker.reset_timeout_s {cfg.breaker.reset_timeout_s:g}: once open, the "
                                    f"provider stays drained for over {LONG_BREAKER_RESET_S / 60:g} minutes even "
                                    "after it recovers"))
        if cfg.retry.max_attempts > 1 and engine.retry_budget_ratio == 0 and engine.retry_budget_min_per_s == 0:
            findings.append(Finding("policy.retry_budget", WARN, subject,
                                    f"retry.max_attempts {cfg.retry.max_attempts}, but engine.retry_budget_ratio "
                                    "and retry_budget_min_per_s are 0: no retry is ever allowed"))
    return findings


# --- stores --------------------------------------------------------------------------------------


def _make_dirs(path: Path, created: list[Path]) -> None:
    """``mkdir -p`` that records what it created, so a probe can leave no trace."""
    missing = []
    at = path
    while not at.exists() and at != at.parent:
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        directory.mkdir()
        created.append(directory)


def _remove_created(created: list[Path]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


def sqlite_problem(path: Path) -> str | None:
    """Commit one write into a scratch table of the journal database, then drop it.

    A rollback would prove little: in WAL mode nothing reaches the disk before a commit. The
    gateway creates a missing database (and its directory) at start; if it is missing here, what
    the probe created is removed again. Blocking: call it in a thread.
    """
    existed = path.exists()
    created: list[Path] = []
    table = f"preflight_probe_{secrets.token_hex(4)}"
    try:
        if path.parent.exists() and not path.parent.is_dir():
            return f"{path}: {path.parent} is not a directory"
        _make_dirs(path.parent, created)
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock, as the gateway's writer takes it
            conn.execute(f"CREATE TABLE {table} (at TEXT NOT NULL)")
            conn.execute(f"INSERT INTO {table} VALUES (?)", (datetime.now(UTC).isoformat(),))
            conn.execute("COMMIT")
            conn.execute(f"DROP TABLE {table}")
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        return f"{path}: {exc}"
    finally:
        if not existed:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    Path(f"{path}{suffix}").unlink()
        _remove_created(created)
    return None


def log_dir_problem(directory: Path, file: str) -> str | None:
    """Create, write, fsync and remove a temporary file where the transaction log goes."""
    created: list[Path] = []
    try:
        _make_dirs(directory, created)
        fd, name = tempfile.mkstemp(prefix=".preflight-", dir=directory)
        try:
            os.write(fd, b"preflight\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
        log_file = directory / file
        if log_file.exists() and not log_file.is_file():
            return f"{log_file} exists and is not a regular file"
    except OSError as exc:
        return f"{directory}: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    finally:
        _remove_created(created)
    return None


async def postgres_problem(config: GatewayConfig) -> str | None:
    """Open the store the way start-up does (``make_store``: pool, schema), then write a payment
    row and an idempotency row in one transaction and roll it back: the INSERTs the gateway
    needs are allowed (not a read-only role, replica or session) without leaving anything that
    another replica's reconciler could see."""
    import asyncpg

    from gateway.app import make_store

    store = make_store(config)
    try:
        await store.open()
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises, its message is the finding
        return f"cannot open: {type(exc).__name__}: {exc}"
    await store.close()
    reference = status_probe_reference()
    try:
        conn = await asyncpg.connect(config.storage.postgres_dsn.get_secret_value(), timeout=5)
    except Exception as exc:  # noqa: BLE001 - as above
        return f"cannot connect: {type(exc).__name__}: {exc}"
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("INSERT INTO payments (id, status, created_at, updated_at, doc) "
                               "VALUES ($1, 'failed', 0, 0, ''::bytea)", reference)
            await conn.execute("INSERT INTO idempotency (scope, key, fingerprint, resource_id, state, created_at, "
                               "expires_at) VALUES ('preflight', $1, '', $1, 'done', 0, 0)", reference)
        finally:
            await transaction.rollback()
    except asyncpg.PostgresError as exc:
        return f"a write is refused: {type(exc).__name__}: {exc}"
    finally:
        await conn.close()
    return None


async def store_findings(config: GatewayConfig) -> list[Finding]:
    findings = []
    storage = config.storage
    if storage.backend == "sqlite":
        problem = await asyncio.to_thread(sqlite_problem, Path(storage.sqlite_path))
        subject = "storage.sqlite_path"
    else:
        problem = await postgres_problem(config)
        subject = f"storage.postgres ({storage.postgres_dsn_env})"
    if problem is not None:
        findings.append(Finding("store.not_writable", ERROR, subject, f"the journal cannot be written: {problem}"))
    log = config.log
    problem = await asyncio.to_thread(log_dir_problem, Path(log.dir), log.file)
    if problem is not None:
        findings.append(Finding("log.not_writable", ERROR, "log.dir", f"the transaction log cannot be written: "
                                                                       f"{problem}"))
    return findings


# --- the whole run -------------------------------------------------------------------------------


@dataclass
class PreflightReport:
    window: Window
    margin: timedelta
    findings: list[Finding]
    checked: dict[str, int] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)  # checks that crashed: the answer is unknown

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARN]

    def exit_code(self, *, strict: bool = False) -> int:
        """0 clean (warnings allowed unless ``strict``), 1 a problem, 2 a check could not run."""
        if self.incomplete:
            return 2
        return 1 if self.errors or (strict and self.warnings) else 0

    def to_dict(self, *, strict: bool = False) -> dict[str, Any]:
        code = self.exit_code(strict=strict)
        return {
            "ok": code == 0,
            "exit_code": code,
            "window": self.window.to_dict(),
            "margin_days": self.margin.total_seconds() / 86_400,
            "valid_until": _iso(self.window.end + self.margin),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "checked": self.checked,
            "incomplete": self.incomplete,
            "findings": [f.to_dict() for f in self.findings],
        }


async def run_preflight(config: GatewayConfig, *, window: Window, margin: timedelta = DEFAULT_MARGIN,
                        now: datetime | None = None, probe_timeout_s: float = 3.0) -> PreflightReport:
    """Every check, the network and disk ones concurrently; one crashing check never hides the rest."""
    now = now or datetime.now(UTC)
    incomplete: list[str] = []
    reports: list[CertReport] = []

    async def guarded(name: str, check: Callable[[], Awaitable[list[Finding]]]) -> list[Finding]:
        try:
            return await check()
        except Exception as exc:  # noqa: BLE001 - a bug in one check must not hide the others
            incomplete.append(name)
            return [Finding("preflight.check_failed", ERROR, name, f"the check could not run: "
                                                                   f"{type(exc).__name__}: {exc}")]

    async def certificates() -> list[Finding]:
        reports.extend(await collect(config, now=now, timeout_s=probe_timeout_s, thresholds=Thresholds()))
        return certificate_findings(reports, now=now, window=window, margin=margin)

    async def providers() -> list[Finding]:
        found = await asyncio.gather(*(probe_provider(name, cfg) for name, cfg in config.providers.items()))
        return [f for group in found for f in group]

    async def config_only() -> list[Finding]:
        return (route_backup_findings(config) + deadline_findings(config) + policy_findings(config)
                + return_url_findings(config))

    groups = await asyncio.gather(
        guarded("certificates", certificates),
        guarded("providers", providers),
        guarded("configuration", config_only),
        guarded("stores", lambda: store_findings(config)),
    )
    findings = [f for group in groups for f in group]
    findings.extend(_unreadable_endpoints(reports, findings))
    findings.sort(key=lambda f: (f.severity != ERROR, f.id, f.subject))
    checked = {"certificates": len(reports), "providers": len(config.providers), "routes": len(config.routes),
               "stores": 2}
    return PreflightReport(window, margin, findings, checked, incomplete)


def _unreadable_endpoints(reports: Iterable[CertReport], findings: Sequence[Finding]) -> list[Finding]:
    """An endpoint whose certificate could not be read is normally down or refusing us, which the
    provider check already reports; say it here only when that check found nothing."""
    flagged = {f.subject.removeprefix("provider ") for f in findings if f.id.startswith("provider.")}
    return [Finding("cert.endpoint_unreadable", ERROR, f"{r.provider} endpoint certificate",
                    f"{r.error} ({r.location})")
            for r in reports if r.kind == "endpoint" and not r.seen and r.provider not in flagged]
