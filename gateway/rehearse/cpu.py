"""How busy the gateway's processes are: CPU seconds from /proc (Linux), sampled by the runner.

The gateway runs as its own process (`gateway serve`, the supervisor and its workers with
`--workers N`), so its CPU is not the load generator's or the emulators'. A verdict of "limited
by gateway CPU" needs that separation: one shared event loop would blame the wrong party.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            out.extend(int(c) for c in text.split())
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant (the workers of `serve --workers N`)."""
    seen, todo = [], [pid]
    while todo and len(seen) < 256:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` so far (a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / _TICKS


@dataclass(frozen=True, slots=True)
class CpuSample:
    t_s: float  # seconds into the run
    cores: float  # CPU seconds per second since the previous sample


class CpuMeter:
    """`tree`: the process and its descendants (the gateway's supervisor and workers); without,
    the process alone (the rehearsal's own: load generator and emulators)."""

    def __init__(self, pid: int, *, tree: bool = True) -> None:
        self._pid = pid
        self._tree = tree
        self._last: tuple[float, float] | None = None
        self.samples: list[CpuSample] = []

    def sample(self, t_s: float) -> None:
        used = cpu_seconds(process_tree(self._pid) if self._tree else [self._pid])
        if self._last is not None and t_s > self._last[0]:
            self.samples.append(CpuSample(t_s, (used - self._last[1]) / (t_s - self._last[0])))
        self._last = (t_s, used)

    @property
    def latest(self) -> float:
        return self.samples[-1].cores if self.samples else 0.0
