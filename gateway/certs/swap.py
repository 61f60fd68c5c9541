"""Swap a certificate/key pair on disk so that a crash at any instant is completed on the next run.

Two files cannot be replaced in one atomic step: a process killed between the key's rename and
the certificate's leaves a key that does not match its certificate, and a rotation that then
kept that live pair as ``.prev`` destroyed the only good copy. So every swap is written down
before it starts:

1. the intent, ``<cert>.swap`` (mode 0600: it holds private keys), written atomically and
   fsynced, with the bytes of every file the swap installs: the new live pair and, when the pair
   it replaces is a matching one, that pair as the new ``.prev``. Its rename is the commit
   point: before it nothing has changed; after it the swap happens, now or on the next run;
2. each file replaced atomically (temp file, fsync, rename, directory fsync): the ``.prev`` key
   and certificate, then the live key, then the live certificate;
3. the intent removed.

Every step makes one file hold given bytes, so applying an intent again from the start after a
crash anywhere in 2 or 3 gives the same result. That is `recover`, which `gateway certs rotate`,
`rollback` and the certificate watcher run first, one at a time across processes (`locked`).
Between the live key and certificate the pair on disk does not match for an instant; the
watcher refuses a pair whose key does not match and keeps the one loaded, and the next
`recover` completes the swap. A pair that does not match is never kept as ``.prev`` (callers
pass ``prev=None`` for it), so the good previous pair survives for `rollback`.

`GATEWAY_ROTATE_CRASH_AT=<step>` (a test hook, one of `STEPS`) makes the process exit with
status 137 right after that step, as ``kill -9`` would: no cleanup, no flush, no finally.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.certs.devca import CERT_MODE, KEY_MODE, atomic_write, fsync_directory
from gateway.certs.inspect import key_matches_cert

PREV_SUFFIX = ".prev"
INTENT_SUFFIX = ".swap"
CRASH_AT_ENV = "GATEWAY_ROTATE_CRASH_AT"
STEPS = ("begin", "intent", "prev_key", "prev_cert", "key", "cert")  # "begin": before the intent
_INTENT_VERSION = 1


class SwapError(Exception):
    """An intent file that cannot be read back (edited by hand?): names it; nothing was applied."""


@dataclass(frozen=True)
class Pair:
    cert_pem: bytes
    key_pem: bytes

    @property
    def matches(self) -> bool:
        """The key belongs to the certificate (both parse): a pair worth keeping for rollback."""
        return key_matches_cert(self.cert_pem, self.key_pem)


@dataclass(frozen=True)
class PairLocation:
    """Where one live pair, its ``.prev`` pair and its intent live."""

    cert: Path
    key: Path

    @property
    def prev_cert(self) -> Path:
        return self.cert.with_name(self.cert.name + PREV_SUFFIX)

    @property
    def prev_key(self) -> Path:
        return self.key.with_name(self.key.name + PREV_SUFFIX)

    @property
    def intent(self) -> Path:
        return self.cert.with_name(self.cert.name + INTENT_SUFFIX)

    def live(self) -> Pair | None:
        return _read_pair(self.cert, self.key)

    def previous(self) -> Pair | None:
        return _read_pair(self.prev_cert, self.prev_key)


@contextlib.contextmanager
def locked(location: PairLocation, *, wait: bool = True) -> Iterator[bool]:
    """Hold the pair's lock (``flock`` on its certificate's directory, released by the kernel
    when the process dies) for one swap or recovery at a time. With ``wait=False``, yields
    False at once when another process holds it."""
    location.cert.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(location.cert.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def swap(location: PairLocation, live: Pair, prev: Pair | None, *, operation: str) -> None:
    """Install ``live``, and ``prev`` as the ``.prev`` pair (None: leave ``.prev`` as it is).
    Hold `locked` and run `recover` first."""
    _crash_point("begin")
    intent = {"version": _INTENT_VERSION, "operation": operation, "live": _encode(live),
              "prev": _encode(prev) if prev is not None else None}
    atomic_write(location.intent, json.dumps(intent).encode(), KEY_MODE)
    _crash_point("intent")
    _apply(location, live, prev)


def recover(location: PairLocation) -> str | None:
    """Complete the swap a crash interrupted, if any: the operation completed, else None."""
    try:
        raw = location.intent.read_bytes()
    except FileNotFoundError:
        return None
    try:
        intent = json.loads(raw)
        if intent["version"] != _INTENT_VERSION:
            raise ValueError(f"version {intent['version']}")
        live, prev = _decode(intent["live"]), _decode(intent["prev"]) if intent["prev"] else None
        operation = str(intent["operation"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SwapError(f"{location.intent}: not a readable certificate swap ({exc}); remove it once the "
                        f"pair at {location.cert} is right") from None
    _apply(location, live, prev)
    return operation


def recover_unless_busy(location: PairLocation) -> str | None:
    """`recover` without waiting for a swap in progress elsewhere (None then, as when there is
    nothing to finish): for the certificate watcher, which must not stall behind an operator."""
    if not location.intent.exists():  # the common case: nothing to finish, no lock to take
        return None
    with locked(location, wait=False) as ours:
        return recover(location) if ours else None


def _apply(location: PairLocation, live: Pair, prev: Pair | None) -> None:
    if prev is not None:
        atomic_write(location.prev_key, prev.key_pem, KEY_MODE)
        _crash_point("prev_key")
        atomic_write(location.prev_cert, prev.cert_pem, CERT_MODE)
        _crash_point("prev_cert")
    atomic_write(location.key, live.key_pem, KEY_MODE)
    _crash_point("key")
    atomic_write(location.cert, live.cert_pem, CERT_MODE)
    _crash_point("cert")
    location.intent.unlink()
    fsync_directory(location.intent.parent)


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == step:
        os._exit(137)


def _encode(pair: Pair) -> dict[str, str]:
    return {"cert": base64.b64encode(pair.cert_pem).decode(), "key": base64.b64encode(pair.key_pem).decode()}


def _decode(doc: dict[str, str]) -> Pair:
    return Pair(base64.b64decode(doc["cert"], validate=True), base64.b64decode(doc["key"], validate=True))


def _read_pair(cert: Path, key: Path) -> Pair | None:
    try:
        return Pair(cert.read_bytes(), key.read_bytes())
    except FileNotFoundError:
        return None
