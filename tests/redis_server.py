"""A redis-server of the test's own, on a free loopback port and without persistence, so a test
can take Redis away (`stop`) and bring it back empty (`start`) without touching the shared one
on 6379 that other tests use."""

from __future__ import annotations

import asyncio
import subprocess
import time

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from gateway.drill.process import free_port

START_TIMEOUT_S = 10.0


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = aioredis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    await client.ping()
                    return
                except (RedisError, OSError):
                    if time.monotonic() > deadline or self._proc.poll() is not None:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.terminate()
        await asyncio.to_thread(proc.wait, START_TIMEOUT_S)
