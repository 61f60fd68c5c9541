"""Append JSON lines to a rotating file without blocking the event loop.

Callers on the event loop only do `queue.Queue.put_nowait` (no syscall, no thread hop per
line). One daemon thread owns the file: it takes everything queued at once and writes the
batch with a single ``write()`` so many transactions share one syscall (and one ``fsync`` when
durability is asked for). The queue is bounded (DESIGN rule 8); when it is full the line is
refused with `LogQueueFull`, and `has_capacity` lets the API refuse the *payment* (503) before
it starts, rather than accept one whose log line could not be written (DESIGN rule 5).

Rotation (by size, optionally by age) happens between lines, so a line is never split across
files. A rotated file is renamed to ``<stem>-<UTC YYYYmmddTHHMMSSffffff>.jsonl`` and gzipped
to ``.jsonl.gz`` by the same thread.

Every accepted line gets a sequence number (`write` returns it: 1, 2, ... per writer, in queue
order). A flush listener (`set_flush_listener`) is told, from the writer thread, "every line up
to sequence N is in the file and fsynced": once per fsync, never per line, and fsyncs are spaced
at least `sync_interval_s` apart under load, so many lines share one. With a listener, lines
also stay durable across rotation (the old file is fsynced before it is renamed and the
compressed copy before the plain one is removed). The transaction log's outbox
(`gateway.txlog.outbox`) uses this to delete the journal's copy of each line once it is on disk.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["JsonLinesWriter", "LogQueueFull", "LogWriterClosed", "LogWriterError"]

# Longest pause between retries of a failing write (disk full, I/O error).
_MAX_RETRY_PAUSE_S = 1.0
# Lines queue up while the writer thread compresses a rotated file: level 1 gzips 100 MiB of
# transaction lines about twice as fast as level 6 (~0.5 s here) for ~10 % more bytes.
_GZIP_LEVEL = 1
_COPY_CHUNK = 1 << 20
# With a flush listener: the longest a written line waits for its fsync (and its report).
DEFAULT_SYNC_INTERVAL_S = 0.05

FlushListener = Callable[[int], None]


class LogWriterError(Exception):
    """Base class: the transaction log did not accept a line."""


class LogQueueFull(LogWriterError):
    """The queue is full: the writer is behind, so shed load instead of losing lines."""


class LogWriterClosed(LogWriterError):
    """The writer was closed; nothing more can be queued."""


class _Barrier:
    """Queue marker: set once every line queued before it is written (and fsynced)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class JsonLinesWriter:
    """Batched, rotating JSON-lines file writer fed through a bounded queue.

    `dropped` counts refused lines and `write_errors` counts failed disk operations (the
    batch is retried, never discarded); both are plain ints for the metrics endpoint.
    """

    def __init__(
        self,
        path: Path,
        *,
        queue_size: int = 10000,
        max_bytes: int = 100 * 2**20,
        rotate_interval_s: float | None = None,
        compress_rotated: bool = True,
        fsync: bool = False,
    ) -> None:
        if queue_size < 1 or max_bytes < 1:
            raise ValueError("queue_size and max_bytes must be positive")
        if rotate_interval_s is not None and rotate_interval_s <= 0:
            raise ValueError("rotate_interval_s must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.rotate_interval_s = rotate_interval_s
        self.compress_rotated = compress_rotated
        self.fsync = fsync
        self.dropped = 0
        self.write_errors = 0
        self.listener_errors = 0
        self.last_error: OSError | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._closed = False
        self._stop_queued = False
        self._stopped = False
        self._barriers: set[_Barrier] = set()
        self._thread: threading.Thread | None = None
        self._seq = 0  # sequence number of the last accepted line (under _lock)
        self._listener: FlushListener | None = None
        self._sync_interval_s = DEFAULT_SYNC_INTERVAL_S
        # Owned by the writer thread once started.
        self._written_seq = 0  # every line up to this one is written to a file
        self._synced_seq = 0  # ... and fsynced
        self._reported_seq = 0  # ... and reported to the listener
        self._synced_at = 0.0
        self._fd = -1
        self._size = 0
        self._opened_at = 0.0
        self._last_stamp: datetime.datetime | None = None

    # -- producer side (any thread, typically the event loop) --------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent). Lines queued before start are kept."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"txlog-writer:{self.path.name}", daemon=True
                )
                self._thread.start()

    def set_flush_listener(self, listener: FlushListener | None, *,
                           sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S) -> None:
        """Call `listener(n)` from the writer thread whenever every line with sequence number up to
        `n` is written and fsynced (None removes it). It must be quick and must not block: hand the
        number to an event loop with `loop.call_soon_threadsafe`. Written lines are fsynced at
        most `sync_interval_s` after they were written, and at every flush barrier."""
        if sync_interval_s < 0:
            raise ValueError("sync_interval_s must not be negative")
        with self._lock:
            self._listener = listener
            self._sync_interval_s = sync_interval_s

    def write(self, line: bytes) -> int:
        """Queue one JSON line; never blocks. A missing trailing newline is added.

        Returns the line's sequence number, which the flush listener reports once the line is on
        disk.
        """
        if not line.endswith(b"\n"):
            line += b"\n"
        with self._lock:
            if self._closed:
                raise LogWriterClosed(str(self.path))
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                self.dropped += 1
                raise LogQueueFull(str(self.path)) from None
            self._seq += 1
            return self._seq

    def has_capacity(self, reserve: int = 0) -> bool:
        """True if more than `reserve` lines can still be queued (and the writer is open)."""
        return not self._closed and self._queue.maxsize - self._queue.qsize() > reserve

    def flush_barrier(self, timeout: float = 10) -> bool:
        """Block until every line queued before this call is written and fsynced.

        Returns False on timeout (for example when the writer was never started).
        """
        deadline = time.monotonic() + timeout
        barrier = _Barrier()
        with self._lock:
            if self._stopped:
                return True
            # Registered so the thread releases it on exit even if it is queued after _STOP.
            self._barriers.add(barrier)
        try:
            self._queue.put(barrier, timeout=timeout)
        except queue.Full:
            pass
        done = barrier.done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._barriers.discard(barrier)
        return done

    async def wait_flushed(self, timeout: float = 10) -> bool:
        """`flush_barrier` for coroutines; the blocking wait runs in a worker thread."""
        return await asyncio.to_thread(self.flush_barrier, timeout)

    def close(self, timeout: float = 10) -> None:
        """Write everything queued, then stop the thread and close the file (idempotent).

        A writer that was never started is started so its queued lines are not lost. Raises
        TimeoutError if the backlog could not be written within `timeout`.
        """
        with self._lock:
            self._closed = True  # from here on write() refuses, so _STOP ends the lines
        self.start()
        assert self._thread is not None
        deadline = time.monotonic() + timeout
        if not self._stop_queued:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                raise TimeoutError(f"transaction log {self.path} did not drain") from None
            self._stop_queued = True
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            raise TimeoutError(f"transaction log {self.path} did not drain")

    async def aclose(self, timeout: float = 10) -> None:
        """`close` for coroutines (the drain and join run in a worker thread)."""
        await asyncio.to_thread(self.close, timeout)

    # -- writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        self._retry(self._open)
        stopping = False
        while not stopping:
            try:
                items = [self._queue.get(timeout=self._idle_timeout())]
            except queue.Empty:
                self._rotate_if_old()
                self._sync_if_due()
                continue
            try:
                while True:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            self._rotate_if_old()
            lines: list[bytes] = []
            for item in items:
                if item is _STOP:
                    stopping = True  # only barriers can follow it; all are released on exit
                elif type(item) is _Barrier:
                    self._write_lines(lines)
                    lines = []
                    self._sync()  # reported before the barrier is released
                    item.done.set()
                else:
                    lines.append(item)  # type: ignore[arg-type]
            self._write_lines(lines)
            self._sync_if_due()
        if self.fsync or self._listener is not None:
            self._sync()
        os.close(self._fd)
        with self._lock:
            # Everything accepted is written: release barriers that raced close().
            self._stopped = True
            for barrier in self._barriers:
                barrier.done.set()

    def _idle_timeout(self) -> float | None:
        timeouts = []
        if self.rotate_interval_s is not None:
            timeouts.append(self._opened_at + self.rotate_interval_s - time.monotonic())
        if self._listener is not None and self._written_seq > self._reported_seq:
            timeouts.append(self._synced_at + self._sync_interval_s - time.monotonic())
        return max(0.0, min(timeouts)) if timeouts else None

    @property
    def _durable(self) -> bool:
        """Whether written lines must survive a machine crash before they are reported."""
        return self.fsync or self._listener is not None

    def _sync(self) -> None:
        """fsync the current file (everything written so far is then on disk) and report it."""
        self._retry(lambda: os.fsync(self._fd))
        self._synced_seq = self._written_seq
        self._synced_at = time.monotonic()
        self._report()

    def _sync_if_due(self) -> None:
        """With a listener: fsync what was written once `sync_interval_s` has passed since the
        last fsync (one fsync for everything written meanwhile), then report."""
        if self._listener is None or self._written_seq <= self._reported_seq:
            return
        if self._written_seq > self._synced_seq:
            if time.monotonic() - self._synced_at < self._sync_interval_s:
                return  # _idle_timeout wakes the loop when it is due
            self._sync()
        else:
            self._report()

    def _report(self) -> None:
        listener = self._listener
        if listener is None or self._synced_seq <= self._reported_seq:
            return
        self._reported_seq = self._synced_seq
        try:
            listener(self._synced_seq)
        except Exception:  # noqa: BLE001 - a listener bug must not stop the log
            self.listener_errors += 1

    def _write_lines(self, lines: list[bytes]) -> None:
        """Write lines in as few syscalls as possible, rotating only between lines."""
        chunk: list[bytes] = []
        chunk_size = 0
        for line in lines:
            if self._size + chunk_size + len(line) > self.max_bytes and self._size + chunk_size:
                self._write_chunk(b"".join(chunk), len(chunk))
                chunk, chunk_size = [], 0
                self._rotate()
            chunk.append(line)
            chunk_size += len(line)
        if chunk:
            self._write_chunk(b"".join(chunk), len(chunk))

    def _write_chunk(self, data: bytes, count: int) -> None:
        """Write `count` whole lines (`data`) to the current file."""
        if not data:
            return
        view = memoryview(data)

        def write_rest() -> None:
            # os.write may write part of the data before failing; resume where it stopped so a
            # retried line is continued, never duplicated or split.
            nonlocal view
            while view:
                view = view[os.write(self._fd, view) :]

        self._retry(write_rest)
        self._size += len(data)
        self._written_seq += count
        if self.fsync:
            self._retry(lambda: os.fsync(self._fd))
            self._synced_seq = self._written_seq

    def _retry(self, operation: Callable[[], object]) -> None:
        """Run `operation` until it succeeds: lines are kept queued, never discarded.

        While the disk fails the queue fills, `has_capacity` turns False and the API sheds
        load, which is the visible signal; the counters tell ops why.
        """
        pause = 0.01
        while True:
            try:
                operation()
                return
            except OSError as exc:
                self.write_errors += 1
                self.last_error = exc
                time.sleep(pause)
                pause = min(pause * 2, _MAX_RETRY_PAUSE_S)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A crash cut the last line short; end it so our first line is not glued to it.
            size += os.write(fd, b"\n")
        self._fd, self._size, self._opened_at = fd, size, time.monotonic()

    def _rotate_if_old(self) -> None:
        if self.rotate_interval_s is None:
            return
        if time.monotonic() - self._opened_at < self.rotate_interval_s:
            return
        if self._size:
            self._rotate()
        else:
            self._opened_at = time.monotonic()  # nothing to rotate; restart the clock

    def _rotate(self) -> None:
        """Close the current file, rename it with a UTC stamp, compress it, open a fresh one."""
        if self._durable:
            self._retry(lambda: os.fsync(self._fd))
            self._synced_seq = self._written_seq
        os.close(self._fd)
        rotated = self.path.with_name(f"{self.path.stem}-{self._stamp()}.jsonl")
        self._retry(lambda: os.replace(self.path, rotated))
        if self.compress_rotated:
            self._compress(rotated)
        self._retry(self._open)

    def _stamp(self) -> str:
        """UTC timestamp for a rotated name, strictly increasing so names sort in write order."""
        now = datetime.datetime.now(datetime.timezone.utc)
        if self._last_stamp is not None and now <= self._last_stamp:
            now = self._last_stamp + datetime.timedelta(microseconds=1)
        self._last_stamp = now
        return now.strftime("%Y%m%dT%H%M%S%f")

    def _compress(self, source: Path) -> None:
        """Gzip `source` next to itself; on failure keep the plain file (nothing is lost)."""
        target = source.with_name(source.name + ".gz")
        partial = target.with_name(target.name + ".tmp")
        try:
            with open(source, "rb") as src, open(partial, "wb") as raw:
                with gzip.GzipFile(
                    filename=source.name, mode="wb", fileobj=raw, compresslevel=_GZIP_LEVEL
                ) as gz:
                    shutil.copyfileobj(src, gz, _COPY_CHUNK)
                if self._durable:
                    raw.flush()
                    os.fsync(raw.fileno())
            os.replace(partial, target)
            source.unlink()
        except OSError as exc:
            self.write_errors += 1
            self.last_error = exc
            partial.unlink(missing_ok=True)
