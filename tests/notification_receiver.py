"""The checkout's side of merchant notifications, for the tests (tests/test_notifications_*.py).

`Receiver`: a real aiohttp server on loopback that records every delivery and answers from a
script (statuses in turn, then 200), or holds every request until released (a hanging
receiver); in-process, or while the gateway runs as other processes. `settle_later`: a pending
payment settled through the API every background settler uses."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from domain.outcome import PaymentStatus
from gateway.app_keys import SERVICE, STORE
from gateway.notifications.events import Settling
from tests.conftest import payment

SECRET_ENV = "GATEWAY_NOTIFY_SECRET"
SECRET = "whsec_test_0123456789abcdefghijklmnop"
OLD_SECRET_ENV = "GATEWAY_NOTIFY_SECRET_OLD"
OLD_SECRET = "whsec_old_9876543210zyxwvutsrqponmlk"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    statuses: list[int] = field(default_factory=list)  # answered in turn; 200 once they run out
    hang: bool = False  # hold every request until `release`
    deliveries: list[Delivery] = field(default_factory=list)
    url: str = ""
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        self.hang = False
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        delivery = Delivery(dict(request.headers), await request.read())
        async with self._arrived:
            self.deliveries.append(delivery)
            status = self.statuses.pop(0) if self.statuses else 200
            self._arrived.notify_all()
        if self.hang:
            await self._released.wait()
        return web.Response(status=status, text="ok")

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        """Until at least `count` deliveries arrived (bounded)."""
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.deliveries) >= count)
        return self.deliveries

    def event_ids(self) -> list[str]:
        return [d.event["id"] for d in self.deliveries]


def notifications_config(url: str, secret_envs: Sequence[str] = (SECRET_ENV,), **changes: object) -> dict:
    """The `notifications` section for a test: fast retries, quick polls."""
    return {"url": url, "secret_env": list(secret_envs), "retry_base_s": 0.05, "retry_max_s": 0.2,
            "poll_interval_s": 0.05, "timeout_s": 2, **changes}


def signature_ok(delivery: Delivery, secret: str) -> bool:
    parts = [p.split("=", 1) for p in delivery.headers["Gateway-Signature"].split(",")]
    t = next(v for k, v in parts if k == "t")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + delivery.body, hashlib.sha256).hexdigest()
    return any(k == "v1" and hmac.compare_digest(v, expected) for k, v in parts)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Until `check()` holds: for store state no event announces (a delivery's recorded result)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def settle_later(client: TestClient, status: PaymentStatus = PaymentStatus.APPROVED) -> str:
    """A pending payment in the journal, settled by a background settler through the API other
    settlers use: `PaymentService.commit(record, kind, settled_from=Settling.of(before))`."""
    record = payment(status=PaymentStatus.PENDING)
    await client.app[STORE].save_payment(record)
    before = Settling.of(record)
    record.status, record.updated_at = status, time.time()
    await client.app[SERVICE].commit(record, "reconciliation", settled_from=before)
    return record.id
