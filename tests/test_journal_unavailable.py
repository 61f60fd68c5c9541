"""Journal trouble is 503, not 500 (and not a hang): the real PostgreSQL behind a TCP forwarder
(tests/netfault.py) that the test takes away: refused and cut (down, restarting), or stalled
(hung). The store raises `JournalUnavailable`; the API answers 503 `journal_unavailable` with
Retry-After; `/readyz` is not ready while the journal probe fails and ready again once it
passes; start-up waits for a database that is down, bounded, and then says so in one line.
"""

from __future__ import annotations

import asyncio
import time
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.app_keys import JOURNAL_PROBE, STORE
from gateway.certs.devca import DevCertLayout
from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.drill.fleet_services import client_ports
from gateway.journal.postgres import PostgresStore
from gateway.journal.errors import JournalUnavailable
from tests.conftest import AUTH, card_payment, gateway_config_data
from tests.netfault import TcpProxy
from tests.conftest import PG_DSN, payment, pg_schema


def through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@127.0.0.1:{port}"))


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    upstream = urlsplit(PG_DSN)
    p = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5432)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def proxied_dsn(proxy: TcpProxy) -> AsyncIterator[str]:
    async with pg_schema() as dsn:
        yield through(dsn, proxy.port)


class Errors(list[str]):
    def __call__(self, kind: str) -> None:
        self.append(kind)


# -- configuration ---------------------------------------------------------------------------------------


def test_pool_settings_are_validated_with_their_field_path(tmp_path: Path, dev_certs: DevCertLayout,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PG_DSN", "postgresql://gateway:secret@127.0.0.1/gateway")
    nowhere = {name: SimpleNamespace(url="https://127.0.0.1:1") for name in ("stripe", "adyen", "checkout")}
    data = gateway_config_data(tmp_path, dev_certs, nowhere)  # type: ignore[arg-type]

    def storage(**pool: Any) -> GatewayConfig:
        return parse_config({**data, "storage": {"backend": "postgres", "postgres_pool": pool}})

    assert storage(min_size=0, max_size=1).storage.postgres_pool.max_size == 1
    with pytest.raises(ConfigError, match=r"^storage\.postgres_pool: min_size \(5\) must not exceed max_size \(2\)$"):
        storage(min_size=5, max_size=2)
    with pytest.raises(ConfigError, match=r"^storage\.postgres_pool\.acquire_timeout_s: Input should be greater"):
        storage(acquire_timeout_s=0)
    with pytest.raises(ConfigError, match=r"^storage\.postgres_pool\.max_size: "):
        storage(max_size=0)
    with pytest.raises(ConfigError, match=r"^storage\.postgres_pool\.pool_size: Extra inputs are not permitted"):
        storage(pool_size=3)
    defaults = parse_config(data).storage
    assert defaults.auto_migrate is True and defaults.start_wait_s == 30 and defaults.postgres_pool.max_size == 10


# -- the store -----------------------------------------------------------------------------------------


async def test_a_database_that_goes_away_is_journal_unavailable_and_comes_back(proxy: TcpProxy,
                                                                              proxied_dsn: str) -> None:
    errors = Errors()
    store = PostgresStore(proxied_dsn, min_size=1, max_size=2, connect_timeout_s=1, on_error=errors)
    await store.open()
    try:
        record = payment()
        await store.save_payment(record)

        await proxy.refuse()
        with pytest.raises(JournalUnavailable) as down:
            record.merchant_reference = "while-down"
            await store.save_payment(record)
        with pytest.raises(JournalUnavailable):
            await store.ping()

        assert str(down.value).startswith(f"PostgreSQL 127.0.0.1:{proxy.port}/gateway_test: ")
        assert "gateway:gateway" not in str(down.value)
        assert record.version == 1, "the failed write left the record as it was read"
        assert set(errors) == {"connection"}

        await proxy.restore()
        await store.ping()
        await store.save_payment(record)  # the pool reconnects: no restart needed
        got = await store.get_payment(record.id)
        assert got is not None and got.version == 2
    finally:
        await store.close()


async def test_sessions_terminated_under_load_are_journal_unavailable_never_anything_else() -> None:
    """`pg_terminate_backend` on the store's sessions while writes run (what an operator, a
    failover or the fleet drill does): asyncpg can be left mid-operation on such a session and
    fail the next statement, or the pool's reset, with InternalClientError; that was answered
    500 (9 in a 3,000-payment fleet drill). Every failure must be JournalUnavailable, and the
    pool recovers by itself."""
    errors = Errors()
    async with pg_schema() as dsn:
        store = PostgresStore(dsn, min_size=4, max_size=4, on_error=errors)
        await store.open()
        admin = await asyncpg.connect(PG_DSN, timeout=5)
        unexpected: list[BaseException] = []
        terminated = 0
        until = asyncio.get_running_loop().time() + 3.0

        async def writer() -> None:
            while asyncio.get_running_loop().time() < until:
                try:
                    await store.save_payment(payment())
                    record, now = payment(), time.time()  # a claim is a transaction block of its own
                    await store.claim_idempotency("checkout", record.id, "fp", record.id, now, now + 60, record=record)
                except JournalUnavailable:
                    pass
                except Exception as exc:  # noqa: BLE001 - what the test is looking for
                    unexpected.append(exc)

        async def terminator() -> None:
            nonlocal terminated
            while asyncio.get_running_loop().time() < until:
                ports = client_ports([os.getpid()], urlsplit(PG_DSN).port or 5432)
                terminated += await admin.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'payment-gateway' AND client_port = ANY($1::int[])", ports)
                await asyncio.sleep(0.05)

        try:
            await asyncio.gather(terminator(), *(writer() for _ in range(8)))
            assert terminated > 10 and "connection" in errors
            assert not unexpected, sorted({type(e).__name__ for e in unexpected})
            await store.save_payment(payment())  # and the pool works again, without a restart
        finally:
            await admin.close()
            await store.close()


async def test_a_hung_database_times_out_and_an_exhausted_pool_is_unavailable(proxy: TcpProxy,
                                                                             proxied_dsn: str) -> None:
    errors = Errors()
    store = PostgresStore(proxied_dsn, min_size=1, max_size=1, command_timeout_s=0.3, acquire_timeout_s=0.1,
                          on_error=errors)
    await store.open()
    try:
        proxy.stall()
        hung, queued = await asyncio.gather(store.save_payment(payment()), _after(0.05, store.get_payment("pay_x")),
                                            return_exceptions=True)

        assert isinstance(hung, JournalUnavailable) and "command timed out" in str(hung)
        assert isinstance(queued, JournalUnavailable) and "no pool connection free within 0.1 s" in str(queued)
        assert sorted(errors) == ["pool_exhausted", "timeout"]
        assert store.pool_stats().max_size == 1
    finally:
        await proxy.restore()
        await store.close()


async def _after(delay_s: float, work: Any) -> Any:
    await asyncio.sleep(delay_s)  # let the first operation take the only connection
    return await work


# -- the service -----------------------------------------------------------------------------------------


@pytest.fixture
def pg_config(make_config: Callable[..., GatewayConfig], proxied_dsn: str,
              monkeypatch: pytest.MonkeyPatch) -> Callable[..., GatewayConfig]:
    monkeypatch.setenv("GATEWAY_PG_DSN", proxied_dsn)

    def make(**storage: Any) -> GatewayConfig:
        return make_config(storage={"backend": "postgres", "probe_interval_s": 60,
                                    "postgres_pool": {"min_size": 1, "max_size": 4, "connect_timeout_s": 1,
                                                      "command_timeout_s": 2}, **storage})

    return make


def idem(n: int) -> dict[str, str]:
    return {**AUTH, "Idempotency-Key": f"journal-down-{n}-{os.urandom(4).hex()}"}


async def test_api_answers_503_and_readyz_goes_unready_while_the_journal_is_down(
        pg_config: Callable[..., GatewayConfig], start_gateway: Callable[[GatewayConfig], Any],
        proxy: TcpProxy) -> None:
    client: TestClient = await start_gateway(pg_config())
    probe = client.app[JOURNAL_PROBE]
    assert (await client.get("/readyz")).status == 200

    await proxy.refuse()
    paid = await client.post("/v1/payments", json=card_payment(), headers=idem(1))
    read = await client.get("/v1/payments/pay_missing", headers=AUTH)
    assert not await probe.check()
    ready = await client.get("/readyz")

    for resp in (paid, read):
        assert resp.status == 503 and resp.headers["Retry-After"] == "2"
        assert (await resp.json())["code"] == "journal_unavailable"
    assert ready.status == 503
    journal = (await ready.json())["journal"]
    assert journal["status"] == "unavailable" and journal["reason"].startswith(f"PostgreSQL 127.0.0.1:{proxy.port}")
    metrics = await (await client.get("/metrics")).text()
    assert "gateway_journal_ready 0.0" in metrics
    assert 'gateway_journal_errors_total{kind="connection"}' in metrics

    await proxy.restore()
    assert await probe.check()
    assert (await client.get("/readyz")).status == 200
    paid = await client.post("/v1/payments", json=card_payment(), headers=idem(2))
    assert paid.status == 201 and (await paid.json())["status"] == "approved"
    metrics = await (await client.get("/metrics")).text()
    assert "gateway_journal_ready 1.0" in metrics and "gateway_journal_pool_max_connections 4.0" in metrics
    assert "gateway_journal_pool_acquire_seconds_count" in metrics


async def test_readiness_probe_runs_on_its_own(pg_config: Callable[..., GatewayConfig],
                                               start_gateway: Callable[[GatewayConfig], Any],
                                               proxy: TcpProxy) -> None:
    client: TestClient = await start_gateway(pg_config(probe_interval_s=0.1))

    async def readiness_becomes(status: int) -> None:
        async with asyncio.timeout(5):  # the probe's own task notices: nobody calls check() here
            while (await client.get("/readyz")).status != status:
                await asyncio.sleep(0.05)

    await proxy.refuse()
    await readiness_becomes(503)
    await proxy.restore()
    await readiness_becomes(200)


async def test_start_up_waits_for_a_database_that_comes_up(pg_config: Callable[..., GatewayConfig],
                                                          aiohttp_client: Callable[..., Any],
                                                          proxy: TcpProxy) -> None:
    await proxy.refuse()
    app: web.Application = build_app(pg_config(start_wait_s=20), reconcile_interval_s=3600)

    async def database_comes_up() -> None:
        await asyncio.sleep(0.5)
        await proxy.restore()

    up = asyncio.create_task(database_comes_up())
    client: TestClient = await aiohttp_client(app)
    await up

    assert (await client.get("/readyz")).status == 200
    assert await client.app[STORE].get_payment("pay_none") is None


async def test_start_up_gives_up_after_start_wait_s(pg_config: Callable[..., GatewayConfig], proxy: TcpProxy) -> None:
    await proxy.refuse()
    app = build_app(pg_config(start_wait_s=0.3), reconcile_interval_s=3600)
    runner = web.AppRunner(app)

    with pytest.raises(JournalUnavailable, match=r"^journal unavailable at start-up: PostgreSQL 127\.0\.0\.1:\d+/"
                                                 r"gateway_test: .*; still unavailable after 0\.3 s "
                                                 r"\(storage\.start_wait_s\)$"):
        await runner.setup()
    await runner.cleanup()


def test_serve_with_the_database_down_says_so_in_one_line(tmp_path: Path) -> None:
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "gateway.yaml").read_text())
    data["storage"] = {"backend": "postgres", "start_wait_s": 0.5}
    data["log"] = {"dir": str(tmp_path / "logs")}
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "GATEWAY_KEY_CHECKOUT": "k1", "GATEWAY_KEY_REPORTING": "k2", "GATEWAY_KEY_ADMIN": "k3",
           "STRIPE_API_KEY": "s", "ADYEN_API_KEY": "a", "CHECKOUT_API_KEY": "c",
           "GATEWAY_PG_DSN": "postgresql://gateway:secret@127.0.0.1:1/gateway",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last == ("error: journal unavailable at start-up: PostgreSQL 127.0.0.1:1/gateway: Connection refused; "
                    "still unavailable after 0.5 s (storage.start_wait_s)")
    assert "Traceback" not in done.stderr and "secret" not in done.stderr
    assert "journal_unavailable_at_start" in done.stderr  # each retry is logged
