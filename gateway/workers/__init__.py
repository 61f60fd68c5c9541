"""`gateway serve --workers N`: N worker processes on one host that behave as a fleet of one.

The supervisor (`gateway.workers.supervisor`) binds the listening socket once and hands it to
every worker (one accept queue: a dying worker loses no queued connection, and a port that is
taken fails the start once, clearly). Each worker runs the ordinary `build_app` with a
`WorkerSeat`, which is all that differs from a single process:

- its own transaction log file, ``<stem>-w<index><suffix>`` in `log.dir`, rotated by its own
  writer: one writer per file, so rotation never races another process's appends, and the
  outbox rows it leaves at a crash are its own (their `owner` names the file) and written by the
  worker restarted in its seat;
- Prometheus multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` in the supervisor's runtime
  directory), so `/metrics` on any worker shows the host's totals;
- when `breaker_sync.backend` is `none`, breaker trips and operator holds shared through the
  supervisor's hub on a Unix socket (`gateway.workers.hub`, `gateway.workers.link`); with
  `redis`, each worker is a replica of the fleet's Redis sync like any other process;
- a seat socket (`gateway.workers.peers`) on which the worker tells the others, when asked, what
  only it knows (the console's traffic window), so the console on any worker shows the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["LISTEN_BACKLOG", "WorkerSeat", "worker_log_file"]


def worker_log_file(name: str, index: int) -> str:
    """`transactions.jsonl` -> `transactions-w2.jsonl`: still matched by `gateway logs analyze`'s
    ``transactions*.jsonl*``, and never mistaken for a rotated file (their stamps start with a digit)."""
    path = Path(name)
    return f"{path.stem}-w{index}{path.suffix}"


# The listening socket's accept queue, one process or a supervisor's workers alike. aiohttp's
# default of 128 overflows when a peak opens hundreds of connections at once (a cold checkout
# fleet, or a load balancer reconnecting): the kernel drops the SYNs past it and the clients
# retry after their 1 s initial retransmit, a second added to those payments. Capped by the
# kernel's net.core.somaxconn.
LISTEN_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class WorkerSeat:
    """Worker `index` (1..N, kept across restarts) of the supervisor whose runtime directory is
    `runtime_dir`, one of `workers`. `breaker_socket` is the hub's socket, None when breakers
    are shared otherwise (Redis) or not at all."""

    index: int
    runtime_dir: Path
    breaker_socket: Path | None = None
    workers: int = 1  # seats on this host

    def seat_socket(self, index: int | None = None) -> Path:
        """Where seat `index` (this one by default) answers the others (`gateway.workers.peers`)."""
        return self.runtime_dir / f"seat-{self.index if index is None else index}.sock"

    @property
    def metrics_dir(self) -> Path:
        return metrics_dir(self.runtime_dir)

    def log_file(self, name: str) -> str:
        return worker_log_file(name, self.index)


def metrics_dir(runtime_dir: Path) -> Path:
    """Where the workers' prometheus-client value files live (PROMETHEUS_MULTIPROC_DIR)."""
    return runtime_dir / "metrics"
