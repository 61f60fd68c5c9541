"""The parent process of `gateway serve --workers N`: starts the workers, keeps them running,
stops them all.

- The listening socket is bound here, once, and inherited by every worker (see the package
  docstring). The runtime directory (Prometheus value files, the breaker hub's socket, the
  workers' seat sockets) is created here, private to this user, and removed at exit.
- A worker that dies is started again in its seat (same index, same transaction log file) after
  a backoff that doubles per quick death up to `MAX_BACKOFF_S` and resets once a worker has
  served for `STABLE_AFTER_S`; each restart is an ops line `worker_restarted` with the exit code
  or the signal. A worker that fails on its first start (bad configuration, a journal that will
  not open) fails the whole start instead: restarting it would only repeat the error.
- SIGTERM or SIGINT stops every worker with one SIGTERM (workers run in their own process group,
  so a terminal's Ctrl-C reaches only the supervisor and no worker gets a second signal in the
  middle of its drain); each drains its in-flight requests (up to `server.shutdown_grace_s`)
  and closes its stores. A worker still running `STOP_MARGIN_S` after
  that is SIGKILLed (its journal rows and outbox lines are what a crash leaves, recovered at
  the next start). Then the supervisor exits: 0 when every worker stopped cleanly.
- A worker notices its supervisor's death (its end of a pipe closes) and stops itself.

Asyncio, like the rest: child exits are watched through their sentinels, signals through the
loop, so nothing here polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.workers import LISTEN_BACKLOG, WorkerSeat, metrics_dir
from gateway.workers.hub import BreakerHub

FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0
STOP_MARGIN_S = 5.0  # past the drain: closing stores and flushing the log
READY = "ready"

# target(seat, listening socket, pipe to the supervisor): runs one worker until it is stopped.
WorkerTarget = Callable[[WorkerSeat, socket.socket, multiprocessing.connection.Connection], None]


class SupervisorError(Exception):
    """The workers could not be started (one line saying why)."""


@dataclass(slots=True)
class _Slot:
    seat: WorkerSeat
    process: Any = None  # multiprocessing.Process (spawn context)
    pipe: multiprocessing.connection.Connection | None = None
    started_at: float = 0.0
    ever_ready: bool = False  # served once: a later death is restarted, not a failed start
    quick_deaths: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, target: WorkerTarget, workers: int, *, host: str, port: int, grace_s: float,
                 share_breakers: bool, log: Any) -> None:
        self._target = target
        self._workers = workers
        self._host, self._port = host, port
        self._grace_s = grace_s
        self._share_breakers = share_breakers
        self._log = log
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = asyncio.Event()
        self._signal: int | None = None
        self._failure: str | None = None
        self._slots: list[_Slot] = []

    def run(self) -> int:
        """Serve until a signal (or a failed first start); the exit status for the command."""
        sock = _listen(self._host, self._port)
        runtime = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
        try:
            metrics_dir(runtime).mkdir()
            # Read by prometheus-client in each worker before its first metric (spawned children inherit it).
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir(runtime))
            with asyncio.Runner() as runner:
                return runner.run(self._main(sock, runtime))
        finally:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            sock.close()
            shutil.rmtree(runtime, ignore_errors=True)

    async def _main(self, sock: socket.socket, runtime: Path) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        hub = BreakerHub(runtime / "breakers.sock", log=self._log) if self._share_breakers else None
        if hub is not None:
            await hub.start()
        socket_path = hub.path if hub is not None else None
        self._slots = [_Slot(WorkerSeat(i, runtime, socket_path, self._workers)) for i in range(1, self._workers + 1)]
        keepers = [asyncio.create_task(self._keep(slot, sock), name=f"worker-{slot.seat.index}")
                   for slot in self._slots]
        self._log.info("workers_started", workers=self._workers, host=self._host, port=self._port,
                       breaker_hub=hub is not None)
        try:
            await self._stop.wait()
            clean = await self._stop_all()
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            if hub is not None:
                await hub.close()
        if self._failure is not None:
            raise SupervisorError(self._failure)
        self._log.info("workers_stopped", signal=_signal_name(self._signal), clean=clean)
        return 0 if clean else 1

    def _on_signal(self, signum: int) -> None:
        if self._signal is None:
            self._signal = signum
        self._stop.set()

    # -- one seat ------------------------------------------------------------------------------

    async def _keep(self, slot: _Slot, sock: socket.socket) -> None:
        """Start the seat's worker, and again after each death, until the supervisor stops."""
        self._start(slot, sock)
        while True:
            await slot.exited.wait()
            if self._stop.is_set():
                return
            code = slot.process.exitcode
            if not slot.ever_ready:
                self._failure = f"worker {slot.seat.index} exited with {_describe(code)} while starting"
                self._stop.set()
                return
            lived = time.monotonic() - slot.started_at
            slot.quick_deaths = 0 if lived >= STABLE_AFTER_S else slot.quick_deaths + 1
            backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (slot.quick_deaths - 1)) if slot.quick_deaths else 0.0
            how = _exit_fields(code)
            self._log.error("worker_exited", worker=slot.seat.index, pid=slot.process.pid, lived_s=round(lived, 3),
                            restart_in_s=backoff, **how)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            if self._stop.is_set():
                return
            old_pid = slot.process.pid
            self._start(slot, sock)
            self._log.warning("worker_restarted", worker=slot.seat.index, old_pid=old_pid, pid=slot.process.pid,
                              backoff_s=backoff, **how)

    def _start(self, slot: _Slot, sock: socket.socket) -> None:
        """Spawn the seat's worker (synchronous, so no signal's stop can fall in between)."""
        loop = asyncio.get_running_loop()
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=self._target, args=(slot.seat, sock, theirs),
                                    name=f"gateway-worker-{slot.seat.index}")
        process.start()
        theirs.close()
        slot.process, slot.pipe = process, ours
        slot.started_at = time.monotonic()
        slot.exited.clear()
        loop.add_reader(ours.fileno(), self._on_message, slot)
        loop.add_reader(process.sentinel, self._on_exit, slot)

    def _on_message(self, slot: _Slot) -> None:
        assert slot.pipe is not None
        try:
            message = slot.pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(slot.pipe.fileno())
            return
        if message == READY:
            slot.ever_ready = True
            self._log.info("worker_ready", worker=slot.seat.index, pid=slot.process.pid,
                           seconds=round(time.monotonic() - slot.started_at, 3))

    def _on_exit(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(slot.process.sentinel)
        slot.process.join()  # already over: reaps it at once
        if slot.pipe is not None:
            loop.remove_reader(slot.pipe.fileno())
            slot.pipe.close()
            slot.pipe = None
        from prometheus_client import multiprocess

        # Its live gauges (in flight, bulkheads) leave the host's sums; its counters stay in them.
        multiprocess.mark_process_dead(slot.process.pid, os.environ["PROMETHEUS_MULTIPROC_DIR"])
        slot.exited.set()

    # -- stopping ------------------------------------------------------------------------------

    async def _stop_all(self) -> bool:
        """SIGTERM every worker, wait for the drains, SIGKILL what is left; True when all were clean."""
        live = [s for s in self._slots if s.process is not None and not s.exited.is_set()]
        for slot in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)
        killed: list[int] = []
        try:
            await asyncio.wait_for(asyncio.gather(*(s.exited.wait() for s in live)), self._grace_s + STOP_MARGIN_S)
        except TimeoutError:
            for slot in live:
                if not slot.exited.is_set():
                    killed.append(slot.seat.index)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.process.pid, signal.SIGKILL)
            self._log.error("workers_killed", workers=killed, waited_s=self._grace_s + STOP_MARGIN_S,
                            detail="still running after the drain; what they had in flight is reconciled at the "
                                   "next start")
            await asyncio.gather(*(s.exited.wait() for s in live))
        return not killed and all(s.process.exitcode == 0 for s in live)


# -- in the worker ---------------------------------------------------------------------------------


def announce_ready(pipe: multiprocessing.connection.Connection) -> None:
    """Tell the supervisor this worker serves (its first start succeeded)."""
    with contextlib.suppress(OSError):
        pipe.send(READY)


def watch_supervisor(pipe: multiprocessing.connection.Connection) -> None:
    """Leave the terminal's process group (the supervisor alone decides when workers stop), and
    stop this worker (SIGTERM to itself: the ordinary drain) when the supervisor is gone."""
    os.setpgid(0, 0)
    def wait() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                pipe.recv()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="supervisor-watch", daemon=True).start()


# -- helpers ---------------------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """The one listening socket every worker accepts on (what aiohttp would bind, bound once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _exit_fields(code: int | None) -> dict[str, Any]:
    if code is not None and code < 0:
        return {"exit_code": None, "signal": _signal_name(-code)}
    return {"exit_code": code, "signal": None}


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return _signal_name(-code) or f"signal {-code}"
    return f"status {code}"


def _signal_name(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
