"""Versioned schema migrations for both journal backends.

Why: every start used to run `CREATE ... IF NOT EXISTS` in one transaction. On PostgreSQL that
takes table locks beside live payments' row locks, and a rolling restart deadlocked with them.
Now a start reads one number and runs no DDL on an up-to-date database. DDL runs only when the
database is behind this code: once, by ops (`gateway db migrate`) or by the first replica to
start (`storage.auto_migrate`), one migrator at a time.

- `schema_migrations (version, name, applied_at)` holds a row per applied step; the schema
  version is the highest. A database created before versions existed has the tables but not
  this one: step 1 is exactly that old schema, written with IF NOT EXISTS, so applying it there
  changes nothing (or adds what an older release lacked) and adopts the database as version 1.
- Steps are `migrations/<backend>/NNNN_name.sql`, numbered from 1 without gaps.
- One migrator at a time. PostgreSQL: a session `pg_advisory_lock` per schema, taken only when
  there is something to do; whoever waited for it reads the version again and finds the work
  done. Each step is its own transaction with its version row, under a `lock_timeout`: a step
  that cannot get its table lock promptly fails (retried later) rather than queue every live
  payment behind its lock request. SQLite: the check and every step run in one `BEGIN
  IMMEDIATE` transaction (the database's single write lock), so workers starting together
  migrate once.
- A database newer than this code, or older and not to be migrated here, is `SchemaMismatch`
  with one line that says what to do.

Steps must be additive (expand now, contract in a later release): the previous release keeps
serving beside a migrated database during a rolling upgrade. A step this release's code does not
depend on (an index: queries are right without it, only slower) says so with a header line
`-- deferrable: true` (and why); a replica that may not migrate starts on a database that lacks only such
steps, so they can be applied live (`gateway db migrate`) after the release is out, and
`gateway db migrate --to VERSION` stops short of them.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import asyncpg

from gateway.journal.errors import JournalUnavailable, SchemaMismatch

Backend = Literal["sqlite", "postgres"]

LOCK_TIMEOUT_MS = 5000  # a step waits this long for its table locks, then fails and is retried
_ADVISORY_CLASS = 0x67617465  # "gate": pg_advisory_lock(class, hashtext(current_schema()))
_STEP_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_DEFERRABLE = re.compile(r"^-- deferrable: true\b", re.MULTILINE)

_VERSIONS_TABLE = {
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
              "applied_at REAL NOT NULL)",
    "postgres": "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at DOUBLE PRECISION NOT NULL)",
}


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def deferrable(self) -> bool:
        """This release's code runs correctly on a database that lacks this step."""
        return _DEFERRABLE.search(self.sql) is not None

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@functools.cache
def migrations(backend: Backend) -> tuple[Migration, ...]:
    """The steps this code knows for `backend`, in order; a gap or a stray file is a bug here."""
    folder = resources.files("gateway.journal") / "migrations" / backend
    steps = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _STEP_FILE.fullmatch(entry.name)
        if match is None:
            raise RuntimeError(f"migrations/{backend}/{entry.name}: not named NNNN_name.sql")
        steps.append(Migration(int(match[1]), match[2], entry.read_text()))
    steps.sort(key=lambda m: m.version)
    if [m.version for m in steps] != list(range(1, len(steps) + 1)):
        raise RuntimeError(f"migrations/{backend}: steps must be numbered 1, 2, ... without gaps")
    return tuple(steps)


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    backend: Backend
    current: int  # 0: no schema_migrations table
    legacy: bool  # the tables exist from before versioned migrations (adopted by step 1)

    @property
    def latest(self) -> int:
        return len(migrations(self.backend))

    @property
    def pending(self) -> tuple[Migration, ...]:
        return migrations(self.backend)[self.current:] if self.current <= self.latest else ()

    @property
    def up_to_date(self) -> bool:
        return self.current == self.latest

    @property
    def newer(self) -> bool:
        return self.current > self.latest

    def describe(self) -> str:
        if self.newer:
            return f"schema version {self.current} is newer than this gateway knows ({self.latest})"
        if self.up_to_date:
            return f"schema version {self.current} (up to date)"
        if self.legacy:
            at = "no schema version (tables from before versioned migrations, adopted as version 1 by migrate)"
        elif self.current == 0:
            at = "an empty database"
        else:
            at = f"schema version {self.current}"
        pending = ", ".join(m.label for m in self.pending)
        return f"{at}; this gateway needs version {self.latest} (pending: {pending})"

    @property
    def serviceable(self) -> bool:
        """This code can run on the database as it is: up to date, or lacking only deferrable steps."""
        return not self.newer and all(m.deferrable for m in self.pending)

    def to(self, target: int | None) -> tuple[Migration, ...]:
        """The pending steps up to `target` (None: all of them)."""
        if target is None:
            return self.pending
        if not self.current <= target <= self.latest:
            raise SchemaMismatch(f"cannot migrate to schema version {target}: the journal is at {self.current}, "
                                 f"this gateway knows 1..{self.latest} (migrations only go forward)")
        return tuple(m for m in self.pending if m.version <= target)

    def require(self, *, migrate: bool) -> None:
        """Raise `SchemaMismatch` unless this code can run on the database (after migrating, if
        `migrate`)."""
        if self.newer:
            raise SchemaMismatch(f"journal {self.describe()}: run a gateway release that knows it, "
                                 "or restore a database of this release")
        if not self.serviceable and not migrate:
            raise SchemaMismatch(f"journal at {self.describe()}: run `gateway db migrate --config FILE` first, "
                                 "or set storage.auto_migrate: true")


# -- SQLite (a connection in autocommit mode, isolation_level=None) --------------------------------


def sqlite_status(conn: sqlite3.Connection) -> SchemaStatus:
    def has(table: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() \
            is not None

    if has("schema_migrations"):
        (current,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        return SchemaStatus("sqlite", current, legacy=False)
    return SchemaStatus("sqlite", 0, legacy=has("payments"))


def sqlite_prepare(conn: sqlite3.Connection, *, migrate: bool, target: int | None = None) -> list[Migration]:
    """Check the schema and, when behind and `migrate`, apply what is pending (up to `target`),
    all under the write lock; returns the steps applied (none for an up-to-date database: no
    DDL runs)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        status = sqlite_status(conn)
        status.require(migrate=migrate)
        applied = list(status.to(target)) if migrate else []
        if applied:
            conn.execute(_VERSIONS_TABLE["sqlite"])
        for step in applied:
            for statement in _sqlite_statements(step.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                         (step.version, step.name, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied


def _sqlite_statements(script: str) -> Iterator[str]:
    """One statement at a time (`executescript` would commit the open transaction first)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if any(line.strip() and not line.strip().startswith("--") for line in buffer.splitlines()):
        raise RuntimeError(f"incomplete SQL statement at the end of a migration: {buffer.strip()[:80]!r}")


# -- PostgreSQL --------------------------------------------------------------------------------------


async def postgres_status(conn: asyncpg.Connection) -> SchemaStatus:
    versions, payments = await conn.fetchrow(
        "SELECT to_regclass('schema_migrations') IS NOT NULL, to_regclass('payments') IS NOT NULL")
    if versions:
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return SchemaStatus("postgres", current, legacy=False)
    return SchemaStatus("postgres", 0, legacy=payments)


async def postgres_prepare(conn: asyncpg.Connection, *, migrate: bool, target: int | None = None,
                           lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> list[Migration]:
    """Check the schema (one read, no lock, on an up-to-date database) and, when behind and
    `migrate`, apply what is pending (up to `target`) under the advisory lock; returns the steps
    applied here."""
    status = await postgres_status(conn)
    status.require(migrate=migrate)
    if not migrate or not status.to(target):
        return []
    await conn.execute("SELECT pg_advisory_lock($1, hashtext(current_schema()))", _ADVISORY_CLASS)
    try:
        status = await postgres_status(conn)  # another replica may have migrated while we waited
        status.require(migrate=True)
        applied = []
        for step in status.to(target):
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                    await conn.execute(_VERSIONS_TABLE["postgres"])
                    await conn.execute(step.sql)
                    await conn.execute("INSERT INTO schema_migrations (version, name, applied_at) "
                                       "VALUES ($1, $2, extract(epoch FROM now()))", step.version, step.name)
            except asyncpg.LockNotAvailableError as exc:
                raise JournalUnavailable(f"migration {step.label} could not lock its tables within "
                                         f"{lock_timeout_ms / 1000:g} s (live transactions hold them); "
                                         "nothing of it was applied, retry") from exc
            applied.append(step)
        return applied
    finally:
        # A lost connection has released the lock already: never mask the error that lost it.
        with contextlib.suppress(asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1, hashtext(current_schema()))", _ADVISORY_CLASS)
