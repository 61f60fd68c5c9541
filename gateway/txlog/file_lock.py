"""One live process per transaction-log file, held by an advisory lock beside it.

Why: at start-up a process writes again the outbox lines its predecessor committed but did not
get on disk (gateway/txlog/outbox.py). It may do that at once only if no other live process is
writing the same file; without proof it left its own file's young rows to the periodic sweep,
so a replica killed and restarted in place had transaction lines missing from every file for up
to a minute (the fleet drill caught one). The lock is that proof, and two processes configured
onto one file (two replicas sharing a `log.dir` on one host) are refused at start instead of
interleaving their lines.

`flock` is released by the kernel when its holder dies, SIGKILL included, so a crashed
process never leaves its successor locked out. The lock file is hidden (`.transactions.jsonl.lock`):
no log reader's pattern (`transactions*.jsonl*`) matches it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LogFileInUse(Exception):
    """Another live process writes this transaction-log file."""


class LogFileLock:
    def __init__(self, log_path: Path) -> None:
        self.path = log_path.with_name(f".{log_path.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LogFileInUse (blocking file I/O: call it off the event loop)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LogFileInUse(f"{self.path.with_name(self.path.name[1:-5])} is being written by another running "
                               "gateway process (give each replica its own log.dir)") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
