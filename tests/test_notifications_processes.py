"""Merchant notifications with real gateway processes (`gateway serve`):

- two gateways on one PostgreSQL journal (leases, SKIP LOCKED), or the two workers of one
  `serve --workers 2` on one SQLite file (its write lock), deliver each event once between
  them, both taking part;
- a gateway SIGKILLed mid-delivery sends the same event again after its restart (at least once);
- a gateway SIGKILLed after a payment settled (the event committed with it) but before the
  event was delivered delivers it after its restart, once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from domain.outcome import PaymentStatus
from emulators.faults import FaultRule
from gateway.drill.process import GatewayProcess, free_port
from gateway.journal.postgres import PostgresStore
from gateway.journal.sqlite import SqliteStore
from gateway.notifications.events import Settling
from gateway.notifications.outbox import NotificationOutbox
from tests.conftest import AUTH, card_payment, engine_config_data, idem, payment, set_faults
from tests.notification_receiver import SECRET, SECRET_ENV, Receiver, notifications_config

EVENTS = 40


@pytest.fixture(autouse=True)
def _signing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)  # the children inherit the test's environment


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


def gateway_process(root: Path, data: dict[str, Any], env: dict[str, str] | None = None,
                    args: tuple[str, ...] = ()) -> GatewayProcess:
    """A `gateway serve` process of its own (port, log directory) on the journal `data` names."""
    port = free_port("127.0.0.1")
    root.mkdir(parents=True)
    data = {**data, "server": {"host": "127.0.0.1", "port": port}, "log": {"dir": str(root / "logs")}}
    config = root / "gateway.yaml"
    config.write_bytes(orjson.dumps(data))  # JSON is YAML
    return GatewayProcess(config, f"http://127.0.0.1:{port}", env or {}, root / "process.log", args)


async def workers_ready(gateway: GatewayProcess, count: int, timeout: float = 30.0) -> None:
    """Until the supervisor has logged `worker_ready` for `count` workers (its log is a file)."""
    async with asyncio.timeout(timeout):
        while (await asyncio.to_thread(gateway.log_path.read_bytes)).count(b'"event":"worker_ready"') < count:
            await asyncio.sleep(0.05)


def delivery_lines(log: Path) -> list[dict[str, Any]]:
    """The `notification_delivery` lines of one transaction log file."""
    lines = [orjson.loads(raw) for raw in log.read_bytes().splitlines() if raw.strip()]
    return [line["notification"] for line in lines if line.get("event") == "notification_delivery"]


@pytest.mark.parametrize("fleet", ["postgres-replicas", "sqlite-workers"])
async def test_processes_on_one_journal_deliver_each_event_once(fleet: str, tmp_path: Path, dev_certs, stripes,
                                                                pg_dsn: str, receiver: Receiver) -> None:
    """Two `gateway serve` replicas on one PostgreSQL schema, or one `serve --workers 2` on one
    SQLite file: the events committed while they run reach the receiver once each, and every
    process delivers some of them."""
    sections: dict[str, Any] = {"notifications": notifications_config(receiver.url, max_concurrency=4, timeout_s=10)}
    env: dict[str, str] = {}
    if fleet == "postgres-replicas":
        sections["storage"] = {"backend": "postgres", "postgres_dsn_env": "GATEWAY_TEST_NOTIFY_DSN"}
        env["GATEWAY_TEST_NOTIFY_DSN"] = pg_dsn
    data = engine_config_data(tmp_path, dev_certs, stripes, ("primary",), **sections)
    if fleet == "postgres-replicas":
        gateways = [gateway_process(tmp_path / f"replica-{n}", data, env) for n in range(2)]
        store: SqliteStore | PostgresStore = PostgresStore(pg_dsn, min_size=1, max_size=2)
    else:
        gateways = [gateway_process(tmp_path / "host", data, args=("--workers", "2"))]
        store = SqliteStore(Path(data["storage"]["sqlite_path"]))
    async with AsyncExitStack() as stack:
        for gateway in gateways:
            stack.push_async_callback(gateway.kill)
            await gateway.start()
        if fleet == "sqlite-workers":
            await workers_ready(gateways[0], 2)  # /healthz answered as soon as one served
        await store.open()
        stack.push_async_callback(store.close)
        outbox = NotificationOutbox(enabled=True)
        # The receiver holds every delivery until more are in flight than one process may send at
        # once (max_concurrency 4): then both processes are delivering, whoever polled first.
        receiver.hang = True
        ids = []
        for _ in range(EVENTS):  # settlements committed while every process polls the outbox
            record = payment(status=PaymentStatus.PENDING)
            before = Settling.of(record)  # (never journalled pending: the processes' reconcilers would own it)
            record.status = PaymentStatus.APPROVED
            rows = outbox.rows(before, record)
            await store.save_payment(record, notifications=rows)
            ids += [n.event_id for n in rows]

        await receiver.wait_for(5, timeout=30)
        receiver.release()
        await receiver.wait_for(EVENTS, timeout=60)
        async with asyncio.timeout(30):
            while await store.count_pending_notifications():
                await asyncio.sleep(0.05)
        for gateway in gateways:
            assert await gateway.stop() == 0
    assert sorted(receiver.event_ids()) == sorted(ids), "every event delivered, none twice"
    per_process = [delivery_lines(path) for path in sorted(tmp_path.glob("*/logs/transactions*.jsonl"))]
    assert len(per_process) == 2 and all(per_process), "both processes delivered some"
    logged = [line["event_id"] for lines in per_process for line in lines]
    assert sorted(logged) == sorted(ids)  # one attempt line per delivery, in the process that made it
    assert all(line["outcome"] == "delivered" for lines in per_process for line in lines)


def _notification_rows(db: Path) -> list[tuple[str, str, int]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT payment_id, state, attempts FROM notifications").fetchall()
    finally:
        conn.close()


async def test_a_gateway_killed_before_delivering_delivers_after_restart_once(tmp_path: Path, dev_certs, stripes,
                                                                              receiver: Receiver) -> None:
    receiver.statuses = [503] * 10_000  # the checkout's endpoint is failing: the event waits in the outbox
    data = engine_config_data(tmp_path, dev_certs, stripes, ("primary",),
                              providers={"primary": {"timeout_ms": 300, "retry": {"max_attempts": 1}}},
                              notifications=notifications_config(receiver.url, timeout_s=1))
    gateway = gateway_process(tmp_path / "gateway", data)
    db = Path(data["storage"]["sqlite_path"])
    try:
        await gateway.start()
        set_faults(stripes["primary"],  # charged, then no answer; the status query too slow: pending
                   FaultRule(kind="timeout_after", hang_s=5, operations=("authorize",)),
                   FaultRule(kind="latency", latency_ms=1500, operations=("status",)))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{gateway.url}/v1/payments", json=card_payment(), headers=idem()) as response:
                doc = await response.json()
        assert response.status == 201 and doc["status"] == "pending"
        stripes["primary"].emulator.faults.clear()

        # The gateway's own reconciler settles it and commits the event with it; the receiver
        # refuses the first attempt(s).
        [first] = await receiver.wait_for(1, timeout=30)
        assert first.event["type"] == "payment.approved" and first.event["payment_id"] == doc["id"]
        await gateway.kill()  # SIGKILL: the state change is committed, its notification not delivered
        [(payment_id, state, _attempts)] = await asyncio.to_thread(_notification_rows, db)
        assert (payment_id, state) == (doc["id"], "pending")

        refused = len(receiver.deliveries)
        receiver.statuses = []  # the endpoint is back
        await gateway.start()
        async with asyncio.timeout(30):
            while (await asyncio.to_thread(_notification_rows, db))[0][1] != "delivered":
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/v1/payments/{doc['id']}", headers=AUTH) as response:
                read = await response.json()
        assert await gateway.stop() == 0
    finally:
        await gateway.kill()
    accepted = receiver.deliveries[refused:]
    assert len(accepted) == 1, "delivered once after the restart"
    assert accepted[0].event["id"] == first.event["id"] and accepted[0].event["payment"]["status"] == "approved"
    assert read["status"] == "approved"
    lines = delivery_lines(tmp_path / "gateway" / "logs" / "transactions.jsonl")
    assert [line["outcome"] for line in lines].count("delivered") == 1
    assert lines[-1]["outcome"] == "delivered" and lines[-1]["event_id"] == first.event["id"]


async def test_a_gateway_killed_mid_delivery_delivers_again_after_restart(tmp_path: Path, dev_certs, stripes,
                                                                         receiver: Receiver) -> None:
    """At least once: the checkout had the request, the gateway died before hearing the answer.
    The restarted gateway (the journal's sole owner, so the dead lease is void at once) sends the
    same event id again; the receiver deduplicates. The attempt the crash cut short is not
    recorded: one attempt, one line."""
    receiver.hang = True
    data = engine_config_data(tmp_path, dev_certs, stripes, ("primary",),
                              notifications=notifications_config(receiver.url, timeout_s=30))
    gateway = gateway_process(tmp_path / "gateway", data)
    db = Path(data["storage"]["sqlite_path"])
    try:
        await gateway.start()
        outbox = NotificationOutbox(enabled=True)
        store = SqliteStore(db)
        await store.open()
        try:
            record = payment(status=PaymentStatus.PENDING)
            before = Settling.of(record)
            record.status = PaymentStatus.APPROVED
            [row] = outbox.rows(before, record)
            await store.save_payment(record, notifications=[row])
        finally:
            await store.close()
        [held] = await receiver.wait_for(1)  # the checkout has it; the gateway waits for the answer
        await gateway.kill()
        receiver.release()
        await gateway.start()
        async with asyncio.timeout(30):
            while (await asyncio.to_thread(_notification_rows, db))[0][1] != "delivered":
                await asyncio.sleep(0.05)
        assert await gateway.stop() == 0
    finally:
        await gateway.kill()
    assert receiver.event_ids() == [row.event_id, row.event_id]  # the same event, sent twice: dedupe by id
    assert held.body == receiver.deliveries[1].body
    [(_payment_id, state, attempts)] = await asyncio.to_thread(_notification_rows, db)
    assert (state, attempts) == ("delivered", 1)
    lines = delivery_lines(tmp_path / "gateway" / "logs" / "transactions.jsonl")
    assert [(line["event_id"], line["outcome"]) for line in lines] == [(row.event_id, "delivered")]
