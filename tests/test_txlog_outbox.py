"""The transaction log's outbox (DESIGN rule 5 across a crash): every transaction line is in the
file exactly once, even when the process dies between the journal commit and the flush.

Real SQLite and PostgreSQL (GATEWAY_TEST_PG_DSN, a fresh schema per test; `.ci/run` starts it),
real files, the real gateway app. The crash is simulated the way it happens: the final journal
row and its outbox line are committed through the store, and the line is never written (or it is
written and the outbox row is not deleted); then a new app starts on the same journal and log.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from gateway.analysis.view import open_log
from gateway.api.payments import new_payment_id
from gateway.app_keys import LOG_WRITER, SERVICE, STORE
from gateway.app import TRANSACTION_LOG, build_app
from gateway.certs.devca import DevCertLayout
from gateway.config import GatewayConfig, parse_config
from gateway.journal.postgres import PostgresStore
from gateway.journal.records import (
    IdempotentAnswer,
    OutboxLine,
    PaymentRecord,
    StoredResponse,
)
from gateway.journal.sqlite import SqliteStore
from domain.outcome import PaymentStatus
from gateway.txlog import JsonLinesWriter
from gateway.txlog.outbox import (
    FOREIGN_ORPHAN_AGE_S,
    ORPHAN_AGE_S,
    OutboxPass,
    TransactionLog,
    logged_ids,
)
from emulators.server import EmulatorServer
from tests.conftest import (
    DB_ERRORS,
    REFUSE_APPROVED_BOOM,
    Backend,
    card_payment,
    engine_config_data,
    idem,
    pg_schema,
)

VISA = "4242424242424242"


# -- fixtures and helpers ---------------------------------------------------------------------------


@dataclass
class Gateway:
    """One gateway configuration (SQLite or PostgreSQL journal) that can be started again and again."""

    kind: str
    config: GatewayConfig
    pg_dsn: str | None

    @property
    def log_path(self) -> Path:
        return Path(self.config.log.dir) / self.config.log.file

    def log_lines(self) -> list[bytes]:
        return self.log_path.read_bytes().splitlines(keepends=True) if self.log_path.exists() else []

    def copies(self, log_id: str) -> int:
        """Whole, readable lines with this log_id."""
        count = 0
        for raw in self.log_lines():
            try:
                count += orjson.loads(raw).get("log_id") == log_id
            except orjson.JSONDecodeError:
                continue  # torn by a crash
        return count

    async def outbox_ids(self) -> list[str]:
        """What the outbox table holds, read over a separate connection."""
        if self.pg_dsn is not None:
            conn = await asyncpg.connect(self.pg_dsn, timeout=5)
            try:
                return [r[0] for r in await conn.fetch("SELECT log_id FROM outbox ORDER BY log_id")]
            finally:
                await conn.close()

        def read() -> list[str]:
            conn = sqlite3.connect(self.config.storage.sqlite_path)
            try:
                return [r[0] for r in conn.execute("SELECT log_id FROM outbox ORDER BY log_id")]
            finally:
                conn.close()

        return await asyncio.to_thread(read)


@pytest.fixture(params=["sqlite", "postgres"])
async def gateway(request: pytest.FixtureRequest, tmp_path: Path, dev_certs: DevCertLayout,
                  stripes: dict[str, EmulatorServer], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    data = engine_config_data(tmp_path, dev_certs, stripes, ("primary", "backup"))
    if request.param == "sqlite":
        yield Gateway("sqlite", parse_config(data), None)
        return
    async with pg_schema() as dsn:
        monkeypatch.setenv("GATEWAY_PG_DSN", dsn)
        data["storage"] = {"backend": "postgres"}
        yield Gateway("postgres", parse_config(data), dsn)


async def started(gw: Gateway, *, exclusive: bool = True) -> web.AppRunner:
    """The app through its whole start-up (outbox recovery and the reconciler's first pass
    included), without an HTTP listener. `exclusive`: this process owns the journal (a single
    gateway; on PostgreSQL the default is shared)."""
    runner = web.AppRunner(build_app(gw.config, reconcile_interval_s=3600, exclusive_store=exclusive))
    await runner.setup()
    return runner


def final_record(status: PaymentStatus = PaymentStatus.APPROVED, **extra: Any) -> PaymentRecord:
    now = time.time()
    return PaymentRecord(id=new_payment_id(), client="checkout", amount=1299, currency="EUR", capture=True,
                         merchant_reference="order-outbox", status=status, card_brand="visa", card_bin="424242",
                         card_last4="4242", route="default", provider="primary", provider_reference="pi_outbox",
                         outcome="approved", created_at=now, updated_at=now, **extra)


async def commit_without_writing(runner: web.AppRunner, **extra: Any) -> OutboxLine:
    """What a process killed right after the final commit leaves: the journal row and its outbox
    line committed together (through the service's own rendering), the line never queued."""
    app = runner.app
    record = final_record(**extra)
    line = app[SERVICE].transaction_line(record, "payment", latency_ms=12.5)
    await app[STORE].save_payment(record, outbox=line)
    return line


# -- a crash between the commit and the flush ---------------------------------------------------


async def test_a_committed_line_that_never_reached_the_file_is_written_once_at_restart(gateway: Gateway) -> None:
    first = await started(gateway)
    line = await commit_without_writing(first, metadata={"note": f"paid with {VISA}"})
    await first.cleanup()  # the line was never queued: only the outbox has it
    assert gateway.copies(line.log_id) == 0
    assert await gateway.outbox_ids() == [line.log_id]

    second = await started(gateway)  # start-up writes it again, before serving
    try:
        assert await second.app[TRANSACTION_LOG].settle()
        assert gateway.copies(line.log_id) == 1
        [raw] = [raw for raw in gateway.log_lines() if line.log_id.encode() in raw]
        assert raw == line.line  # the bytes rendered before the commit, redacted then
        doc = orjson.loads(raw)
        assert doc["event"] == "payment" and doc["status"] == "approved" and doc["latency_ms"] == 12.5
        assert VISA not in raw.decode() and doc["metadata"]["note"] == "paid with 424242******4242"
        assert await gateway.outbox_ids() == []
    finally:
        await second.cleanup()

    third = await started(gateway)  # and never again
    await third.cleanup()
    assert gateway.copies(line.log_id) == 1


async def test_a_line_already_in_the_file_whose_row_survived_is_not_written_twice(gateway: Gateway) -> None:
    first = await started(gateway)
    line = await commit_without_writing(first)
    # The line reached the file, the process died before the delete of its outbox row.
    writer = first.app[LOG_WRITER]
    writer.write(line.line)
    assert await writer.wait_flushed()
    others = [await commit_without_writing(first) for _ in range(3)]  # ... and these did not
    await first.cleanup()
    assert sorted(await gateway.outbox_ids()) == sorted([line.log_id] + [o.log_id for o in others])

    second = await started(gateway)
    try:
        assert await second.app[TRANSACTION_LOG].settle()
    finally:
        await second.cleanup()

    assert gateway.copies(line.log_id) == 1
    assert [gateway.copies(o.log_id) for o in others] == [1, 1, 1]
    assert await gateway.outbox_ids() == []


async def test_a_torn_copy_does_not_count_as_written(gateway: Gateway) -> None:
    first = await started(gateway)
    line = await commit_without_writing(first)
    await first.cleanup()
    with gateway.log_path.open("ab") as f:  # a write cut short by the kill
        f.write(line.line[: len(line.line) // 2])

    second = await started(gateway)
    try:
        assert await second.app[TRANSACTION_LOG].settle()
    finally:
        await second.cleanup()

    assert gateway.copies(line.log_id) == 1


# -- normal operation -------------------------------------------------------------------------------


async def test_normal_operation_leaves_the_outbox_empty_once_flushed(gateway: Gateway, aiohttp_client) -> None:
    client = await aiohttp_client(build_app(gateway.config, reconcile_interval_s=3600))
    ids = []
    for _ in range(5):
        resp = await client.post("/v1/payments", json=card_payment(capture=False), headers=idem())
        assert resp.status == 201
        ids.append((await resp.json())["id"])
    resp = await client.post(f"/v1/payments/{ids[0]}/capture", json={}, headers=idem())
    assert resp.status == 200, await resp.text()

    assert await client.app[TRANSACTION_LOG].settle()

    assert await gateway.outbox_ids() == []
    docs = [orjson.loads(raw) for raw in gateway.log_lines()]
    assert sorted((d["payment_id"], d["event"]) for d in docs) == sorted(
        [(pid, "payment") for pid in ids] + [(ids[0], "capture")])
    log_ids = [d["log_id"] for d in docs]
    assert len(set(log_ids)) == len(log_ids)
    assert all(d["log_id"].startswith(f"{d['payment_id']}:{d['event']}:") for d in docs)
    assert client.app[TRANSACTION_LOG].deleted == len(docs)


async def test_a_line_the_full_queue_refused_is_written_by_the_sweep(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "journal.db")
    await store.open()
    writer = JsonLinesWriter(tmp_path / "transactions.jsonl", queue_size=1)  # not started: the queue fills
    txlog = TransactionLog(writer, store)
    await txlog.start()
    try:
        writer.write(b'{"filler":true}')
        record = final_record()
        rendered = txlog.render("payment", payment_id=record.id)
        line = OutboxLine(rendered.log_id, rendered.line, rendered.owner, time.time() - ORPHAN_AGE_S - 1)
        await store.save_payment(record, outbox=line)
        assert txlog.emit(line) is False and txlog.emit_failures == 1  # refused, but committed: not lost
        writer.start()

        result = await txlog.sweep(exclusive=True)

        assert (result.claimed, result.reemitted) == (1, 1)
        assert await txlog.settle()
        assert writer.path.read_bytes() == b'{"filler":true}\n' + line.line
        assert await claim_all(store) == []
        assert await txlog.sweep(exclusive=True) == OutboxPass()
    finally:
        await txlog.close()
        writer.close()
        await store.close()


# -- shared journals: live workers' rows are left alone, orphans are adopted ------------------------


async def test_on_a_shared_store_only_orphans_are_written_again(tmp_path: Path, pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, min_size=1, max_size=3)
    await store.open()
    writer = JsonLinesWriter(tmp_path / "transactions.jsonl")
    writer.start()
    txlog = TransactionLog(writer, store)
    await txlog.start()
    try:
        now = time.time()

        async def row(age_s: float, owner: str) -> OutboxLine:
            record = final_record()
            rendered = txlog.render("payment", payment_id=record.id)
            line = OutboxLine(rendered.log_id, rendered.line, owner, now - age_s)
            await store.save_payment(record, outbox=line)
            return line

        young_own = await row(1, txlog.owner)  # a live worker writing the same file may hold it
        old_own = await row(ORPHAN_AGE_S + 5, txlog.owner)
        young_foreign = await row(ORPHAN_AGE_S + 5, "other-host:/var/log/gateway/transactions.jsonl")
        old_foreign = await row(FOREIGN_ORPHAN_AGE_S + 5, "gone-host:/var/log/gateway/transactions.jsonl")

        result = await txlog.recover(exclusive=False)
        assert (result.claimed, result.reemitted, result.deferred) == (3, 2, 1)
        assert await txlog.settle()
        in_file = logged_ids(writer.path)
        assert in_file == {old_own.log_id, old_foreign.log_id}
        conn = await asyncpg.connect(pg_dsn, timeout=5)
        try:
            left = {r[0] for r in await conn.fetch("SELECT log_id FROM outbox")}
        finally:
            await conn.close()
        assert left == {young_own.log_id, young_foreign.log_id}

        # A second replica starting at the same moment finds the deferred row leased.
        assert await txlog.recover(exclusive=False) == OutboxPass()
    finally:
        await txlog.close()
        writer.close()
        await store.close()


# -- the store's outbox contract (both backends) ----------------------------------------------------


def outbox_line(log_id: str, owner: str = "me", created_at: float | None = None) -> OutboxLine:
    return OutboxLine(log_id, b'{"log_id":"%s"}\n' % log_id.encode(), owner,
                      time.time() if created_at is None else created_at)


async def claim_all(store: SqliteStore | PostgresStore, owner: str = "me", **kw: Any) -> list[OutboxLine]:
    args = {"own_before": math.inf, "any_before": math.inf, "now": math.inf, "lease_until": time.time() + 60}
    return await store.claim_outbox(owner, **{**args, **kw})


async def test_outbox_line_commits_with_the_final_row_or_not_at_all(backend: Backend) -> None:
    await backend.execute(REFUSE_APPROVED_BOOM[backend.kind])
    boom = final_record()
    boom.id = "pay_boom"
    key = f"key-{time.time()}"
    now = time.time()
    await backend.store.claim_idempotency("checkout", key, "f" * 64, boom.id, now, now + 60)

    with pytest.raises(DB_ERRORS):
        await backend.store.save_payment(boom, IdempotentAnswer("checkout", key, StoredResponse(201, b"{}")),
                                         outbox_line("pay_boom:payment:00000000"))
    assert await claim_all(backend.store) == []
    assert await backend.store.get_payment("pay_boom") is None

    ok, follow = final_record(), final_record()
    line = outbox_line(f"{ok.id}:payment:00000001")
    await backend.store.save_payment(ok, outbox=line)
    with pytest.raises(DB_ERRORS):  # a log_id is unique: the same line cannot be stored twice
        await backend.store.save_payment(follow, outbox=line)
    assert await backend.store.get_payment(follow.id) is None
    assert await claim_all(backend.store) == [line]


async def test_claim_leases_pages_and_respects_owner_and_age(backend: Backend) -> None:
    now = time.time()
    lines = [outbox_line(f"pay_a:payment:{i:08x}", created_at=now - 100) for i in range(5)]
    young = outbox_line("pay_b:payment:00000000", created_at=now)
    foreign = outbox_line("pay_c:payment:00000000", owner="them", created_at=now - 100)
    for line in [*lines, young, foreign]:
        await backend.store.save_payment(final_record(), outbox=line)

    page = await claim_all(backend.store, own_before=now - 50, any_before=now - 200, now=now, lease_until=now + 60,
                           limit=3)
    rest = await claim_all(backend.store, own_before=now - 50, any_before=now - 200, now=now, lease_until=now + 60,
                           after=page[-1].log_id)
    assert [l.log_id for l in page + rest] == [l.log_id for l in lines]  # not the young one, not theirs
    assert page[0] == lines[0]  # bytes, owner and time round-trip
    # leased: a concurrent claimer gets nothing until the lease ends, a sole owner takes over
    assert await claim_all(backend.store, own_before=now - 50, any_before=now - 200, now=now) == []
    assert len(await claim_all(backend.store, own_before=now - 50, any_before=now - 200, now=now + 61)) == 5
    assert len(await claim_all(backend.store)) == 7

    await backend.store.delete_outbox([lines[0].log_id, lines[1].log_id, "pay_x:payment:ffffffff"])
    await backend.store.delete_outbox([])
    assert {l.log_id for l in await claim_all(backend.store)} == {l.log_id for l in lines[2:]} | {
        young.log_id, foreign.log_id}


# -- the writer's flush listener ----------------------------------------------------------------


def test_writer_reports_lines_on_disk_once_per_fsync_not_per_line(tmp_path: Path) -> None:
    reports: list[int] = []
    writer = JsonLinesWriter(tmp_path / "tx.jsonl", max_bytes=2048)
    writer.set_flush_listener(reports.append, sync_interval_s=0.2)
    writer.start()
    seqs = [writer.write(b'{"n":%d,"pad":"%s"}' % (n, b"x" * 100)) for n in range(200)]
    assert seqs == list(range(1, 201))
    assert writer.flush_barrier(5)
    assert reports and reports[-1] == 200  # reported before the barrier was released
    assert reports == sorted(set(reports)) and len(reports) < 20
    assert list(tmp_path.glob("tx-*.jsonl.gz"))  # reported across rotations
    writer.write(b'{"n":200}')
    deadline = time.monotonic() + 5
    while reports[-1] != 201 and time.monotonic() < deadline:  # no barrier: the interval passes
        time.sleep(0.01)
    assert reports[-1] == 201
    writer.close()
    assert writer.listener_errors == 0


def test_a_failing_listener_does_not_stop_the_log(tmp_path: Path) -> None:
    def broken(_seq: int) -> None:
        raise RuntimeError("listener bug")

    writer = JsonLinesWriter(tmp_path / "tx.jsonl")
    writer.set_flush_listener(broken)
    writer.start()
    writer.write(b'{"n":1}')
    assert writer.flush_barrier(5)
    writer.write(b'{"n":2}')
    writer.close()
    assert writer.listener_errors >= 1
    assert (tmp_path / "tx.jsonl").read_bytes() == b'{"n":1}\n{"n":2}\n'


# -- reading the log's tail ---------------------------------------------------------------------


def jl(log_id: str, pad: int = 0) -> bytes:
    return orjson.dumps({"event": "payment", "log_id": log_id, "pad": "p" * pad}, option=orjson.OPT_APPEND_NEWLINE)


def test_tail_reads_the_newest_rotated_file_when_the_current_one_is_small(tmp_path: Path) -> None:
    log = tmp_path / "transactions.jsonl"
    (tmp_path / "transactions-20250101T000000000000.jsonl.gz").write_bytes(gzip.compress(jl("old")))
    (tmp_path / "transactions-20250102T000000000000.jsonl.gz").write_bytes(
        gzip.compress(b"".join(jl(f"r{i:02d}", 50) for i in range(40))))
    (tmp_path / "transactions-20250103T000000000000.jsonl.gz.tmp").write_bytes(b"half written")
    log.write_bytes(jl("current") + jl("torn")[:20])

    assert logged_ids(log) == {"current"} | {f"r{i:02d}" for i in range(40)}  # not the older file: the gap
    window = len(jl("current") + jl("torn")[:20]) + 5 * len(jl("r00", 50))
    assert logged_ids(log, window) == {"current", "r35", "r36", "r37", "r38", "r39"}  # the cut line is left out
    assert logged_ids(log, 10) == set()  # the window holds only the torn end


def test_tail_of_a_large_current_file_stays_in_the_current_file(tmp_path: Path) -> None:
    log = tmp_path / "transactions.jsonl"
    (tmp_path / "transactions-20250102T000000000000.jsonl").write_bytes(jl("rotated"))
    log.write_bytes(b"".join(jl(f"c{i:03d}") for i in range(100)))
    assert logged_ids(log, len(jl("c000")) * 10) == {f"c{i:03d}" for i in range(90, 100)}
    assert "rotated" in logged_ids(log)
    assert logged_ids(tmp_path / "missing.jsonl") == set()


# -- the analysis counts one line per log_id -----------------------------------------------------


@pytest.mark.parametrize("materialize", ["none", "lines", "all"])
def test_analysis_keeps_one_line_per_log_id(tmp_path: Path, materialize: str) -> None:
    def line(pid: str, log_id: str | None) -> bytes:
        doc = {"ts": "2025-11-28T20:00:00.000000Z", "event": "payment", "payment_id": pid, "amount": 100,
               "currency": "EUR", "status": "approved", "attempts": [], "failovers": 0, "retries": 0,
               "created_at": 1764360000.0}
        if log_id is not None:
            doc["log_id"] = log_id
        return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)

    twice = line("pay_a", "pay_a:payment:0000000a")
    (tmp_path / "transactions-20251128T200000000000.jsonl.gz").write_bytes(gzip.compress(twice))
    # the copy written again after a crash, a copy in the same file, and two old lines without log_id
    (tmp_path / "transactions.jsonl").write_bytes(
        twice + line("pay_b", "pay_b:payment:0000000b") * 2 + line("pay_c", None) * 2)

    con, _files = open_log([tmp_path], materialize=materialize)  # type: ignore[arg-type]
    rows = con.execute("SELECT payment_id, count(*) FROM log_lines GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [("pay_a", 1), ("pay_b", 1), ("pay_c", 2)]
    assert con.execute("SELECT count(*) FROM payments WHERE payment_id IN ('pay_a', 'pay_b')").fetchone() == (2,)
    [(kept,)] = con.execute("SELECT file FROM log_lines WHERE payment_id = 'pay_a'").fetchall()
    assert kept.endswith(".jsonl.gz")  # the first copy, by file name


# -- rendering goes through the same pipeline as writing ------------------------------------------


def test_rendered_line_is_what_the_logger_would_write(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl")
    txlog = TransactionLog(writer, None, owner="me")  # type: ignore[arg-type]  # rendering needs no store
    line = txlog.render("payment", payment_id="pay_x", card={"number": VISA, "cvc": "123"},
                        note=f"Bearer sk_test_abcdefghijkl {VISA}")
    doc = orjson.loads(line.line)
    assert line.line.endswith(b"\n") and line.line.count(b"\n") == 1
    assert doc["log_id"] == line.log_id and line.log_id.startswith("pay_x:payment:")
    assert doc["card"] == {"number": "[REDACTED]", "cvc": "[REDACTED]"}
    assert VISA not in doc["note"] and "sk_test_abcdefghijkl" not in doc["note"]
    assert line.owner == "me" and abs(line.created_at - time.time()) < 5
    assert txlog.render("payment", payment_id="pay_x").log_id != line.log_id
    writer.close()
