"""Breaker sync when Redis hangs or is away at a replica's start, with real `gateway serve`
processes and a redis-server of the test's own (tests/redis_server.py).

A hung Redis (SIGSTOP: its TCP connections stay open, it never answers) must be noticed like a
dead one: `/readyz` says `breaker_sync` degraded on every worker within a few seconds, the
connected gauge says 0, no payment waits on it, and once it answers again an operator's hold set
meanwhile reaches the fleet. A replica started while Redis is down says it has not read the
fleet's holds, and reads them when Redis returns.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import card_payment, charges, idem
from tests.redis_server import RedisServer
from tests.test_scale_out import Replica, eventually, fleet_data, own_redis  # noqa: F401 (fixtures)
from tests.test_workers import Host, sessions_per_worker

DETECT_S = 8.0  # a hung Redis is degraded within this (the watchdog: 1 s silence + 2 s to answer, on a busy machine)
RECOVER_S = 12.0  # the subscriber's reconnect backoff is capped at 5 s
PAYMENT_S = 1.5  # a payment on loopback emulators; a payment waiting on the hung Redis would take >= 2 s
SAMPLES = 3  # /readyz reads per check and session


def _redis_pid(server: RedisServer) -> int:
    assert server._proc is not None and server._proc.returncode is None
    return server._proc.pid


@asynccontextmanager
async def _hung(server: RedisServer) -> AsyncIterator[Callable[[], None]]:
    """SIGSTOP the redis-server; `resume()` (or leaving the block) sends SIGCONT."""
    pid = _redis_pid(server)
    os.kill(pid, signal.SIGSTOP)
    stopped = [True]

    def resume() -> None:
        if stopped[0]:
            stopped[0] = False
            os.kill(pid, signal.SIGCONT)

    try:
        yield resume
    finally:
        resume()


Sessions = Iterable[aiohttp.ClientSession]  # one per worker of a replica (a keep-alive connection each)


async def _readyz(sessions: Sessions, replica: Replica | Host) -> list[dict[str, Any]]:
    docs = []
    for session in sessions:
        for _ in range(SAMPLES):
            async with session.get(f"{replica.url}/readyz") as resp:
                assert resp.status == 200, await resp.text()  # Redis is optional: never unready for it
                docs.append(await resp.json())
    return docs


async def _all_sync(sessions: Sessions, replica: Replica | Host, status: str) -> bool:
    return all(doc["breaker_sync"]["status"] == status for doc in await _readyz(sessions, replica))


async def _all_drained(sessions: Sessions, replica: Replica | Host, provider: str) -> bool:
    return all(doc["providers"][provider]["usable"] is False for doc in await _readyz(sessions, replica))


async def _gauge_says(session: aiohttp.ClientSession, replica: Replica | Host, value: str) -> bool:
    """`gateway_breaker_sync_connected` is `value` (with workers: the least of theirs, refreshed periodically)."""
    async with session.get(f"{replica.url}/metrics") as resp:
        text = await resp.text()
    return f"gateway_breaker_sync_connected {value}" in text.splitlines()


async def _pay(session: aiohttp.ClientSession, replica: Replica | Host) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    async with session.post(f"{replica.url}/v1/payments", json=card_payment(), headers=idem()) as resp:
        doc = await resp.json()
        assert resp.status == 201, doc
    return time.monotonic() - started, doc


async def test_a_hung_redis_is_degraded_within_seconds_and_a_hold_set_meanwhile_reaches_the_fleet_after(
        fleet_data, own_redis: RedisServer, stripes, tmp_path: Path) -> None:
    one = Replica("one", fleet_data("one"), tmp_path)
    two = Host(tmp_path / "two", fleet_data("two"), workers=2)  # each worker is its own subscriber
    workers: dict[int, aiohttp.ClientSession] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            await one.process.start()
            await two.start()
            workers, _ = await sessions_per_worker(two)
            views: dict[Replica | Host, Sessions] = {one: [session], two: list(workers.values())}
            for replica, sessions in views.items():
                await eventually(lambda r=replica, s=sessions: _all_sync(s, r, "ok"), "connected to Redis")
            async with _hung(own_redis) as resume:
                for replica, sessions in views.items():
                    await eventually(lambda r=replica, s=sessions: _all_sync(s, r, "degraded"),
                                     "a hung Redis is reported degraded on every worker", timeout_s=DETECT_S)
                    await eventually(lambda r=replica: _gauge_says(session, r, "0.0"), "the gauge says 0")
                degraded = (await _readyz([session], two))[0]["breaker_sync"]
                assert "not answering" in degraded["reason"] and degraded["since"] is not None

                held_at = time.monotonic()
                await one.breaker(session, "primary", "open")  # the operator's hold, while Redis hangs
                assert time.monotonic() - held_at < PAYMENT_S, "the console action waited on the hung Redis"
                payments = [(session, one), *((s, two) for s in workers.values()), (session, one)]
                for client_session, replica in payments:
                    took, doc = await _pay(client_session, replica)
                    assert took < PAYMENT_S, f"a payment took {took:.2f} s while Redis hung"
                    assert len(charges(stripes[doc["provider"]], doc["id"])) == 1
                took, doc = await _pay(session, one)
                assert doc["provider"] == "backup", "the replica that set the hold keeps it"
                resume()

                await eventually(lambda: _all_drained(views[two], two, "primary"),
                                 "the hold reaches both workers of the other replica", timeout_s=RECOVER_S)
            for replica, sessions in views.items():
                await eventually(lambda r=replica, s=sessions: _all_sync(s, r, "ok"), "reconnected",
                                 timeout_s=RECOVER_S)
                await eventually(lambda r=replica: _gauge_says(session, r, "1.0"), "the gauge says 1")
            for worker_session in workers.values():
                took, doc = await _pay(worker_session, two)
                assert doc["provider"] == "backup" and len(charges(stripes["backup"], doc["id"])) == 1
        finally:
            for worker_session in workers.values():
                await worker_session.close()
            await one.process.stop()
            await two.process.stop()


async def test_a_replica_started_while_redis_is_down_says_it_missed_the_holds_and_reads_them_on_return(
        fleet_data, own_redis: RedisServer, stripes, tmp_path: Path) -> None:
    r2 = Replica("r2", fleet_data("r2"), tmp_path)
    r3 = Replica("r3", fleet_data("r3"), tmp_path)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            await r2.process.start()
            await r3.process.start()
            await r2.breaker(session, "primary", "open")
            await eventually(lambda: _all_drained([session], r3, "primary"), "the hold reaches r3")
            await own_redis.stop()
            await r3.process.stop()
            await r3.process.start()  # cannot read the fleet's holds: Redis is down

            sync = (await _readyz([session], r3))[0]["breaker_sync"]
            assert sync["status"] == "degraded" and sync["read_fleet_holds"] is False
            assert "not read the fleet's breaker state and holds" in sync["reason"]

            await own_redis.start()  # back, and empty: r2 republishes its hold, r3 reads it
            await eventually(lambda: _all_drained([session], r3, "primary"),
                             "r3 holds the provider once Redis is back", timeout_s=RECOVER_S)
            await eventually(lambda: _all_sync([session], r3, "ok"), "r3 reconnected", timeout_s=RECOVER_S)
            took, doc = await _pay(session, r3)
            assert doc["provider"] == "backup" and len(charges(stripes["backup"], doc["id"])) == 1
        finally:
            await r2.process.stop()
            await r3.process.stop()
