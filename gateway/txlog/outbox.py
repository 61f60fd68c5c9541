"""The transaction log's outbox: every transaction line in the file exactly once, across crashes.

The writer (`JsonLinesWriter`) keeps file I/O off the event loop, so a line reaches the file a
few milliseconds after the journal commit of the state it records. A SIGKILL in between used to
lose the line for good (DESIGN rule 5). The outbox closes that gap:

1. `TransactionLog.render` renders the line before the final journal write: the transaction
   logger's own pipeline, Redactor included (`build_transaction_renderer`), returning bytes, with
   a fresh `log_id` field. The caller stores it with `Store.save_payment(..., outbox=line)`, so
   the line commits in the same transaction as the row.
2. After the commit, `emit` queues those exact bytes to the writer. The writer reports "durable
   through sequence N" from its thread once per fsync (`set_flush_listener`); each report is
   handed to the event loop with one `call_soon_threadsafe`, and the outbox rows of the lines it
   covers are deleted in batches (one store operation per batch, in a background task that no
   request waits for).
3. At start-up, before the app serves (`recover`), rows left in the outbox are lines whose commit
   happened but whose flush, or only whose delete, may not have. The tail of the log file is read
   for their `log_id`s; only the missing lines are written again, and the rows are deleted once
   they are on disk. A periodic pass (`sweep`) does the same, after `ORPHAN_AGE_S`, for rows left
   behind while the process runs: a commit whose answer was lost, a line the full queue refused,
   or, on a store shared by replicas, the rows of a replica that died.

Shared stores: the rows carry their `owner` (host and log file; each worker of `serve --workers
N` has a file of its own, and one live process holds a file's lock, `gateway.txlog.file_lock`,
so a process restarted on its file is that file's sole writer and takes its predecessor's rows
at once: `recover(sole_writer=True)`). At start-up a process that does not own its store alone
deletes the rows of its own file that the file already holds, writes again the others of its
own (without `sole_writer`, only those older than `ORPHAN_AGE_S`: younger ones might belong to
a live writer of the same file; the sweep writes them later if they stay), and adopts other
owners' rows only after `FOREIGN_ORPHAN_AGE_S` (a replica that never came back). A claim leases the rows, so
workers starting together do not both write the same line.

The one remaining gap: the check reads a bounded tail, `TAIL_BYTES` of the current file and,
when that file is shorter, the end of the newest rotated file. A row whose line was flushed (its
delete not yet done when the process died, a window of about `DEFAULT_SYNC_INTERVAL_S` plus one
store round trip) and whose line has since left that window (more than `TAIL_BYTES` of newer
lines in that instant, or two rotations, the older file compressed away) is written a second
time. The analysis views (`gateway.analysis.view`) keep one line per `log_id`, so even then
nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import os
import secrets
import socket
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.journal.records import OutboxLine
from gateway.journal.store import Store
from gateway.tasks import stop_task
from gateway.txlog.logger import build_transaction_renderer
from gateway.txlog.redaction import Redactor
from gateway.txlog.writer import JsonLinesWriter, LogWriterError

__all__ = [
    "FOREIGN_ORPHAN_AGE_S",
    "ORPHAN_AGE_S",
    "TAIL_BYTES",
    "OutboxPass",
    "TransactionLog",
    "log_owner",
    "logged_ids",
]

# How much of the log's end the start-up check reads for the log_ids of leftover rows.
TAIL_BYTES = 8 * 2**20
# A row this old that this process did not write is an orphan (its writer is gone).
ORPHAN_AGE_S = 30.0
# ... and on a shared store, another host's or file's row this old (a replica that never returned).
FOREIGN_ORPHAN_AGE_S = 600.0
SWEEP_INTERVAL_S = 30.0
LEASE_S = 60.0  # a claimed row is this pass's to write for this long
CLAIM_BATCH = 500
DELETE_BATCH = 1000
_DELETE_RETRY_S = (0.05, 2.0)  # first and longest pause between retries of a failed delete
_LOG_ID_KEY = b'"log_id"'


def log_owner(path: Path) -> str:
    """The name outbox rows carry for the log file they belong in: host and absolute path."""
    return f"{socket.gethostname()}:{Path(path).resolve()}"


@dataclass(frozen=True, slots=True)
class OutboxPass:
    """What one recovery or sweep pass did with the outbox rows it claimed."""

    claimed: int = 0
    already_logged: int = 0  # the file held the line: only the row was deleted
    reemitted: int = 0  # written to the file again
    deferred: int = 0  # too young to be known orphans (shared store): left to the sweep

    def __add__(self, other: OutboxPass) -> OutboxPass:
        return OutboxPass(self.claimed + other.claimed, self.already_logged + other.already_logged,
                          self.reemitted + other.reemitted, self.deferred + other.deferred)


class TransactionLog:
    """Transaction lines with a transactional outbox; see the module docstring.

    One per process and log file. `start` before the first `emit`, `close` after the last; the
    deletes of flushed rows need the store, so close this before the store.
    """

    def __init__(self, writer: JsonLinesWriter, store: Store, *, redactor: Redactor | None = None,
                 owner: str | None = None, ops_log: Any = None, tail_bytes: int = TAIL_BYTES,
                 max_backlog: int | None = None) -> None:
        if max_backlog is not None and max_backlog < 1:
            raise ValueError("max_backlog must be positive")
        self.writer = writer
        self.store = store
        self.max_backlog = max_backlog
        self.owner = owner or ""  # by default log_owner(writer.path), resolved in start(): off the loop
        self.tail_bytes = tail_bytes
        self._render = build_transaction_renderer(redactor=redactor)
        self._ops = ops_log
        self._loop: asyncio.AbstractEventLoop | None = None
        # log_ids emitted by this process whose rows are not deleted yet: never orphans.
        self._known: set[str] = set()
        # (writer sequence, log_id, monotonic time emitted) not yet on disk
        self._pending: deque[tuple[int, str, float]] = deque()
        self._deletable: list[str] = []  # on disk, row still to delete
        self._deleter: asyncio.Task[None] | None = None
        self.emit_failures = 0
        self.delete_errors = 0
        self.deleted = 0

    # -- health --------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Lines emitted by this process and not yet on disk: each is still only in the outbox."""
        return len(self._pending)

    def backlogged(self) -> bool:
        """True once `max_backlog` lines (`log.max_outbox_backlog`; None: no bound) wait for the
        disk: the API refuses new payments (503) rather than charge more whose lines cannot be
        written (a full disk, a directory gone)."""
        return self.max_backlog is not None and len(self._pending) >= self.max_backlog

    def oldest_wait_s(self) -> float:
        """How long the oldest line emitted and not yet on disk has waited (0 when none waits): a
        writer that stopped making progress without failing (stuck in the kernel) shows here."""
        return time.monotonic() - self._pending[0][2] if self._pending else 0.0

    # -- lifetime --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.owner:
            self.owner = await asyncio.to_thread(log_owner, self.writer.path)  # resolving the path stats the disk
        self.writer.set_flush_listener(self._durable_through)

    async def settle(self, timeout: float = 10) -> bool:
        """Until every line emitted so far is on disk and its outbox row deleted (for tests and
        shutdown). False if that did not happen within `timeout`."""
        deadline = time.monotonic() + timeout
        if not await self.writer.wait_flushed(timeout):
            return False
        # The barrier's report was queued to the loop before the barrier was released, so every
        # flushed line is in _deletable or already deleted by now.
        while self._deleter is not None and not self._deleter.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._deleter), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
        return not self._pending and not self._deletable

    async def close(self, timeout: float = 10) -> None:
        """Drain (bounded: at once when the disk is failing), then stop listening; rows still in
        the outbox wait for the next start."""
        try:
            await self.settle(timeout)
        finally:
            self.writer.set_flush_listener(None)
            await stop_task(self._deleter)

    # -- the request path ------------------------------------------------------------------------

    def render(self, event: str, **fields: Any) -> OutboxLine:
        """Render one transaction line with a fresh `log_id`, through the redacting pipeline,
        without writing it. Store it with the final journal write, then `emit` it."""
        payment_id = fields.get("payment_id")
        # Hex: never a 12-digit run the Redactor would mask as a card number.
        log_id = f"{payment_id}:{event}:{secrets.token_hex(4)}" if payment_id else f"{event}:{secrets.token_hex(8)}"
        data: bytes = self._render.info(event, log_id=log_id, **fields)
        if b'"log_id":"' + log_id.encode() + b'"' not in data:
            log_id = orjson.loads(data)["log_id"]  # redaction or escaping changed it: the file's value counts
        return OutboxLine(log_id, data, self.owner, time.time())

    def emit(self, line: OutboxLine) -> bool:
        """Queue a committed line to the writer; its outbox row is deleted once it is on disk.

        Never raises for a refused line (full queue, closed writer): the row stays in the outbox
        and a sweep writes the line later. Returns whether the line was queued.
        """
        try:
            seq = self.writer.write(line.line)
        except LogWriterError:
            self.emit_failures += 1
            return False
        self._known.add(line.log_id)
        self._pending.append((seq, line.log_id, time.monotonic()))
        return True

    # -- flushed lines: delete their rows, in batches, off the request path -----------------------

    def _durable_through(self, seq: int) -> None:
        """Writer thread: lines up to `seq` are on disk. One loop wake-up per report."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._on_durable, seq)
        except RuntimeError:  # the loop is closed: the rows wait for the next start-up
            pass

    def _on_durable(self, seq: int) -> None:
        pending = self._pending
        while pending and pending[0][0] <= seq:
            self._deletable.append(pending.popleft()[1])
        if self._deletable and (self._deleter is None or self._deleter.done()):
            self._deleter = asyncio.get_running_loop().create_task(self._delete_flushed(),
                                                                   name="txlog-outbox-delete")

    async def _delete_flushed(self) -> None:
        pause = _DELETE_RETRY_S[0]
        while self._deletable:
            batch = self._deletable[:DELETE_BATCH]
            del self._deletable[:DELETE_BATCH]
            try:
                await self.store.delete_outbox(batch)
            except Exception as exc:  # noqa: BLE001 - retried: the lines are safe, only rows linger
                self._deletable[:0] = batch
                self.delete_errors += 1
                if self.delete_errors == 1 or self.delete_errors % 100 == 0:
                    self._warn("txlog_outbox_delete_failed", error=repr(exc), rows=len(self._deletable))
                await asyncio.sleep(pause)
                pause = min(pause * 2, _DELETE_RETRY_S[1])
                continue
            self._known.difference_update(batch)
            self.deleted += len(batch)
            pause = _DELETE_RETRY_S[0]

    # -- rows a crash left behind ----------------------------------------------------------------

    async def recover(self, *, exclusive: bool, sole_writer: bool = False) -> OutboxPass:
        """Start-up: write again the outbox lines the file does not hold (see the module docstring).

        `exclusive`: no other process uses this store, so every row is an orphan of a previous
        process (and its leases are void). `sole_writer`: no other live process writes this log
        file (the app holds its lock), so its rows are orphans at once."""
        now = time.time()
        if exclusive:
            result = await self._pass(own_before=math.inf, any_before=math.inf, free_at=math.inf,
                                      emit_own_before=math.inf, now=now)
        else:
            result = await self._pass(own_before=math.inf, any_before=now - FOREIGN_ORPHAN_AGE_S, free_at=now,
                                      emit_own_before=math.inf if sole_writer else now - ORPHAN_AGE_S, now=now)
        if result.claimed:
            self._info("txlog_outbox_recovered", claimed=result.claimed, already_logged=result.already_logged,
                       reemitted=result.reemitted, deferred=result.deferred)
        return result

    async def sweep(self, *, exclusive: bool) -> OutboxPass:
        """One periodic pass: rows older than ORPHAN_AGE_S that this process is not handling."""
        now = time.time()
        foreign_age = ORPHAN_AGE_S if exclusive else FOREIGN_ORPHAN_AGE_S
        result = await self._pass(own_before=now - ORPHAN_AGE_S, any_before=now - foreign_age, free_at=now,
                                  emit_own_before=math.inf, now=now)
        if result.reemitted:
            self._warn("txlog_outbox_reemitted", reemitted=result.reemitted, already_logged=result.already_logged)
        return result

    async def run_forever(self, *, exclusive: bool, interval_s: float = SWEEP_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep(exclusive=exclusive)
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                self._warn("txlog_outbox_sweep_failed", error=repr(exc))

    async def _pass(self, *, own_before: float, any_before: float, free_at: float, emit_own_before: float,
                    now: float) -> OutboxPass:
        total = OutboxPass()
        in_file: set[str] | None = None  # the tail's log_ids, read once per pass when first needed
        after = ""
        while True:
            rows = await self.store.claim_outbox(self.owner, own_before=own_before, any_before=any_before,
                                                 now=free_at, lease_until=now + LEASE_S, after=after,
                                                 limit=CLAIM_BATCH)
            if not rows:
                break
            after = max(r.log_id for r in rows)
            orphans = [r for r in rows if r.log_id not in self._known]
            if orphans and in_file is None:
                in_file = await asyncio.to_thread(logged_ids, self.writer.path, self.tail_bytes)
            total += await self._handle(orphans, in_file or set(), emit_own_before)
            if len(rows) < CLAIM_BATCH:
                break
        return total

    async def _handle(self, rows: Sequence[OutboxLine], in_file: set[str], emit_own_before: float) -> OutboxPass:
        logged = [r.log_id for r in rows if r.log_id in in_file]
        reemitted = deferred = 0
        for row in rows:
            if row.log_id in in_file:
                continue
            if row.owner == self.owner and row.created_at >= emit_own_before:
                deferred += 1  # a live worker on this file may still be writing it
            elif self.emit(row):
                reemitted += 1
        if logged:
            await self.store.delete_outbox(logged)
        return OutboxPass(len(rows), len(logged), reemitted, deferred)

    def _info(self, event: str, **fields: Any) -> None:
        if self._ops is not None:
            self._ops.info(event, log=str(self.writer.path), **fields)

    def _warn(self, event: str, **fields: Any) -> None:
        if self._ops is not None:
            self._ops.warning(event, log=str(self.writer.path), **fields)


# -- reading the log's tail ------------------------------------------------------------------------


def logged_ids(path: Path, tail_bytes: int = TAIL_BYTES) -> set[str]:
    """The `log_id`s of the whole, readable lines among the last `tail_bytes` of the log at `path`.

    When the current file is shorter than that (it was just rotated), the rest of the window is
    the end of the newest rotated file (``<stem>-<stamp>.jsonl``, or ``.jsonl.gz`` decompressed
    in a stream, keeping only its end). A line torn by a crash does not parse and does not count.
    Blocking file I/O: run it in a thread.
    """
    found: set[str] = set()
    data, cut = _file_tail(Path(path), tail_bytes)
    _collect(data, cut, found)
    remaining = tail_bytes - len(data)
    rotated = newest_rotated(Path(path)) if remaining > 0 else None
    if rotated is not None:
        data, cut = _gzip_tail(rotated, remaining) if rotated.suffix == ".gz" else _file_tail(rotated, remaining)
        _collect(data, cut, found)
    return found


def newest_rotated(path: Path) -> Path | None:
    """The most recently rotated file of the log at `path` (stamps sort in write order); a plain
    file whose compression a crash interrupted wins over its partial ``.gz``."""
    best: tuple[str, int, Path] | None = None
    for candidate in path.parent.glob(f"{path.stem}-[0-9]*.jsonl*"):  # a stamp, not another worker's file
        name = candidate.name
        if name.endswith(".jsonl"):
            key = (name[: -len(".jsonl")], 1, candidate)
        elif name.endswith(".jsonl.gz"):
            key = (name[: -len(".jsonl.gz")], 0, candidate)
        else:
            continue  # a half-written .gz.tmp
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best is not None else None


def _file_tail(path: Path, size: int) -> tuple[bytes, bool]:
    """The last `size` bytes (plus the byte before them), and whether that is not the whole file."""
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            start = max(0, end - size - 1)
            f.seek(start)
            return f.read(end - start), start > 0
    except FileNotFoundError:
        return b"", False


def _gzip_tail(path: Path, size: int) -> tuple[bytes, bool]:
    buf = bytearray()
    cut = False
    try:
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 20):
                buf += chunk
                if len(buf) > 2 * (size + 1):
                    del buf[: len(buf) - size - 1]
                    cut = True
    except (OSError, EOFError, zlib.error):
        pass  # a damaged file: what was read so far
    if len(buf) > size + 1:
        del buf[: len(buf) - size - 1]
        cut = True
    return bytes(buf), cut


def _collect(data: bytes, cut: bool, found: set[str]) -> None:
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: nothing, or a line still being written
    if cut and lines:
        lines.pop(0)  # the window starts inside this one (or it is the byte before a newline)
    for raw in lines:
        if _LOG_ID_KEY not in raw:
            continue
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # torn by a crash
        if type(doc) is dict and type(log_id := doc.get("log_id")) is str:
            found.add(log_id)
