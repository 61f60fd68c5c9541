"""One live process per transaction-log file (gateway/txlog/file_lock.py), and what that
buys: a replica restarted in place writes the lines its killed predecessor committed but did
not get on disk at once, at its start, instead of leaving them to the sweep a minute later.

Found by the fleet drill: a replica SIGKILLed right after committing a payment was restarted,
its start-up recovery deferred the young outbox row ("may belong to a live writer of this
file"), and at the end of the run that payment had no `payment` line in any file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.app import StartupError
from gateway.app_keys import TRANSACTION_LOG
from gateway.config import GatewayConfig
from gateway.journal.postgres import PostgresStore
from gateway.journal.records import OutboxLine
from gateway.txlog.outbox import log_owner
from tests.conftest import payment


async def test_a_replica_restarted_in_place_writes_its_predecessors_young_lines_at_start(
        pg_dsn: str, make_config: Callable[..., GatewayConfig], start_gateway: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PG_DSN", pg_dsn)
    config = make_config(storage={"backend": "postgres"})
    path = Path(config.log.dir) / config.log.file
    record = payment()
    line = orjson.dumps({"log_id": f"{record.id}:payment:1", "payment_id": record.id, "event": "payment"}) + b"\n"
    store = PostgresStore(pg_dsn)
    await store.open()
    try:  # what the killed process committed a moment ago: the row and its line's outbox entry
        await store.save_payment(record, outbox=OutboxLine(f"{record.id}:payment:1", line, log_owner(path),
                                                           time.time()))
    finally:
        await store.close()

    client = await start_gateway(config)
    txlog = client.server.app[TRANSACTION_LOG]
    assert await txlog.settle(5)

    written = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [x["payment_id"] for x in written] == [record.id]


async def test_a_second_process_on_the_same_log_file_is_refused_at_start(
        make_config: Callable[..., GatewayConfig], start_gateway: Callable[..., Any]) -> None:
    config = make_config()
    first = await start_gateway(config)
    assert first.server.app[TRANSACTION_LOG] is not None

    with pytest.raises(StartupError, match=r"^log\.dir .*transactions\.jsonl is being written by another running "
                                           r"gateway process \(give each replica its own log\.dir\)$"):
        await start_gateway(config.model_copy(update={"storage": config.storage.model_copy(
            update={"sqlite_path": Path(config.log.dir) / "other.db"})}))
