"""The supervisor's breaker hub: what Redis is to a fleet, for the workers of one host.

A Unix stream socket in the supervisor's runtime directory; messages are the breaker sync's own
(`gateway.breaker_sync`: `{kind, provider, state|held, at, replica}`), one JSON object a line.
The hub keeps the newest message of each kind per provider (last writer wins, like the Redis
script), sends all of them to a worker when it connects (a restarted worker holds the host's
trips and holds before it serves), and relays each newer message to every other worker. It is
event-driven (no polling), and a worker that stops reading is dropped once its buffer passes
`MAX_BUFFER_BYTES` (it reconnects and gets the snapshot again), so one stuck worker never makes
the hub, or the others, wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import orjson

from gateway.breaker_sync import KINDS

MAX_LINE_BYTES = 64 * 1024
MAX_BUFFER_BYTES = 1 << 20


class BreakerHub:
    def __init__(self, path: Path, *, log: Any = None) -> None:
        self.path = path
        self._log = log
        self._latest: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._clients: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self.relayed = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            writer.write(b"".join(line for _, line in self._latest.values()))
            while raw := await reader.readline():
                self._take(raw, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the worker died or sent garbage: it reconnects and gets the snapshot
        finally:
            self._clients.discard(writer)
            writer.close()

    def _take(self, raw: bytes, sender: asyncio.StreamWriter) -> None:
        try:
            message = orjson.loads(raw)
            key = (message["kind"], message["provider"])
            at = float(message["at"])
        except (ValueError, KeyError, TypeError):
            self._warn("breaker_hub_bad_message", size=len(raw))
            return
        if key[0] not in KINDS or not isinstance(key[1], str):
            self._warn("breaker_hub_bad_message", size=len(raw))
            return
        current = self._latest.get(key)
        if current is not None and current[0] >= at:
            return  # older than what the host already holds
        line = raw if raw.endswith(b"\n") else raw + b"\n"
        self._latest[key] = (at, line)
        self.relayed += 1
        for client in list(self._clients):
            if client is sender:
                continue
            if client.transport.get_write_buffer_size() > MAX_BUFFER_BYTES:
                self._warn("breaker_hub_dropped_worker", reason="not reading")
                client.close()
                self._clients.discard(client)
                continue
            client.write(line)

    def _warn(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log.warning(event, **fields)
