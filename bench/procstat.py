"""What a process tree costs, from /proc: CPU seconds (user + system, every thread) and RSS.

A proxy's cost is its whole tree (nginx's master and worker, a gateway's workers), read before
and after a load run; the difference over the requests answered is its CPU per request.
Linux only, like the machines the bench runs on.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses


def tree(root: int) -> list[int]:
    """`root` and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(roots: list[int]) -> float:
    total = 0
    for root in roots:
        for pid in tree(root):
            fields = _stat_fields(pid)
            if fields is not None:
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def rss_bytes(roots: list[int]) -> int:
    total = 0
    for root in roots:
        for pid in tree(root):
            try:
                resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            total += resident * _PAGE
    return total


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid` now, by thread id (py-spy's thread ids are these)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = Path(task, "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out
