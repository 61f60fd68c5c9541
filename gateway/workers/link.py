"""A worker's end of the supervisor's breaker hub (`gateway.workers.hub`): the breaker sync of
`gateway.breaker_sync` over a Unix socket instead of Redis.

On (re)connecting the worker sends the newest change it knows of each kind per provider, and
the hub sends the host's; a change made while the hub was unreachable (the supervisor is the
hub, so only while it restarts the socket, in practice never) is shared once it is back. The
socket is local and the hub never blocks on a worker, so a send is a buffered write; a hub that
is gone leaves this worker's breakers working alone, `/readyz` saying `breaker_sync` degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.breaker_sync import MAX_BACKOFF_S, BreakerSync
from gateway.workers.hub import MAX_LINE_BYTES

CONNECT_TIMEOUT_S = 2.0


class HostBreakerSync(BreakerSync):
    def __init__(self, path: Path, *, replica_id: str | None = None, log: Any = None, queue_size: int = 1000,
                 on_error: Callable[[str], None] | None = None) -> None:
        super().__init__(replica_id=replica_id, log=log, queue_size=queue_size, on_error=on_error)
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._unreachable_since: float | None = None
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"HostBreakerSync(replica_id={self.replica_id!r}, path={str(self.path)!r})"

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def health(self) -> dict[str, Any]:
        if self.connected:
            return {"status": "ok"}
        return {"status": "degraded", "since": self._unreachable_since,
                "reason": f"the supervisor's breaker hub is unreachable ({self._last_error}): this worker's "
                          "breakers and holds are its own until it reconnects"}

    async def _open(self) -> None:
        try:
            await self._connect()
        except (OSError, TimeoutError) as exc:
            self._lost(exc)
            self._log.warning("breaker_sync_unavailable", error=type(exc).__name__, socket=str(self.path),
                              detail="starting with this worker's own breaker state; retrying in the background")

    async def _connect(self) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE_BYTES)
        self._reader, self._writer = reader, writer
        self._unreachable_since = self._last_error = None
        await self._republish()

    async def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None:
            raise ConnectionError("not connected to the breaker hub")
        self._writer.write(orjson.dumps(message) + b"\n")
        await self._writer.drain()

    async def _receive_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                if self._reader is None:
                    await self._connect()
                    self._log.info("breaker_sync_resubscribed", socket=str(self.path))
                assert self._reader is not None
                raw = await self._reader.readline()
                if not raw:
                    raise ConnectionError("the breaker hub closed the connection")
                backoff = 0.1
                self._apply_raw(raw)
            except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a line over the limit
                if self._writer is not None:
                    self._log.warning("breaker_sync_disconnected", error=type(exc).__name__, retry_in_s=backoff)
                self._lost(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _lost(self, exc: BaseException) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        if self._unreachable_since is None:
            self._unreachable_since = time.time()
        self._last_error = type(exc).__name__
        self._count("connection")

    async def _close_transport(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
