"""`gateway serve --workers 2`: real processes behaving as a fleet of one host (gateway.workers).

The supervisor and its workers are real `python -m gateway.cli serve --workers 2` processes in
front of the in-test Stripe emulators, on one SQLite journal. A keep-alive connection stays with
the worker that accepted it, and which worker that is shows in the transaction log file its
payment line lands in (`transactions-w<N>.jsonl`), so a test can talk to each worker on purpose.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from emulators.server import EmulatorServer
from gateway.analysis.view import resolve_paths
from gateway.certs.devca import DevCertLayout
from gateway.drill.process import GatewayProcess, free_port
from gateway.journal.records import OutboxLine
from gateway.journal.postgres import PostgresStore
from gateway.txlog.outbox import OutboxPass, TransactionLog, logged_ids
from gateway.txlog.writer import JsonLinesWriter
from gateway.workers import WorkerSeat, worker_log_file
from gateway.workers.peers import SeatPeers
from tests.conftest import AUTH, card_payment, engine_config_data, idem
from tests.test_console import next_event
from tests.test_txlog_outbox import final_record

GRACE_S = 3.0
WAIT_S = 10.0
ADMIN_KEY = "test-workers-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
WITH_ADMIN = {"clients": [{"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"},
                          {"name": "ops", "key_env": "GATEWAY_KEY_ADMIN", "permissions": ["admin"]}]}


class Host:
    """A supervisor with two workers (or, with `workers=1`, one plain process), its stderr (the
    ops lines) in `log`."""

    def __init__(self, home: Path, data: dict[str, Any], workers: int = 2) -> None:
        port = free_port("127.0.0.1")
        data["server"] = {"host": "127.0.0.1", "port": port, "shutdown_grace_s": GRACE_S}
        home.mkdir(parents=True, exist_ok=True)
        config = home / "gateway.yaml"
        config.write_text(yaml.safe_dump(data))
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir = Path(data["log"]["dir"])
        self.log = home / "serve.log"
        self.workers = workers
        self.process = GatewayProcess(config, self.url, {}, self.log,
                                      args=("--workers", str(workers)) if workers > 1 else ())

    def ops(self, event: str) -> list[dict[str, Any]]:
        found = []
        for raw in self.log.read_bytes().splitlines():
            if raw.startswith(b"{") and f'"{event}"'.encode() in raw:
                doc = orjson.loads(raw)
                if doc.get("event") == event:
                    found.append(doc)
        return found

    async def start(self) -> None:
        await self.process.start()
        if self.workers > 1:
            await eventually(lambda: len(self.ops("worker_ready")) >= self.workers, "every worker serves")

    def worker_pids(self) -> dict[int, int]:
        """worker index -> the pid of its latest start."""
        return {doc["worker"]: doc["pid"] for doc in self.ops("worker_ready")}

    def payment_lines(self) -> dict[str, list[Path]]:
        """payment_id -> the log files (rotated ones included) holding a `payment` line for it."""
        found: dict[str, list[Path]] = {}
        for path in resolve_paths([self.log_dir]):
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            for raw in data.splitlines():
                doc = orjson.loads(raw)
                if doc.get("event") == "payment":
                    found.setdefault(doc["payment_id"], []).append(path)
        return found

    def worker_of(self, payment_id: str) -> int | None:
        for path in self.payment_lines().get(payment_id, []):
            return int(path.name.split("-w")[1].split(".")[0].split("-")[0])
        return None


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = WAIT_S) -> float:
    """Seconds until `check` holds (polling: these changes happen in other processes)."""
    started = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def host(tmp_path: Path, dev_certs: DevCertLayout,
               stripes: dict[str, EmulatorServer]) -> AsyncIterator[Callable[..., Awaitable[Host]]]:
    started: list[Host] = []

    async def make(home: str = "", workers: int = 2, **changes: Any) -> Host:
        """`home`: a directory of its own under tmp_path (config, journal, logs) for a second process."""
        where = tmp_path / home
        h = Host(where, engine_config_data(where, dev_certs, stripes, ("primary", "backup"), **changes), workers)
        started.append(h)
        await h.start()
        return h

    yield make
    for h in started:
        await h.process.stop()


async def pay(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{url}/v1/payments", json=card_payment(), headers={**AUTH, **idem()}) as resp:
        return resp.status, await resp.json()


def fresh_session() -> aiohttp.ClientSession:
    """A new connection per request, so the kernel spreads them over the workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=10))


async def pay_many(url: str, count: int, concurrency: int = 16) -> list[tuple[int, dict[str, Any]]]:
    gate = asyncio.Semaphore(concurrency)
    async with fresh_session() as session:
        async def one() -> tuple[int, dict[str, Any]]:
            async with gate:
                try:
                    return await pay(session, url)
                except aiohttp.ClientError:  # a worker killed under it: status 0
                    return 0, {}

        return await asyncio.gather(*(one() for _ in range(count)))


async def sessions_per_worker(h: Host) -> tuple[dict[int, aiohttp.ClientSession], int]:
    """One keep-alive session (one connection) pinned to each worker, and the payments (all
    approved) that took."""
    pinned: dict[int, aiohttp.ClientSession] = {}
    for paid in range(1, 41):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                        timeout=aiohttp.ClientTimeout(total=10))
        status, doc = await pay(session, h.url)
        assert status == 201, doc
        await eventually(lambda: h.worker_of(doc["id"]) is not None, "the payment line is on disk")
        worker = h.worker_of(doc["id"])
        assert worker is not None
        if worker in pinned:
            await session.close()
        else:
            pinned[worker] = session
        if len(pinned) == 2:
            return pinned, paid
    for session in pinned.values():
        await session.close()
    raise AssertionError("40 connections all reached the same worker")


# -- every payment logged exactly once, rotation included; SIGTERM stops them all ------------------


async def test_two_workers_log_every_payment_once_across_rotation_and_stop_within_the_grace(host) -> None:
    h = await host(log={"max_bytes": 16_384})
    answers = await pay_many(h.url, 300)
    assert Counter(status for status, _ in answers) == {201: 300}
    pids = h.worker_pids()

    started = time.monotonic()
    assert await h.process.stop() == 0
    assert time.monotonic() - started < GRACE_S + 2
    assert not any(pid_alive(pid) for pid in pids.values())

    lines = h.payment_lines()
    assert {doc["id"] for _, doc in answers} == set(lines)
    assert [p for p, files in lines.items() if len(files) != 1] == []  # exactly one line each
    files = {path.name for paths in lines.values() for path in paths}
    assert any(name.endswith(".jsonl.gz") for name in files), "rotation happened"
    writers = {name.split("-w")[1][0] for name in files}
    assert writers == {"1", "2"}, "both workers served and each wrote its own file"


# -- a SIGKILLed worker is restarted, said so, and payments keep flowing ----------------------------


async def test_a_killed_worker_is_restarted_and_logged_while_payments_keep_flowing(host) -> None:
    h = await host()
    pids = h.worker_pids()
    load = asyncio.create_task(pay_many(h.url, 150, concurrency=8))
    await asyncio.sleep(0.2)
    os.kill(pids[1], signal.SIGKILL)
    answers = await load

    await eventually(lambda: bool(h.ops("worker_restarted")), "the supervisor restarts the worker")
    [restart] = h.ops("worker_restarted")
    assert (restart["worker"], restart["old_pid"], restart["signal"], restart["exit_code"]) == \
        (1, pids[1], "SIGKILL", None)
    await eventually(lambda: h.worker_pids()[1] != pids[1], "the new worker serves")
    assert pid_alive(pids[2]) and h.worker_pids()[2] == pids[2]

    # Only requests on connections the dead worker held can have failed; the rest went on.
    assert sum(status == 201 for status, _ in answers) >= 100
    after = await pay_many(h.url, 40)
    assert Counter(status for status, _ in after) == {201: 40}
    assert await h.process.stop() == 0  # SIGTERM still stops both, the restarted one included
    assert not pid_alive(h.worker_pids()[1]) and not pid_alive(pids[2])
    lines = h.payment_lines()
    answered = [doc["id"] for status, doc in answers + after if status == 201]
    assert [p for p in answered if len(lines.get(p, [])) != 1] == []


# -- breakers and metrics are the host's -------------------------------------------------------------


async def test_a_breaker_tripped_in_one_worker_is_skipped_by_the_other_and_metrics_sum(host, stripes) -> None:
    h = await host(providers={"primary": {"breaker": {"fail_max": 2, "reset_timeout_s": 30}}})
    pinned, approved = await sessions_per_worker(h)
    try:
        await stripes["primary"].set_outage(True)
        tripper, other = pinned[1], pinned[2]
        status, doc = await pay(tripper, h.url)  # primary fails (twice: the retry), backup approves
        assert status == 201 and doc["provider"] == "backup"

        assert await _is_open(tripper, h.url)
        assert await eventually(lambda: _is_open(other, h.url), "the trip reaches the other worker",
                                timeout=1.0) < 1.0
        status, doc = await pay(other, h.url)
        assert status == 201 and doc["provider"] == "backup"
        assert [(a["provider"], a["outcome"], a["raw_code"]) for a in doc["attempts"]] == [
            ("primary", "skipped", "breaker_open"), ("backup", "approved", "succeeded")]  # primary not tried

        # /metrics on either worker: the host's totals.
        approved += 2
        for session in (tripper, other):
            async with session.get(f"{h.url}/metrics") as resp:
                text = await resp.text()
            assert _sample(text, 'gateway_payments_total{status="approved"}') == approved
    finally:
        for session in pinned.values():
            await session.close()


# -- with breaker_sync: redis, every worker is a replica of the fleet's sync ------------------------

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RESET_S = 1.0  # short: a hold must outlast it (no trial call while held), a plain open does not


@pytest.fixture
async def redis_fleet(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Any]]:
    """Config changes for processes of one fleet: one PostgreSQL schema, one Redis key prefix."""
    from redis import asyncio as aioredis

    prefix = f"gateway-test:{uuid.uuid4().hex}"
    monkeypatch.setenv("GATEWAY_PG_DSN", pg_dsn)
    monkeypatch.setenv("GATEWAY_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("GATEWAY_KEY_ADMIN", ADMIN_KEY)
    try:
        yield {"auth": WITH_ADMIN, "storage": {"backend": "postgres"},
               "breaker_sync": {"backend": "redis", "channel_prefix": prefix},
               "providers": {"primary": {"breaker": {"fail_max": 2, "reset_timeout_s": RESET_S}}}}
    finally:
        redis = aioredis.from_url(REDIS_URL)
        try:
            await redis.delete(f"{prefix}:state", f"{prefix}:holds")
        finally:
            await redis.aclose()


async def test_with_redis_sync_a_trip_and_a_hold_reach_every_worker_and_the_other_replica(
        host, stripes, redis_fleet) -> None:
    h = await host(**redis_fleet)
    replica = await host(home="replica", workers=1, **redis_fleet)
    pinned, _ = await sessions_per_worker(h)
    async with fresh_session() as other:
        everyone = {"worker 1": (pinned[1], h.url), "worker 2": (pinned[2], h.url), "replica": (other, replica.url)}

        async def all_see(what: str, check: Callable[[dict[str, Any]], bool]) -> float:
            """Seconds until every process shows it."""
            started = time.monotonic()
            for name, (session, url) in everyone.items():
                await eventually(lambda: _primary_is(session, url, check), f"{what} reaches {name}", timeout=5.0)
            return time.monotonic() - started

        try:
            for name, (session, url) in everyone.items():  # each worker its own subscriber, none through a hub
                async with session.get(f"{url}/readyz") as resp:
                    assert (await resp.json())["breaker_sync"] == {"status": "ok"}, name
            async with pinned[1].get(f"{h.url}/metrics") as resp:
                assert _sample(await resp.text(), "gateway_breaker_sync_connected") == 1
            assert h.ops("workers_started")[0]["breaker_hub"] is False

            # A trip on worker 1 (primary fails twice: the retry) is every process's.
            await stripes["primary"].set_outage(True)
            status, doc = await pay(pinned[1], h.url)
            assert status == 201 and doc["provider"] == "backup"
            await stripes["primary"].set_outage(False)
            assert await all_see("the trip", lambda p: p["breaker"] == "open") < 1.0, "within a second"

            # An operator's hold set on the other replica holds every worker past the reset timeout.
            held = await _console_breaker(other, replica.url, "open")
            assert held["state"] == "open"
            await asyncio.sleep(RESET_S + 0.2)  # a breaker only tripped would let its trial call through now
            await all_see("the hold", lambda p: p["breaker"] == "open" and p["usable"] is False)
            status, doc = await pay(pinned[2], h.url)
            assert status == 201 and [(a["provider"], a["raw_code"]) for a in doc["attempts"]] == [
                ("primary", "breaker_open"), ("backup", "succeeded")]

            # A worker restarted in its seat reads the hold from Redis before it serves.
            old = h.worker_pids()[2]
            os.kill(old, signal.SIGKILL)
            await eventually(lambda: h.worker_pids()[2] != old, "worker 2 is restarted and serves")
            await pinned.pop(2).close()
            while 2 not in pinned:
                more, _ = await sessions_per_worker(h)
                await more.pop(1).close()
                pinned.update(more)
            everyone["worker 2"] = (pinned[2], h.url)
            assert await _primary_is(pinned[2], h.url, lambda p: p["breaker"] == "open" and p["usable"] is False)

            # Released on worker 1: closed everywhere, and primary takes payments again.
            released = await _console_breaker(pinned[1], h.url, "closed")
            assert released["state"] == "closed"
            await all_see("the release", lambda p: p["breaker"] == "closed" and p["usable"] is True)
            for session, url in everyone.values():
                status, doc = await pay(session, url)
                assert status == 201 and doc["provider"] == "primary"
        finally:
            for session in pinned.values():
                await session.close()


async def _primary_is(session: aiohttp.ClientSession, url: str, check: Callable[[dict[str, Any]], bool]) -> bool:
    async with session.get(f"{url}/readyz") as resp:
        return check((await resp.json())["providers"]["primary"])


async def _console_breaker(session: aiohttp.ClientSession, url: str, state: str) -> dict[str, Any]:
    async with session.post(f"{url}/console/actions/breaker", headers=ADMIN,
                            json={"provider": "primary", "state": state, "confirm": True}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


async def _is_open(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/readyz") as resp:
        return (await resp.json())["providers"]["primary"]["breaker"] == "open"


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} in /metrics")


# -- the console on any worker shows the whole host's traffic ----------------------------------------


async def test_the_console_on_either_worker_shows_the_whole_hosts_traffic(host, stripes, monkeypatch) -> None:
    monkeypatch.setenv("GATEWAY_KEY_ADMIN", ADMIN_KEY)
    h = await host(auth=WITH_ADMIN)
    pinned, paid = await sessions_per_worker(h)  # `paid` approved at primary, on both workers
    try:
        for session, count in ((pinned[1], 3), (pinned[2], 2)):
            for _ in range(count):
                status, doc = await pay(session, h.url)
                assert status == 201 and doc["provider"] == "primary"
        await stripes["primary"].set_outage(True)
        status, failed_over = await pay(pinned[2], h.url)  # worker 2 alone sees primary fail
        await stripes["primary"].set_outage(False)
        assert status == 201 and failed_over["provider"] == "backup"
        total = paid + 6

        for worker, session in pinned.items():  # each session's last request: the stream keeps its connection
            async with session.get(f"{h.url}/console/events", headers=ADMIN) as stream:
                assert stream.status == 200
                for _ in range(5):  # a worker busy elsewhere may miss one snapshot: it is named, not waited for
                    snap = await next_event(stream)
                    if snap["host"]["reporting"] == 2:
                        break
            assert snap["host"] == {"workers": 2, "reporting": 2, "missing": []}, worker
            g = snap["gateway"]
            assert (g["payments"], g["approved"], g["in_flight"], g["unresolved"]) == (total, total, 0, 0), worker
            providers = {p["name"]: p["stats"] for p in snap["providers"]}
            assert (providers["primary"]["payments"], providers["primary"]["approved"]) == (total, total - 1)
            assert (providers["backup"]["payments"], providers["backup"]["approved"]) == (1, 1)
            assert providers["primary"]["failovers_per_min"] == 1
            assert sum(step[0] for step in providers["primary"]["series"]) == total
            failure = snap["failures"][0]  # made on worker 2, shown on both
            assert (failure["payment_id"], failure["provider"], failure["outcome"]) == \
                (failed_over["id"], "primary", "unavailable"), worker
            assert all(b["bulkhead"]["active"] == 0 for b in snap["providers"])
            assert snap["providers"][0]["bulkhead"]["max_concurrent"] > 0
    finally:
        for session in pinned.values():
            await session.close()


async def test_a_seat_that_is_gone_or_stuck_is_named_missing_within_the_timeout(tmp_path: Path) -> None:
    seats = [WorkerSeat(i, tmp_path, workers=3) for i in (1, 2, 3)]
    one, two = SeatPeers(seats[0]), SeatPeers(seats[1], timeout_s=0.3)
    await one.start(lambda: {"seat": 1})
    await two.start(lambda: {"seat": 2})
    held: list[asyncio.StreamWriter] = []

    async def never_answers(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    stuck = await asyncio.start_unix_server(never_answers, path=str(seats[2].seat_socket()))
    try:
        started = time.monotonic()
        answers = await two.ask()
        assert time.monotonic() - started < 1.0
        assert (answers.reports, answers.missing) == ([{"seat": 1}], [3])
        assert (await one.ask()).reports == [{"seat": 2}]
        await one.close()
        assert (await two.ask()).missing == [1, 3]  # gone: refused at once
    finally:
        for writer in held:
            writer.close()
        stuck.close()
        await two.close()


# -- a dead worker's outbox lines: written once, by the worker restarted in its seat ---------------


async def test_a_dead_workers_outbox_lines_are_written_once_by_its_successor_only(tmp_path: Path,
                                                                                   pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, min_size=1, max_size=3)
    await store.open()
    logs = tmp_path / "logs"
    logs.mkdir()
    seats: list[TransactionLog] = []

    async def seat(index: int) -> TransactionLog:
        writer = JsonLinesWriter(logs / worker_log_file("transactions.jsonl", index))
        writer.start()
        txlog = TransactionLog(writer, store)
        await txlog.start()
        seats.append(txlog)
        return txlog

    try:
        dead = await seat(1)
        record = final_record()
        rendered = dead.render("payment", payment_id=record.id)
        # SIGKILLed right after the commit: the line is only in the outbox, and seconds young.
        await store.save_payment(record, outbox=OutboxLine(rendered.log_id, rendered.line, dead.owner, time.time()))

        neighbour = await seat(2)  # another worker's file: not its line to write (yet)
        assert await neighbour.recover(exclusive=False, sole_writer=True) == OutboxPass()

        successor = await seat(1)  # the supervisor restarts the seat: its file has no other writer
        result = await successor.recover(exclusive=False, sole_writer=True)
        assert (result.claimed, result.reemitted, result.deferred) == (1, 1, 0)
        assert await successor.settle()
        assert await (await seat(1)).recover(exclusive=False, sole_writer=True) == OutboxPass()

        copies = [path.name for path in resolve_paths([logs]) if rendered.log_id in logged_ids(path)]
        assert copies == ["transactions-w1.jsonl"]
    finally:
        for txlog in seats:
            await txlog.close()
            txlog.writer.close()
        await store.close()


def test_a_workers_file_is_neither_a_rotated_file_of_the_single_log_nor_missed_by_analyze(tmp_path: Path) -> None:
    from gateway.txlog.outbox import newest_rotated

    for name in ("transactions-w1.jsonl", "transactions-w2-20250101T000000000000.jsonl.gz",
                 "transactions-20250101T000000000000.jsonl.gz"):
        (tmp_path / name).write_bytes(b"")
    assert newest_rotated(tmp_path / "transactions.jsonl") == tmp_path / "transactions-20250101T000000000000.jsonl.gz"
    assert newest_rotated(tmp_path / "transactions-w2.jsonl") == \
        tmp_path / "transactions-w2-20250101T000000000000.jsonl.gz"
    assert newest_rotated(tmp_path / "transactions-w1.jsonl") is None
    assert {p.name for p in resolve_paths([tmp_path])} == {
        "transactions-w1.jsonl", "transactions-w2-20250101T000000000000.jsonl.gz",
        "transactions-20250101T000000000000.jsonl.gz"}


async def test_a_worker_that_cannot_start_fails_the_command_instead_of_restarting(
        tmp_path: Path, dev_certs: DevCertLayout, stripes: dict[str, EmulatorServer]) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    data = engine_config_data(tmp_path, dev_certs, stripes, ("primary", "backup"), log={"dir": str(blocker)})
    data["server"] = {"host": "127.0.0.1", "port": free_port("127.0.0.1")}
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 1
    assert f"log.dir {blocker}" in text  # the worker's own reason
    assert "error: worker " in text and "exited with status 1 while starting" in text
    assert "worker_restarted" not in text
