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

A log that cannot be written must be noticed, not absorbed (an outbox that only grows while
payments are charged). So:

* `open` opens the file in the caller's thread: start-up fails with `LogFileUnavailable`, naming
  the file and the problem, instead of a thread retrying quietly for ever;
* a failing disk operation (disk full, I/O error, the directory gone) is retried with backoff,
  never dropped, and while it fails `healthy` is False and `problem` says why (for `/readyz`);
  barriers waiting for a flush are released at once with "not flushed";
* "on disk" means in the file that `path` names: the identity of the open file is checked at
  every fsync and once a second when idle. When the file was removed, renamed or replaced (an
  operator, logrotate), the file at `path` is opened (created) and the lines not yet reported
  durable are written there again first, so no reported line sits only in a deleted inode;
* `close` is bounded: when the disk has been failing for `STALL_GRACE_S` (or `timeout` passes)
  it abandons the lines not written and raises `LogWriterStalled` saying how many and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import gzip
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.file_errors import describe_os_error

__all__ = ["JsonLinesWriter", "LogFileUnavailable", "LogQueueFull", "LogWriterClosed", "LogWriterError",
           "LogWriterStalled"]

# Longest pause between retries of a failing write (disk full, I/O error).
_MAX_RETRY_PAUSE_S = 1.0
# Lines queue up while the writer thread compresses a rotated file: level 1 gzips 100 MiB of
# transaction lines about twice as fast as level 6 (~0.5 s here) for ~10 % more bytes.
_GZIP_LEVEL = 1
_COPY_CHUNK = 1 << 20
# With a flush listener: the longest a written line waits for its fsync (and its report).
DEFAULT_SYNC_INTERVAL_S = 0.05
# After writing a batch, the writer lets lines gather this long before it takes the next one.
# Waking on every line cost each payment a futex wake, a thread switch, a GIL hand-over with
# the event loop and a write() (txlog-writer thread 58 µs per payment at c=16 in
# bench/bench_stages.py); lines queued while it sleeps cost the loop only the put, and are
# written with one syscall. Durability does not wait on it: a line is in the journal's outbox
# from its commit, and reaches the file's fsync within DEFAULT_SYNC_INTERVAL_S as before.
GATHER_S = 0.005
# How often an idle writer checks that `path` still names its file (one stat).
_CHECK_INTERVAL_S = 1.0
# At close, how long a disk that keeps failing gets to come back before the rest is abandoned.
STALL_GRACE_S = 2.0

FlushListener = Callable[[int], None]


class LogWriterError(Exception):
    """Base class: the transaction log did not accept a line."""


class LogQueueFull(LogWriterError):
    """The queue is full: the writer is behind, so shed load instead of losing lines."""


class LogWriterClosed(LogWriterError):
    """The writer was closed; nothing more can be queued."""


class LogFileUnavailable(LogWriterError):
    """`open` could not create or open the file: ``problem`` says why, naming the component at
    fault when it is not the file (``/srv/gw is not a directory``)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class LogWriterStalled(LogWriterError):
    """`close` gave up on lines it could not write in time (the disk kept failing)."""

    def __init__(self, path: Path, unwritten: int, problem: str) -> None:
        super().__init__(f"{path}: {unwritten} line(s) not written: {problem}")
        self.path = path
        self.unwritten = unwritten
        self.problem = problem


class _Abandoned(Exception):
    """Raised in the writer thread when `close` stops waiting for a failing disk."""


class _Barrier:
    """Queue marker: set once every line queued before it is written (and fsynced), or, with
    `failed`, once it is known that they cannot be for now."""

    __slots__ = ("done", "failed")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.failed = False


_STOP = object()


class JsonLinesWriter:
    """Batched, rotating JSON-lines file writer fed through a bounded queue.

    `dropped` counts refused lines and `write_errors` counts failed disk operations (the
    batch is retried, never discarded); both are plain ints for the metrics endpoint.
    `healthy` and `problem` say whether the disk is failing now.
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
        self._failing_since: float | None = None  # monotonic time of the first failure in a row
        self._abandon = threading.Event()
        self._abandoned = False
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
        self._identity = (0, 0)  # (st_dev, st_ino) of the open file
        self._size = 0
        self._opened_at = 0.0
        self._checked_at = 0.0  # last check that `path` still names the open file
        self._unsynced: list[bytes] = []  # chunks written since the last verified fsync
        self._verified_seq = 0  # every line up to this one is in the file `path` names
        self._last_stamp: datetime.datetime | None = None

    # -- producer side (any thread, typically the event loop) --------------------------------

    def open(self) -> None:
        """Create or open the file now, in the caller's thread (a blocking call: at start-up, or
        in a worker thread). Raises `LogFileUnavailable` naming the file and the problem; `start`
        without it opens the file in the writer thread, retrying until it can."""
        if self._fd >= 0:
            return
        try:
            fd, size, identity = self._open_file()
        except OSError as exc:
            raise LogFileUnavailable(self.path, describe_os_error(exc, self.path)) from None
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            os.close(fd)
            raise LogFileUnavailable(self.path, f"its directory {self.path.parent} is not writable "
                                                "(rotation creates files there)")
        self._fd, self._size, self._identity = fd, size, identity
        self._opened_at = self._checked_at = time.monotonic()

    @property
    def healthy(self) -> bool:
        """False while a disk operation keeps failing (and after lines were abandoned)."""
        return self._failing_since is None and not self._abandoned

    @property
    def problem(self) -> str | None:
        """Why the writer is not healthy, naming the file; None when it is."""
        return None if self.healthy else f"cannot write {self.path}: {self._reason()}"

    def _reason(self) -> str:
        error = self.last_error
        return describe_os_error(error, self.path) if error is not None else "stopped"

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
                return not self._abandoned
            if self._failing_since is not None:
                return False  # the lines cannot be flushed now: do not wait for the disk
            # Registered so the thread releases it on exit even if it is queued after _STOP,
            # and at once if the disk fails meanwhile.
            self._barriers.add(barrier)
        while not barrier.done.is_set():  # a full queue: wait for room, or for a failure
            try:
                self._queue.put(barrier, timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        done = barrier.done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._barriers.discard(barrier)
        return done and not barrier.failed

    async def wait_flushed(self, timeout: float = 10) -> bool:
        """`flush_barrier` for coroutines; the blocking wait runs in a worker thread."""
        return await asyncio.to_thread(self.flush_barrier, timeout)

    def close(self, timeout: float = 10) -> None:
        """Write everything queued, then stop the thread and close the file (idempotent).

        A writer that was never started is started so its queued lines are not lost. Bounded:
        once the disk has failed for `STALL_GRACE_S` in a row, or after `timeout`, the thread is
        stopped and, if lines were left unwritten, `LogWriterStalled` says how many and why.
        """
        with self._lock:
            self._closed = True  # from here on write() refuses, so _STOP ends the lines
        self.start()
        assert self._thread is not None
        if not self._stop_queued:
            try:
                self._queue.put_nowait(_STOP)
                self._stop_queued = True
            except queue.Full:
                pass  # the thread is busy with a full queue; it stops once that is empty
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            failing_since = self._failing_since
            if failing_since is not None and time.monotonic() - failing_since >= STALL_GRACE_S:
                break
            self._thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
        if not self._thread.is_alive():
            return
        self._abandon.set()
        self._thread.join(_MAX_RETRY_PAUSE_S)
        with self._lock:  # accepted lines not (durably, when that was asked) in the file
            unwritten = self._seq - self._verified_seq
        if unwritten:
            failing = self._failing_since is not None
            raise LogWriterStalled(self.path, unwritten,
                                   self._reason() if failing else f"the backlog did not drain within {timeout:g}s")

    async def aclose(self, timeout: float = 10) -> None:
        """`close` for coroutines (the drain and join run in a worker thread)."""
        await asyncio.to_thread(self.close, timeout)

    # -- writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._write_until_stopped()
        except _Abandoned:
            self._abandoned = True
        finally:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
            with self._lock:
                # Release barriers that raced close(): flushed, unless lines were abandoned.
                self._stopped = True
                for barrier in self._barriers:
                    barrier.failed = self._abandoned
                    barrier.done.set()

    def _write_until_stopped(self) -> None:
        if self._fd < 0:
            self._retry(self._open)
        stopping = False
        while not stopping:
            try:
                items = [self._queue.get(timeout=self._idle_timeout())]
            except queue.Empty:
                self._rotate_if_old()
                self._sync_if_due()
                self._check_if_due()
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
            self._check_if_due()
            # close() could not queue _STOP into a full queue: stop once it is drained.
            stopping = stopping or (self._closed and self._queue.empty())
            if not stopping and lines:
                time.sleep(GATHER_S)
        if self.fsync or self._listener is not None:
            self._sync()

    def _idle_timeout(self) -> float:
        now = time.monotonic()
        timeouts = [self._checked_at + _CHECK_INTERVAL_S - now]
        if self.rotate_interval_s is not None:
            timeouts.append(self._opened_at + self.rotate_interval_s - now)
        if self._listener is not None and self._written_seq > self._reported_seq:
            timeouts.append(self._synced_at + self._sync_interval_s - now)
        return max(0.0, min(timeouts))

    @property
    def _durable(self) -> bool:
        """Whether written lines must survive a machine crash before they are reported."""
        return self.fsync or self._listener is not None

    def _sync(self) -> None:
        """fsync the current file (everything written so far is then on disk) and report it."""
        self._retry(self._fsync_verified)
        self._synced_seq = self._written_seq
        self._synced_at = time.monotonic()
        self._verified()
        self._report()

    def _verified(self) -> None:
        """Everything written is in the file `path` names (fsynced, when durability is asked)."""
        self._unsynced.clear()
        self._verified_seq = self._written_seq

    def _fsync_verified(self) -> None:
        """fsync, then make sure `path` still names the file: if not, `_follow_path` has written
        the unsynced lines into the file that it names now, which is then fsynced."""
        os.fsync(self._fd)
        if self._follow_path():
            os.fsync(self._fd)

    def _check_if_due(self) -> None:
        if time.monotonic() - self._checked_at >= _CHECK_INTERVAL_S:
            self._retry(self._follow_path)

    def _follow_path(self) -> bool:
        """If `path` no longer names the open file (removed, renamed, replaced), open the file at
        `path` (creating it) with the lines written since the last verified fsync copied into it
        first, and switch to it. True if it switched. Raises OSError when that fails (a
        directory that is gone or a file now), leaving the old file in use and nothing half-done:
        the new file is cut back to its former size."""
        self._checked_at = time.monotonic()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                return False
        except FileNotFoundError:
            pass
        fd, size, identity = self._open_file()
        try:
            for chunk in self._unsynced:
                _write_all(fd, chunk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._identity, self._opened_at = fd, identity, time.monotonic()
        self._size = size + sum(len(chunk) for chunk in self._unsynced)
        return True

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
        self._unsynced.append(data)
        retried = False

        def write_rest() -> None:
            # os.write may write part of the data before failing; resume where it stopped so a
            # retried line is continued, never duplicated or split. After a failure, first make
            # sure the file is still the one at `path`; a new one already got all of `data`.
            nonlocal view, retried
            if retried and self._follow_path():
                view = view[len(view) :]
                return
            retried = True
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._size += written

        self._retry(write_rest)
        self._written_seq += count
        if self.fsync:
            self._sync()
        elif not self._durable:
            self._verified()  # nothing waits for a report: nothing to copy on a switch

    def _retry(self, operation: Callable[[], object]) -> None:
        """Run `operation` until it succeeds: lines are kept queued, never discarded.

        While the disk fails, `healthy` is False (so `/readyz` is not ready and the API sheds
        new payments once the backlog passes its bound), flush barriers are released as not
        flushed, and the counters tell ops why. `close` ends the wait (`_Abandoned`).
        """
        pause = 0.01
        while True:
            try:
                operation()
            except OSError as exc:
                self.write_errors += 1
                self.last_error = exc
                if self._failing_since is None:
                    self._failing()
                if self._abandon.wait(pause):
                    raise _Abandoned from exc
                pause = min(pause * 2, _MAX_RETRY_PAUSE_S)
                continue
            self._failing_since = None
            return

    def _failing(self) -> None:
        with self._lock:
            self._failing_since = time.monotonic()
            for barrier in self._barriers:
                barrier.failed = True
                barrier.done.set()

    def _open(self) -> None:
        self._fd, self._size, self._identity = self._open_file()
        self._opened_at = self._checked_at = time.monotonic()

    def _open_file(self) -> tuple[int, int, tuple[int, int]]:
        """Open (create) the file at `path`: its descriptor, size and identity."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # /dev/full, a FIFO: not a log file
                raise OSError(errno.EINVAL, "not a regular file", str(self.path))
            size = st.st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A crash cut the last line short; end it so our first line is not glued to it.
                size += os.write(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
        return fd, size, (st.st_dev, st.st_ino)

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
            self._retry(self._fsync_verified)
            self._synced_seq = self._written_seq
            self._verified()
        rotated = self.path.with_name(f"{self.path.stem}-{self._stamp()}.jsonl")
        self._retry(lambda: os.replace(self.path, rotated))
        os.close(self._fd)
        self._fd = -1
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
