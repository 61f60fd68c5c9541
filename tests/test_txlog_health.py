"""A transaction log that cannot be written is noticed: `/readyz`, metrics and, past
`log.max_outbox_backlog`, 503 for new payments; it recovers by itself once the directory is
back; and `gateway serve` stops promptly with a clear line on SIGTERM, the lines it could not
write kept in the outbox for the next start.

The failure is real and works as root (CI runs as root, which file permissions do not stop):
the log file is moved away and a directory put in its place, so the file the writer has open is
no longer the log, and opening the log fails with EISDIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.app_keys import LOG_WRITER, TRANSACTION_LOG
from gateway.certs.devca import DevCertLayout
from gateway.config import GatewayConfig
from emulators.server import EmulatorServer
from tests.conftest import AUTH, card_payment, gateway_config_data

ROOT = Path(__file__).resolve().parent.parent
LOG_LIMITS = {"max_outbox_backlog": 3}


def _break(log: Path) -> None:
    log.rename(log.with_name("moved-away.jsonl"))
    log.mkdir()


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """The writer thread's recovery is not an awaitable event: poll, bounded."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _pay(key: str) -> dict[str, Any]:
    return {"json": card_payment(), "headers": {**AUTH, "Idempotency-Key": key}}


async def test_an_unwritable_log_is_noticed_sheds_payments_and_recovers(
    make_config: Callable[..., GatewayConfig], start_gateway: Any, tmp_path: Path
) -> None:
    config = make_config(log={"dir": str(tmp_path / "logs"), **LOG_LIMITS})
    client = await start_gateway(config)
    log = tmp_path / "logs" / "transactions.jsonl"
    writer, txlog = client.app[LOG_WRITER], client.app[TRANSACTION_LOG]
    assert (await client.post("/v1/payments", **_pay("before"))).status == 201
    assert await txlog.settle()

    _break(log)
    paid = [await client.post("/v1/payments", **_pay("during-1"))]
    assert paid[0].status == 201  # charged: its line waits in the outbox
    assert not await writer.wait_flushed(5)  # released as soon as the writer finds the log gone
    ready = await client.get("/readyz")
    assert ready.status == 503
    state = (await ready.json())["transaction_log"]
    assert (state["status"], state["reason"]) == ("failing", f"cannot write {log}: Is a directory")
    metrics = await (await client.get("/metrics")).text()
    errors = re.search(r"^gateway_txlog_write_errors_total (\S+)$", metrics, re.M)
    assert errors is not None and float(errors[1]) > 0
    assert "gateway_txlog_outbox_backlog 1.0" in metrics and "gateway_txlog_writable 0.0" in metrics

    paid += [await client.post("/v1/payments", **_pay(f"during-{n}")) for n in (2, 3)]
    assert [r.status for r in paid] == [201, 201, 201] and txlog.backlog == 3
    shed = await client.post("/v1/payments", **_pay("during-4"))
    assert shed.status == 503 and shed.headers["Retry-After"] == "1"
    assert (await shed.json())["code"] == "overloaded"

    log.rmdir()  # the directory is back: the writer opens a new log and writes the waiting lines

    async def ready_again() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready_again)
    assert await txlog.settle()
    assert txlog.backlog == 0 and writer.healthy
    assert (await client.post("/v1/payments", **_pay("after"))).status == 201
    assert await txlog.settle()
    ids = [(await r.json())["id"] for r in paid]
    lines = [orjson.loads(raw) for raw in log.read_bytes().splitlines()]
    assert [d["payment_id"] for d in lines][:3] == ids  # each once, in the log at its path
    assert len({d["log_id"] for d in lines}) == len(lines) == 4


async def test_sigterm_with_an_unwritable_log_stops_promptly_and_the_lines_come_back_at_restart(
    tmp_path: Path, dev_certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    data = gateway_config_data(tmp_path, dev_certs, emulators)
    data["server"] = {"port": 0, "shutdown_grace_s": 1}
    data["log"]["max_outbox_backlog"] = 100
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "logs" / "transactions.jsonl"
    journal = Path(data["storage"]["sqlite_path"])

    proc, port = await _serve(config)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            async with session.post("/v1/payments", **_pay("sigterm-1")) as resp:
                assert resp.status == 201
            await _until(lambda: _outbox_empty(journal))  # the first line is on disk for good
            _break(log)
            async with session.post("/v1/payments", **_pay("sigterm-2")) as resp:
                assert resp.status == 201
                stuck = (await resp.json())["id"]

            async def failing() -> bool:
                async with session.get("/readyz") as ready:
                    return (await ready.json())["transaction_log"]["status"] == "failing"

            await _until(failing)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert time.monotonic() - started < 8  # server grace 1 s + the writer's 2 s, not 30
    assert proc.returncode == 1, stderr.decode()
    last = stderr.decode().strip().splitlines()[-1]
    assert "Traceback" not in stderr.decode()
    assert last == (f"error: stopped with the transaction log failing: {log}: 1 line(s) not written: "
                    "Is a directory; those lines stay in the journal's outbox and are written at the next start")

    log.rmdir()
    proc, _port = await _serve(config)  # the outbox recovery writes the stuck line before serving
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert [orjson.loads(raw)["payment_id"] for raw in log.read_bytes().splitlines()] == [stuck]


async def _outbox_empty(journal: Path) -> bool:
    with contextlib.closing(sqlite3.connect(journal)) as db:  # WAL: a reader beside the gateway
        return db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


async def _serve(config: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while line := await proc.stderr.readline():
                if match := re.search(rb"Running on http://127\.0\.0\.1:(\d+)", line):
                    return proc, int(match[1])
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    proc.kill()
    await proc.wait()
    pytest.fail("the gateway did not start")
