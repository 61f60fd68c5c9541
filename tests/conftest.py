"""Shared fixtures and helpers: real dev certificates, real emulators over mTLS, the real gateway
app, both journal backends, and the guard that fails any async test whose gateway code blocks the
event loop.

Everything more than one test module uses lives here; test modules import helpers from here and
never from each other. A gateway configuration for a test is built one way:
`gateway_config_data` (or `engine_config_data`, its preset for free provider names of one kind).
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import os
import sqlite3
import sys
import traceback
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import blockbuster.blockbuster
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from blockbuster import BlockBuster

from gateway.api.payments import new_payment_id
from gateway.app import build_app
from gateway.app_keys import LOG_WRITER, STORE
from gateway.certs.devca import DevCertLayout, generate_dev_certs
from gateway.config import GatewayConfig, parse_config
from gateway.drill.fleet_services import postgres_schema
from gateway.emulator_launch import start_emulator
from gateway.journal.postgres import PostgresStore
from domain.cards import luhn_valid
from domain.outcome import PaymentStatus
from gateway.journal.records import PaymentRecord
from gateway.journal.sqlite import SqliteStore
from emulators.faults import FaultPlan, FaultRule
from emulators.ledger import LedgerEntry
from emulators.server import EmulatorServer
from providers.registry import KINDS

CHECKOUT_KEY = "test-checkout-key"
READER_KEY = "test-reporting-key"
PROVIDER_KEYS = {"stripe": "sk_test_gateway", "adyen": "adyen_test_key", "checkout": "sk_sbox_gateway"}
# Free provider names of one kind (Stripe emulators), for the engine's failover scenarios.
PROVIDER_NAMES = ("primary", "backup", "third")
AUTH = {"Authorization": f"Bearer {CHECKOUT_KEY}"}
# Soft declines that may cascade, in each provider's own codes (Stripe, Adyen, Checkout.com).
CASCADE_ON = ["do_not_honor", "issuer_not_available", "2:05", "9", "20005", "20068", "20091"]
PG_DSN = os.environ.get("GATEWAY_TEST_PG_DSN", "postgresql://gateway:gateway@127.0.0.1:5432/gateway_test")


# -- no blocking call on the event loop (DESIGN) ---------------------------------------------------

# A blocking call is the gateway's when gateway code running on the loop makes it: a coroutine of
# these packages (a handler, a cleanup context, a background task) is on the stack between the
# call and the test. A test calling a synchronous function of theirs from its own body (a CLI
# command through CliRunner, `analyze()`, dev certificates for its setup) blocks for itself: that
# is test-side setup, allowed.
SCANNED = ("gateway", "providers", "emulators", "domain")
_TESTS = str(Path(__file__).resolve().parent) + os.sep
_ASYNC_CODE = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


@pytest.fixture(autouse=True)
def _no_blocking_on_the_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In every async test (its fixtures included), a blocking call on the event loop's thread
    (sync file I/O, sqlite, time.sleep, a blocking socket, a contended threading lock...) made
    by gateway code raises `BlockingError` where it is made, and fails the test even where a
    broad `except` (a background task's) swallows that error."""
    if request.node.get_closest_marker("asyncio") is None:
        yield
        return
    seen: list[str] = []

    class RecordedBlockingError(blockbuster.BlockingError):
        def __init__(self, func: str) -> None:
            super().__init__(func)
            seen.append(f"{func}\n{''.join(traceback.format_stack(limit=30)[:-1])}")

    monkeypatch.setattr(blockbuster.blockbuster, "BlockingError", RecordedBlockingError)
    guard = BlockBuster(list(SCANNED))
    _allow_justified_blocking(guard)
    guard.activate()
    try:
        yield
    finally:
        guard.deactivate()
    if seen:
        pytest.fail("blocking call on the event loop:\n" + "\n".join(seen), pytrace=False)


def _allow_justified_blocking(guard: BlockBuster) -> None:
    """The exceptions, each with its reason.

    Not seen by the guard at all, and kept on purpose: the certificate watcher's load of a
    rotated pair into the live SSLContext on the loop thread (gateway/certs/watcher.py `_load`:
    OpenSSL forbids changing an SSL_CTX while another thread creates connections from it; two
    files of a few kB from a private temp directory), and the emulators' equivalent. OpenSSL
    reads those files in C, below anything blockbuster patches."""
    scanned = tuple(str(Path(importlib.import_module(name).__path__[0])) + os.sep for name in SCANNED)

    def test_side(*_args: Any, **_kwargs: Any) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(_TESTS):
                return True
            if frame.f_code.co_flags & _ASYNC_CODE and filename.startswith(scanned):
                return False
            frame = frame.f_back
        return False

    for function in guard.functions.values():
        own = function.can_block_predicate
        function.can_block_predicate = lambda *a, _own=own, **k: _own(*a, **k) or test_side()
    for name in ("io.TextIOWrapper.write", "io.BufferedWriter.write"):
        # The ops logger writes one locked line per event (gateway/txlog/logger.py): events are
        # rare (start-up, breaker changes, certificate warnings, operator audits), never one per
        # payment, and its stream is stderr in production (which blockbuster itself exempts);
        # drills and tests point it at a file.
        guard.functions[name].can_block_in("structlog/_output.py", "msg")
    for name in ("os.stat", "os.path.abspath", "io.BufferedReader.read", "io.TextIOWrapper.read"):
        # asyncpg looks for ~/.pgpass and ~/.postgresql/* while it parses connection arguments,
        # for every new pool connection; it has no asynchronous way to do that.
        guard.functions[name].can_block_in("asyncpg/connect_utils.py", "_parse_connect_dsn_and_args")
    metadata = ("os.stat", "os.listdir", "os.scandir", "os.path.abspath", "io.BufferedReader.read",
                "io.TextIOWrapper.read")
    for name in metadata:
        # A module imported lazily reads its files once per process (duckdb's version metadata).
        guard.functions[name].can_block_in("<frozen importlib._bootstrap>", "_find_and_load")
        # redis-py reads its own version from its package metadata for every new connection
        # (CLIENT SETINFO); breaker sync opens two, at start and on reconnect, never per payment.
        guard.functions[name].can_block_in("redis/utils.py", "get_lib_version")
    # The drills' harness (gateway/drill, the lead's) sets up before it loads the gateway: the run's
    # log directory, the crash drill's config file and its gateway process's log (that gateway is
    # another process, so its loop is never the one blocked).
    for name in ("os.stat", "os.path.abspath", "os.mkdir"):
        guard.functions[name].can_block_in("gateway/drill/runner.py", "new")
    for name in ("io.TextIOWrapper.write", "io.BufferedWriter.write"):
        guard.functions[name].can_block_in("gateway/drill/crash.py", "run_crash_drill")
        guard.functions[name].can_block_in("gateway/drill/process.py", "start")


# -- certificates, secrets, emulators ---------------------------------------------------------------


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertLayout:
    return generate_dev_certs(tmp_path_factory.mktemp("certs"), sorted(KINDS))


# The shipped config's webhook signing keys (config/dev.env), so a test may start from it.
SHIPPED_WEBHOOK_KEYS = {
    name: value
    for name, _, value in (line.partition("=") for line in (Path(__file__).resolve().parents[1] / "config" /
                                                            "dev.env").read_text().splitlines())
    if name.endswith(("_WEBHOOK_KEY", "_HMAC_KEY"))
}


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SHIPPED_WEBHOOK_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_KEY_CHECKOUT", CHECKOUT_KEY)
    monkeypatch.setenv("GATEWAY_KEY_REPORTING", READER_KEY)
    for kind, key in PROVIDER_KEYS.items():
        monkeypatch.setenv(f"{kind.upper()}_API_KEY", key)
    for name in PROVIDER_NAMES:
        monkeypatch.setenv(f"{name.upper()}_API_KEY", f"sk_test_{name}")


@pytest.fixture
async def emulators(dev_certs: DevCertLayout) -> AsyncIterator[dict[str, EmulatorServer]]:
    """One emulator of each kind, named by its kind."""
    async with _emulators(dev_certs, {kind: kind for kind in sorted(KINDS)}) as servers:
        yield servers


@pytest.fixture
async def stripes(dev_certs: DevCertLayout) -> AsyncIterator[dict[str, EmulatorServer]]:
    """Three independent Stripe emulators over mTLS, one per provider name of PROVIDER_NAMES."""
    async with _emulators(dev_certs, {name: "stripe" for name in PROVIDER_NAMES}) as servers:
        yield servers


@asynccontextmanager
async def _emulators(certs: DevCertLayout, kinds: dict[str, str]) -> AsyncIterator[dict[str, EmulatorServer]]:
    servers: dict[str, EmulatorServer] = {}
    try:
        for name, kind in kinds.items():
            servers[name] = await start_emulator(kind, certs=certs)
        yield servers
    finally:
        for server in servers.values():
            await server.stop()


# -- the gateway's configuration: built one way ----------------------------------------------------


def gateway_config_data(tmp_path: Path, certs: DevCertLayout, servers: Mapping[str, Any],
                        order: tuple[str, ...] = ("stripe", "adyen", "checkout"), *, kind: str | None = None,
                        every_provider: dict[str, Any] | None = None, providers: dict[str, dict[str, Any]] | None = None,
                        route: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A gateway config document for a test: one provider per name in `order`, at
    `servers[name].url` (an emulator, or anything with a `url`), of kind `kind` or else of its
    own name, keyed from `<NAME>_API_KEY`; the journal and logs under `tmp_path`; one route,
    `default`, through `order`.

    Changes deep-merge (a list is replaced whole): `every_provider` into each provider,
    `providers={name: {...}}` into one, `route` into the default route, and any other section
    (`engine=`, `storage=`, `auth=`, `routes=` ...) into the document."""
    provider_docs = {}
    for name in order:
        provider_kind = kind or name
        doc = {
            "kind": provider_kind,
            "base_url": servers[name].url,
            "api_key_env": f"{name.upper()}_API_KEY",
            "merchant_account": "GatewayTestECOM",
            "connect_timeout_ms": 300,
            "timeout_ms": 1000,
            "tls": {"ca": str(certs.provider_ca(provider_kind)), "client_cert": str(certs.client_cert(provider_kind)),
                    "client_key": str(certs.client_key(provider_kind))},
            "breaker": {"fail_max": 3, "reset_timeout_s": 30},
            "retry": {"max_attempts": 2, "base_delay_ms": 5, "max_delay_ms": 20},
        }
        provider_docs[name] = _merge(_merge(doc, every_provider or {}), (providers or {}).get(name, {}))
    data: dict[str, Any] = {
        "auth": {"clients": [
            {"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"},
            {"name": "reporting", "key_env": "GATEWAY_KEY_REPORTING", "permissions": ["payments:read"]},
        ]},
        "storage": {"sqlite_path": str(tmp_path / "data" / "gateway.db")},
        "log": {"dir": str(tmp_path / "logs")},
        "engine": {"deadline_ms": 5000},
        "providers": provider_docs,
        # return_url optional: a payment without one is sent without asking for a redirect (3-D Secure)
        "routes": [_merge({"name": "default", "providers": list(order), "cascade_on": CASCADE_ON,
                           "return_url": "optional"}, route or {})],
    }
    return _merge(data, sections)


# The engine's scenarios: a breaker that only trips when a test sets it to, retries without waiting.
ENGINE_PROVIDER = {"breaker": {"fail_max": 100}, "retry": {"base_delay_ms": 1, "max_delay_ms": 5}}


def engine_config_data(tmp_path: Path, certs: DevCertLayout, servers: Mapping[str, Any], order: tuple[str, ...],
                       **changes: Any) -> dict[str, Any]:
    """`gateway_config_data` for free provider names of kind stripe (PROVIDER_NAMES, `stripes`)."""
    return gateway_config_data(tmp_path, certs, servers, order, kind="stripe",
                               every_provider=_merge(ENGINE_PROVIDER, changes.pop("every_provider", {})), **changes)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def make_config(tmp_path: Path, dev_certs: DevCertLayout,
                emulators: dict[str, EmulatorServer]) -> Callable[..., GatewayConfig]:
    """`make(**gateway_config_data changes)` over `emulators`."""
    def make(**kwargs: Any) -> GatewayConfig:
        return parse_config(gateway_config_data(tmp_path, dev_certs, emulators, **kwargs))

    return make


@pytest.fixture
def engine_config(tmp_path: Path, dev_certs: DevCertLayout,
                  stripes: dict[str, EmulatorServer]) -> Callable[..., GatewayConfig]:
    """`make(order=("primary", "backup"), **engine_config_data changes)` over `stripes`."""
    def make(order: tuple[str, ...] = ("primary", "backup"), **kwargs: Any) -> GatewayConfig:
        return parse_config(engine_config_data(tmp_path, dev_certs, stripes, order, **kwargs))

    return make


@pytest.fixture
def start_gateway(aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    """`start(config, **build_app_kwargs)`: the gateway on a test server (no reconciler pass
    during the test unless asked for)."""
    async def start(config: GatewayConfig, **kwargs: Any) -> TestClient:
        app: web.Application = build_app(config, **{"reconcile_interval_s": 3600, **kwargs})
        return await aiohttp_client(app)

    return start


# -- requests and what they left behind -------------------------------------------------------------


def luhn_complete(body: str) -> str:
    """Append the check digit that makes `body` Luhn-valid."""
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def card_payment(number: str = "4242424242424242", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": 1299, "currency": "EUR", "merchant_reference": "order-1",
        "payment_method": {"type": "card", "number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"},
    }
    body.update(extra)
    return body


def idem() -> dict[str, str]:
    return {**AUTH, "Idempotency-Key": str(uuid.uuid4())}


async def pay(client: TestClient, body: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/payments", json=body or card_payment(), headers=headers or idem())
    return resp.status, await resp.json()


async def journal(client: TestClient, payment_id: str) -> PaymentRecord:
    record = await client.app[STORE].get_payment(payment_id)
    assert record is not None, f"{payment_id} has no journal row"
    return record


async def txlog(client: TestClient, payment_id: str | None = None) -> list[dict[str, Any]]:
    """Transaction log lines, after waiting for the writer to flush what was queued."""
    writer = client.app[LOG_WRITER]
    assert await writer.wait_flushed()
    if not writer.path.exists():
        return []
    lines = [orjson.loads(line) for line in writer.path.read_bytes().splitlines() if line.strip()]
    return [line for line in lines if payment_id is None or line.get("payment_id") == payment_id]


def entries(server: EmulatorServer, payment_id: str) -> list[LedgerEntry]:
    return server.emulator.ledger.find_by_ref(payment_id)


def charges(server: EmulatorServer, payment_id: str) -> list[LedgerEntry]:
    return [e for e in entries(server, payment_id) if e.approved]


def steps(doc: dict[str, Any]) -> list[tuple[str, int, str, str | None]]:
    """(provider, try, operation, outcome) of every attempt in an API document."""
    return [(a["provider"], a["try"], a["operation"], a["outcome"]) for a in doc["attempts"]]


def set_faults(server: EmulatorServer, *rules: FaultRule, seed: int | None = None) -> None:
    server.emulator.faults.set(FaultPlan(rules=rules, seed=seed))


async def metrics_text(client: TestClient) -> str:
    return await (await client.get("/metrics")).text()


# -- journal backends: SQLite in a temporary file, PostgreSQL in a schema of its own ----------------


def pg_schema() -> AbstractAsyncContextManager[str]:
    """A DSN whose tables live in a schema of their own, dropped afterwards (the drills' own)."""
    return postgres_schema(PG_DSN, prefix="gw_test")


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with pg_schema() as dsn:
        yield dsn


@dataclass(frozen=True)
class Database:
    """Where a journal lives, picklable so a child process can open its own store on it."""

    kind: str
    where: str  # the SQLite file, or the DSN of a schema of its own

    def store(self) -> SqliteStore | PostgresStore:
        if self.kind == "sqlite":
            return SqliteStore(Path(self.where))
        return PostgresStore(self.where, min_size=1, max_size=2)


@dataclass
class Backend:
    kind: str
    store: SqliteStore | PostgresStore
    new_store: Callable[[], SqliteStore | PostgresStore]  # another store on the same database (a replica)
    execute: Callable[[str], Awaitable[None]]  # DDL through a separate connection
    stored: Callable[[], Awaitable[bytes]]  # every byte the database holds for the journal, as it is now


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """An open store of each kind."""
    if request.param == "sqlite":
        async with _opened(sqlite_backend(tmp_path / "journal.db")) as opened:
            yield opened
    else:
        async with pg_schema() as dsn, _opened(postgres_backend(dsn)) as opened:
            yield opened


def sqlite_backend(path: Path) -> Backend:
    async def execute(sql: str) -> None:
        def run() -> None:
            conn = sqlite3.connect(path)
            try:
                conn.executescript(sql)
            finally:
                conn.close()

        await asyncio.to_thread(run)

    async def stored() -> bytes:
        """The database file and its write-ahead log, byte for byte."""
        files = (path, path.with_name(path.name + "-wal"))
        return b"".join([await asyncio.to_thread(p.read_bytes) for p in files if p.exists()])

    return Backend("sqlite", SqliteStore(path), lambda: SqliteStore(path), execute, stored)


def postgres_backend(dsn: str) -> Backend:
    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def new_store() -> PostgresStore:
        return PostgresStore(dsn, min_size=1, max_size=5)

    async def stored() -> bytes:
        """Every column of every journal table (the server's own files are out of reach)."""
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            out = []
            for table in ("payments", "idempotency", "outbox"):
                for row in await conn.fetch(f"SELECT * FROM {table}"):
                    out += [v if isinstance(v, bytes) else str(v).encode() for v in row.values()]
            return b"\n".join(out)
        finally:
            await conn.close()

    return Backend("postgres", new_store(), new_store, execute, stored)


@asynccontextmanager
async def _opened(backend: Backend) -> AsyncIterator[Backend]:
    await backend.store.open()
    try:
        yield backend
    finally:
        await backend.store.close()


# A trigger that makes the database itself refuse one payment write (pay_boom turning approved):
# atomicity is shown with a statement that fails for real, never with a mock.
REFUSE_APPROVED_BOOM = {
    "sqlite": """
        CREATE TRIGGER refuse_boom_insert BEFORE INSERT ON payments
        WHEN NEW.id = 'pay_boom' AND NEW.status = 'approved' BEGIN SELECT RAISE(ABORT, 'refused by test'); END;
        CREATE TRIGGER refuse_boom_update BEFORE UPDATE ON payments
        WHEN NEW.id = 'pay_boom' AND NEW.status = 'approved' BEGIN SELECT RAISE(ABORT, 'refused by test'); END;
    """,
    "postgres": """
        CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'refused by test'; END $$;
        CREATE TRIGGER refuse_boom BEFORE INSERT OR UPDATE ON payments FOR EACH ROW
            WHEN (NEW.id = 'pay_boom' AND NEW.status = 'approved') EXECUTE FUNCTION refuse_boom();
    """,
}
DB_ERRORS = (sqlite3.Error, asyncpg.PostgresError)


STORE_SCOPE = "checkout"  # the scope the store tests claim keys in


def payment(payment_id: str | None = None, status: PaymentStatus = PaymentStatus.RECEIVED,
            updated_at: float | None = None, **extra: object) -> PaymentRecord:
    now = time.time()
    return PaymentRecord(id=payment_id or new_payment_id(), client=STORE_SCOPE, amount=1299, currency="EUR",
                         capture=True, merchant_reference="order-1", status=status, created_at=now,
                         updated_at=updated_at if updated_at is not None else now, **extra)  # type: ignore[arg-type]
