"""Versioned schema migrations (gateway/journal/schema.py) on real SQLite and PostgreSQL.

A start on an up-to-date database reads one number and runs no DDL (so it cannot queue behind,
or deadlock with, live payments); a database behind this code is migrated once, by whoever
gets the lock first; a database from before versions existed is adopted as version 1; a
schema this code does not know refuses the start with one line. `gateway db status|migrate`
is the ops side of the same thing.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli import app as cli
from gateway.journal.postgres import PostgresStore
from gateway.journal.schema import migrations, postgres_prepare
from gateway.journal.sqlite import SqliteStore
from gateway.journal.errors import JournalUnavailable, SchemaMismatch
from domain.outcome import PaymentStatus
from tests.conftest import payment, pg_schema

LATEST = len(migrations("sqlite"))
ALL_STEPS = [m.label for m in migrations("sqlite")]

# What the gateway created on every start before versioned migrations (commit 48325d9), and a
# row as it wrote them: no version column, no version in the document.
LEGACY_SCHEMA = {
    "sqlite": """
        CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL,
            updated_at REAL NOT NULL, doc BLOB NOT NULL);
        CREATE INDEX IF NOT EXISTS payments_unresolved ON payments (updated_at)
            WHERE status IN ('received', 'attempting', 'pending');
        CREATE TABLE IF NOT EXISTS idempotency (scope TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL,
            resource_id TEXT NOT NULL, state TEXT NOT NULL, status INTEGER, body BLOB, created_at REAL NOT NULL,
            expires_at REAL NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
        CREATE INDEX IF NOT EXISTS idempotency_resource ON idempotency (resource_id);
    """,  # an older release still: no outbox table yet
    "postgres": """
        CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, status TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, doc BYTEA NOT NULL);
        CREATE INDEX IF NOT EXISTS payments_unresolved ON payments (updated_at)
            WHERE status IN ('received', 'attempting', 'pending');
        CREATE TABLE IF NOT EXISTS idempotency (scope TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL,
            resource_id TEXT NOT NULL, state TEXT NOT NULL, status INTEGER, body BYTEA,
            created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (scope, key));
        CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
        CREATE INDEX IF NOT EXISTS idempotency_resource ON idempotency (resource_id);
        CREATE TABLE IF NOT EXISTS outbox (log_id TEXT COLLATE "C" PRIMARY KEY, owner TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, claimed_until DOUBLE PRECISION, line BYTEA NOT NULL);
    """,
}


class Db:
    """One database, reached the way the gateway does (stores) and with plain SQL beside it."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where

    def store(self, *, migrate: bool = True) -> SqliteStore | PostgresStore:
        if self.kind == "sqlite":
            return SqliteStore(Path(self.where), migrate=migrate)
        return PostgresStore(self.where, min_size=1, max_size=3, migrate=migrate)

    async def script(self, sql: str) -> None:
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.where)
            try:
                conn.executescript(sql)
            finally:
                conn.close()
            return
        conn = await asyncpg.connect(self.where, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.where)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        conn = await asyncpg.connect(self.where, timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def tables(self) -> set[str]:
        if self.kind == "sqlite":
            return {r[0] for r in await self.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {r[0] for r in await self.rows("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

    async def versions(self) -> list[int]:
        return [r[0] for r in await self.rows("SELECT version FROM schema_migrations ORDER BY version")]

    async def legacy(self) -> str:
        """A database as the release before versioned migrations left it, with one payment."""
        await self.script(LEGACY_SCHEMA[self.kind])
        record = payment(status=PaymentStatus.PENDING)
        doc = orjson.dumps({k: v for k, v in record.to_doc().items() if k != "version"}).decode()
        quoted = doc.replace("'", "''")
        blob = f"CAST('{quoted}' AS BLOB)" if self.kind == "sqlite" else f"convert_to('{quoted}', 'UTF8')"
        await self.script(f"INSERT INTO payments (id, status, created_at, updated_at, doc) VALUES "
                          f"('{record.id}', 'pending', {record.created_at}, {record.updated_at}, {blob})")
        return record.id


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    if request.param == "sqlite":
        yield Db("sqlite", str(tmp_path / "journal.db"))
    else:
        async with pg_schema() as dsn:
            yield Db("postgres", dsn)


async def opened(db: Db, *, migrate: bool = True) -> list[str]:
    """Open and close a store; the labels of the steps it applied."""
    store = db.store(migrate=migrate)
    await store.open()
    await store.close()
    return [step.label for step in store.migrated]


# -- the store's start ---------------------------------------------------------------------------------


async def test_an_empty_database_is_migrated_once_and_then_only_read(db: Db) -> None:
    assert await opened(db) == ALL_STEPS
    assert await db.versions() == list(range(1, LATEST + 1))
    assert {"payments", "idempotency", "outbox", "schema_migrations"} <= await db.tables()

    assert await opened(db) == []
    assert await opened(db, migrate=False) == []  # up to date: no migration needed, none run


async def test_a_database_from_before_versions_is_adopted_as_version_1(db: Db) -> None:
    payment_id = await db.legacy()

    assert await opened(db) == ALL_STEPS  # step 1 changed nothing there, or added the missing outbox
    assert await db.versions() == list(range(1, LATEST + 1))
    assert "outbox" in await db.tables()
    store = db.store()
    await store.open()
    try:
        record = await store.get_payment(payment_id)
        assert record is not None and record.version == 1 and record.status is PaymentStatus.PENDING
        record.status = PaymentStatus.APPROVED
        await store.save_payment(record)
        assert [r.version for r in await store.lease_unresolved("me", 60)] == []
        got = await store.get_payment(payment_id)
        assert got is not None and got.version == 2
    finally:
        await store.close()


async def test_without_auto_migrate_a_database_behind_refuses_the_start_in_one_line(db: Db) -> None:
    await db.legacy()
    before = await db.tables()

    with pytest.raises(SchemaMismatch) as refused:
        await opened(db, migrate=False)

    message = str(refused.value)
    assert "\n" not in message and "before versioned migrations" in message
    assert f"needs version {LATEST}" in message and "gateway db migrate" in message
    assert await db.tables() == before, "nothing was created"


async def test_a_schema_newer_than_this_code_refuses_the_start(db: Db) -> None:
    await opened(db)
    await db.script(f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({LATEST + 1}, 'future', 0)")

    for migrate in (True, False):
        with pytest.raises(SchemaMismatch, match=rf"^journal schema version {LATEST + 1} is newer than this "
                                                 rf"gateway knows \({LATEST}\)"):
            await opened(db, migrate=migrate)


async def test_replicas_starting_together_migrate_once(db: Db) -> None:
    stores = [db.store() for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    await asyncio.gather(*(s.close() for s in stores))

    applied = [step.label for s in stores for step in s.migrated]
    assert sorted(applied) == sorted(ALL_STEPS)
    assert await db.versions() == list(range(1, LATEST + 1))


async def test_postgres_start_on_an_up_to_date_schema_does_not_wait_for_live_payments() -> None:
    """The rolling-restart deadlock: a replica starting while others hold row locks on payments.
    The old start ran CREATE INDEX IF NOT EXISTS, which waits for a lock that conflicts with
    every live write; now the start reads the version and touches no table lock."""
    async with pg_schema() as dsn:
        db = Db("postgres", dsn)
        await opened(db)
        record = payment()
        store = db.store()
        await store.open()
        live = await asyncpg.connect(dsn, timeout=5)
        try:
            await store.save_payment(record)
            transaction = live.transaction()
            await transaction.start()
            await live.execute("UPDATE payments SET updated_at = updated_at + 1 WHERE id = $1", record.id)

            started = time.monotonic()
            await asyncio.wait_for(opened(db), 3.0)

            assert time.monotonic() - started < 3.0
            await transaction.rollback()
        finally:
            await live.close()
            await store.close()


async def test_postgres_migration_step_gives_up_on_its_lock_instead_of_stalling_live_payments() -> None:
    async with pg_schema() as dsn:
        db = Db("postgres", dsn)
        payment_id = await db.legacy()
        await db.script("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                        "applied_at DOUBLE PRECISION NOT NULL); "
                        "INSERT INTO schema_migrations VALUES (1, 'initial', 0)")  # a database at version 1
        live = await asyncpg.connect(dsn, timeout=5)
        migrator = await asyncpg.connect(dsn, timeout=5)
        try:
            transaction = live.transaction()
            await transaction.start()
            await live.execute("UPDATE payments SET updated_at = updated_at + 1 WHERE id = $1", payment_id)

            with pytest.raises(JournalUnavailable, match=r"migration 0002_versions_and_leases could not lock"):
                await postgres_prepare(migrator, migrate=True, lock_timeout_ms=200)

            assert await db.versions() == [1]  # the step rolled back whole
            await live.execute("UPDATE payments SET updated_at = updated_at + 1 WHERE id = $1", payment_id)
            await transaction.commit()  # the live payment was never blocked or failed
            assert [m.label for m in await postgres_prepare(migrator, migrate=True)] == ALL_STEPS[1:]
        finally:
            await live.close()
            await migrator.close()


# -- ops: gateway db status | migrate, and a replica that refuses -------------------------------------------


def write_config(tmp_path: Path, db: Db, **storage: Any) -> Path:
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "gateway.yaml").read_text())
    if db.kind == "sqlite":
        data["storage"] = {"sqlite_path": db.where, **storage}
    else:
        data["storage"] = {"backend": "postgres", "postgres_dsn_env": "TEST_MIGRATE_DSN", **storage}
    data["log"] = {"dir": str(tmp_path / "logs")}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def cli_env(db: Db, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"GATEWAY_KEY_ADMIN": "test-admin-key", "TEST_MIGRATE_DSN": db.where}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


async def test_db_status_and_migrate(db: Db, tmp_path: Path, cli_env: dict[str, str]) -> None:
    config = str(write_config(tmp_path, db))
    await db.legacy()

    code, out, _ = await asyncio.to_thread(run_cli, "db", "status", "--config", config)
    assert code == 1 and "before versioned migrations" in out and "0001_initial, 0002_versions_and_leases" in out
    code, out, _ = await asyncio.to_thread(run_cli, "db", "status", "--config", config, "--json")
    assert code == 1 and orjson.loads(out) == {"backend": db.kind, "version": 0, "latest": LATEST, "legacy": True,
                                               "up_to_date": False, "pending": ALL_STEPS}

    code, out, _ = await asyncio.to_thread(run_cli, "db", "migrate", "--config", config)
    assert code == 0 and out.splitlines() == [f"applied {label}" for label in ALL_STEPS] + [
        out.splitlines()[-1]] and out.splitlines()[-1].endswith(f"migrated to schema version {LATEST}")
    code, out, _ = await asyncio.to_thread(run_cli, "db", "migrate", "--config", config)
    assert code == 0 and out.strip().endswith("already up to date")
    code, out, _ = await asyncio.to_thread(run_cli, "db", "status", "--config", config)
    assert code == 0 and out.strip().endswith(f"schema version {LATEST} (up to date)")
    assert "gateway:gateway" not in out  # the DSN's credentials are never printed

    await db.script(f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({LATEST + 1}, 'future', 0)")
    code, _, err = await asyncio.to_thread(run_cli, "db", "migrate", "--config", config)
    assert code == 1 and "is newer than this gateway knows" in err


def test_db_status_of_an_unreachable_database_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KEY_ADMIN", "test-admin-key")
    monkeypatch.setenv("TEST_MIGRATE_DSN", "postgresql://gateway:secret@127.0.0.1:1/nowhere")
    config = str(write_config(tmp_path, Db("postgres", "")))

    code, out, err = run_cli("db", "status", "--config", config)

    assert code == 2 and out == ""
    assert err.startswith("error: PostgreSQL 127.0.0.1:1/nowhere: cannot read the schema") and "secret" not in err


async def test_serve_refuses_a_schema_it_does_not_know_in_one_line(tmp_path: Path) -> None:
    db = Db("sqlite", str(tmp_path / "data" / "gateway.db"))
    await opened(db)
    await db.script(f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({LATEST + 1}, 'future', 0)")
    config = write_config(tmp_path, db)
    env = {**os.environ, "GATEWAY_KEY_CHECKOUT": "k1", "GATEWAY_KEY_REPORTING": "k2", "GATEWAY_KEY_ADMIN": "k3",
           "STRIPE_API_KEY": "s", "ADYEN_API_KEY": "a", "CHECKOUT_API_KEY": "c",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway.cli", "serve", "--config",
                                                    str(config), "--port", "0"],
                                   env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"error: journal schema version {LATEST + 1} is newer than this gateway knows ({LATEST}): run a gateway "
        "release that knows it, or restore a database of this release")


async def test_a_release_serves_on_a_database_lacking_only_its_deferrable_steps(
        db: Db, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The rolling upgrade the fleet drill runs: the database one step behind (`migrate --to`),
    replicas that may not migrate start on it because that step is declared deferrable (an
    index), the step is applied live, and nothing else is ever skipped."""
    config = str(write_config(tmp_path, db, auto_migrate=False))
    last = migrations(db.kind)[-1]
    assert last.deferrable and not migrations(db.kind)[1].deferrable

    code, out, _ = await asyncio.to_thread(run_cli, "db", "migrate", "--config", config, "--to", "1")
    assert code == 0 and out.splitlines()[0] == f"applied {ALL_STEPS[0]}"
    with pytest.raises(SchemaMismatch, match="gateway db migrate"):  # 0002 is not deferrable
        await opened(db, migrate=False)

    code, out, _ = await asyncio.to_thread(run_cli, "db", "migrate", "--config", config, "--to", str(LATEST - 1))
    assert code == 0 and out.splitlines()[:-1] == [f"applied {label}" for label in ALL_STEPS[1:-1]]
    assert await opened(db, migrate=False) == []  # serves, and runs no DDL
    assert await db.versions() == list(range(1, LATEST))
    code, out, _ = await asyncio.to_thread(run_cli, "db", "status", "--config", config)
    assert code == 1 and last.label in out  # still pending, and ops are told

    code, _, err = await asyncio.to_thread(run_cli, "db", "migrate", "--config", config, "--to", "1")
    assert code == 1 and "migrations only go forward" in err
    code, out, _ = await asyncio.to_thread(run_cli, "db", "migrate", "--config", config)
    assert code == 0 and out.splitlines()[0] == f"applied {last.label}"
    assert await db.versions() == list(range(1, LATEST + 1))


async def test_a_store_opening_while_another_process_migrates_a_fresh_file_waits_for_it(tmp_path: Path) -> None:
    """`serve --workers 2` on a fresh SQLite file: one worker migrates while the other opens. The
    second's switch to WAL met the first's lock at once ("database is locked": its start failed
    and the host did not come up) instead of waiting for the migration to end."""
    path = tmp_path / "journal.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")  # the other worker, mid-migration
    holder.execute("CREATE TABLE other_worker_migrating (x)")
    store = SqliteStore(path)
    opening = asyncio.create_task(store.open())
    try:
        await asyncio.sleep(0.3)  # the lock is held for a while: no event to wait for in another connection
        assert not opening.done()
        holder.execute("COMMIT")
        await asyncio.wait_for(opening, 10)
        assert [m.version for m in store.migrated] == [m.version for m in migrations("sqlite")]
    finally:
        holder.close()
        await store.close()
