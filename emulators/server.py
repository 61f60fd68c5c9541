"""The emulator base: a real aiohttp server per provider, with faults, idempotency and a ledger.

A provider's emulator subclasses `ProviderEmulator` and declares its routes, auth and error
shapes, and its webhook signature scheme and retry schedule. `EmulatorServer` runs it on
loopback: the API site (HTTP, TLS or mTLS) and a separate plain-HTTP admin site, so the admin
endpoints stay reachable during an injected outage; stopping it stops the webhook feed too.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import socket
import ssl
import struct
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
from aiohttp import web
from pydantic import ValidationError

from emulators.faults import FaultDecision, FaultInjector, FaultPlan, FaultRule
from emulators.idempotency import Claim, ProviderIdempotency, StoredAnswer, StorePolicy
from emulators.ledger import Ledger
from emulators.quota import Quota, QuotaPlan
from emulators.threeds import Challenge, ChallengeDesk
from emulators.webhooks import RetrySchedule, SignedRequest, WebhookEvent, WebhookSender, WebhookTarget

RECEIVED_KEPT = 1000


@dataclass(slots=True)
class EmulatorRequest:
    """What a provider handler gets: the parsed request plus the faults decided for it."""

    request: web.Request
    body: bytes
    operation: str
    idempotency_key: str | None
    decision: FaultDecision = field(default_factory=FaultDecision)

    @property
    def forced_decline(self) -> str | None:
        return self.decision.decline_code

    @property
    def modification_failure(self) -> FaultRule | None:
        """A `fail_by_notification` fault: accept the modification, report its failure."""
        return self.decision.fail_modification

    async def simulate_processing(self) -> None:
        """Handlers call this once the payment object exists, so a status query made while
        the provider is still "processing" finds it rather than reporting no charge."""
        if self.decision.delay_s > 0:
            await asyncio.sleep(self.decision.delay_s)


Handler = Callable[[EmulatorRequest], Awaitable[web.Response]]


@dataclass(frozen=True, slots=True)
class ApiRoute:
    method: str
    path: str
    handler: Handler
    operation: str
    idempotent: bool = True  # whether the idempotency header applies


def json_response(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers)


def _reset_connection(request: web.Request) -> None:
    """Send a TCP RST (SO_LINGER 0) instead of an answer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class ProviderEmulator(ABC):
    """One provider's behaviour. Subclasses fill in the provider-specific shapes."""

    name: ClassVar[str]
    idempotency_header: ClassVar[str]
    store_policy: ClassVar[StorePolicy]
    ledger_prefix: ClassVar[str]
    webhook_retries: ClassVar[RetrySchedule]

    def __init__(self) -> None:
        self.ledger = Ledger(self.ledger_prefix)
        self.faults = FaultInjector()
        self.quota = Quota()  # the account's rate limit: see emulators/quota.py
        self.idempotency = ProviderIdempotency(self.store_policy)
        self.webhooks = WebhookSender(self, self.webhook_retries, self.faults)
        # API requests by operation, so a drill can prove what settled without a status query.
        self.requests: Counter[str] = Counter()
        # 3-D Secure challenges waiting for (or decided by) the shopper: see emulators/threeds.py.
        self.challenges = ChallengeDesk(self, self.ledger)
        self.closing = asyncio.Event()
        # The headers of the last requests that reached a handler (what a test may check the
        # gateway sent: never the checkout's trace context, say). Bounded.
        self.received_headers: deque[dict[str, str]] = deque(maxlen=RECEIVED_KEPT)

    @abstractmethod
    def routes(self) -> list[ApiRoute]: ...

    @abstractmethod
    def authenticate(self, request: web.Request) -> web.Response | None:
        """None when the credentials are acceptable, else the provider's 401 answer."""

    @abstractmethod
    def error_response(self, fault: FaultRule) -> web.Response:
        """The provider's answer for an injected error: `fault.status`, before or after the
        request was processed (`fault.after_processing`), with its not-processed signal where
        the provider has one and `fault.transient` asks for it."""

    @abstractmethod
    def rate_limited_response(self, retry_after_s: float) -> web.Response: ...

    def quota_exceeded_response(self, retry_after_s: float) -> web.Response:
        """The provider's answer to a request past the account's quota (emulators/quota.py);
        a provider whose real answer differs from its injected `rate_limit` fault overrides it.
        `Retry-After` is whole seconds (RFC 9110), so the hint rounds up."""
        return self.rate_limited_response(float(max(1, math.ceil(retry_after_s))))

    @abstractmethod
    def idempotency_conflict(self, claim: Claim) -> web.Response:
        """The provider's answer to a key reused with another body, or still in flight."""

    def replay_headers(self, stored: StoredAnswer) -> dict[str, str]:
        """Headers the provider adds when it replays the answer stored for a key."""
        return {}

    @abstractmethod
    def sign_webhook(self, doc: dict[str, Any], secret: str, now: float) -> SignedRequest:
        """The notification's HTTP body and headers, signed as the provider signs them."""

    @abstractmethod
    def forge_webhook(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The event as an attacker would tamper with it (the outcome turned around)."""

    def check_webhook_secret(self, secret: str) -> None:
        """Raise ValueError when `secret` cannot be this provider's signing secret."""

    @abstractmethod
    def finish_challenge(self, challenge: Challenge, authenticated: bool) -> None:
        """The shopper decided a 3-D Secure challenge: settle its payment and notify."""

    @abstractmethod
    def challenge_return(self, challenge: Challenge) -> str | None:
        """The merchant's return URL with the provider's parameters (None: there is none)."""

    def notify(self, operation: str, event_id: str, label: str, doc: dict[str, Any]) -> None:
        """Post a notification of what was just done (see emulators/webhooks.py)."""
        self.webhooks.emit(WebhookEvent(event_id, label, operation, doc))

    def reset(self) -> None:
        self.ledger.clear()
        self.faults.clear()
        self.quota.refill()  # the plan is launch configuration: kept, its bucket full again
        self.idempotency.clear()
        self.webhooks.clear()
        self.requests.clear()
        self.challenges.clear()
        self.received_headers.clear()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        for route in self.routes():
            app.router.add_route(route.method, route.path, self._wrap(route))
        # The shopper's challenge page: a browser page, outside the API's auth and faults.
        app.router.add_routes(self.challenges.routes())
        return app

    def _wrap(self, route: ApiRoute) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests[route.operation] += 1
            self.received_headers.append(dict(request.headers))
            denied = self.authenticate(request)
            if denied is not None:
                return denied
            wait = self.quota.take()
            if wait is not None:
                return self.quota_exceeded_response(wait)
            decision = self.faults.decide(route.operation)
            if decision.reset_before:
                _reset_connection(request)
                return web.Response(status=500)
            if decision.rate_limit_s is not None:
                return self.rate_limited_response(decision.rate_limit_s)
            if decision.error is not None and not decision.error.after_processing:
                return self.error_response(decision.error)
            body = await request.read()
            key = request.headers.get(self.idempotency_header) if route.idempotent else None
            ctx = EmulatorRequest(request, body, route.operation, key, decision)
            if key is not None:
                fingerprint = hashlib.sha256(request.method.encode() + request.path.encode() + body).hexdigest()
                claim, stored = self.idempotency.claim(key, fingerprint)
                if claim is Claim.REPLAY and stored is not None:
                    return web.Response(status=stored.status, body=stored.body, content_type=stored.content_type,
                                        headers=self.replay_headers(stored))
                if claim is not Claim.NEW:
                    return self.idempotency_conflict(claim)
            try:
                response = await route.handler(ctx)
            except BaseException:
                if key is not None:
                    self.idempotency.abandon(key)
                raise
            if decision.error is not None:  # after processing: the charge stands, the answer is lost
                response = self.error_response(decision.error)
            if key is not None:
                assert isinstance(response, web.Response)
                self.idempotency.finish(
                    key, StoredAnswer(response.status, bytes(response.body or b""), response.content_type)
                )
            if decision.timeout_after_s is not None:
                try:
                    await asyncio.wait_for(self.closing.wait(), decision.timeout_after_s)
                except TimeoutError:
                    pass
                _reset_connection(request)
            elif decision.reset_after:
                _reset_connection(request)
            return response

        return handle


class EmulatorServer:
    """Runs one emulator on loopback: the API site and a plain-HTTP admin site."""

    def __init__(
        self,
        emulator: ProviderEmulator,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        certificate_issuer: Callable[[float], tuple[Path, Path]] | None = None,
    ) -> None:
        self.emulator = emulator
        self.host = host
        self._port = port
        self._admin_port = admin_port
        self.ssl_context = ssl_context
        self._issue_certificate = certificate_issuer
        self._api_runner: web.AppRunner | None = None
        self._api_site: web.TCPSite | None = None
        self._admin_runner: web.AppRunner | None = None
        self.outage = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def admin_port(self) -> int:
        return self._admin_port

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self._port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self._admin_port}"

    async def start(self) -> None:
        self._api_runner = web.AppRunner(self.emulator.build_app(), access_log=None, shutdown_timeout=1.0)
        await self._api_runner.setup()
        await self._start_api_site()
        self._admin_runner = web.AppRunner(self._admin_app(), access_log=None, shutdown_timeout=1.0)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, self.host, self._admin_port)
        await admin_site.start()
        self._admin_port = _bound_port(self._admin_runner)

    async def _start_api_site(self) -> None:
        assert self._api_runner is not None
        # A real provider's edge takes a burst of new connections: an accept queue of aiohttp's
        # default 128 dropped the SYNs of a 256-payment burst, and the retransmit a second later
        # read as the provider's connect timeout.
        self._api_site = web.TCPSite(self._api_runner, self.host, self._port, ssl_context=self.ssl_context,
                                     reuse_address=True, backlog=1024)
        await self._api_site.start()
        self._port = _bound_port(self._api_runner)

    async def stop(self) -> None:
        self.emulator.closing.set()
        for runner in (self._api_runner, self._admin_runner):
            if runner is not None:
                await runner.cleanup()
        self._api_runner = self._admin_runner = None
        await self.emulator.webhooks.close()

    async def set_outage(self, on: bool) -> None:
        """Outage closes the listener and every open connection, so callers get connection
        refused (never an ambiguous reset on a request already sent)."""
        if on == self.outage or self._api_runner is None:
            return
        self.outage = on
        if on:
            assert self._api_site is not None
            await self._api_site.stop()
            server = self._api_runner.server
            if server is not None:
                for conn in list(server.connections):
                    conn.force_close()
        else:
            await self._start_api_site()

    def reload_certificate(self, cert: Path, key: Path) -> None:
        """New handshakes present the new pair; connections already open keep theirs."""
        if self.ssl_context is None:
            raise RuntimeError("this emulator serves plain HTTP")
        self.ssl_context.load_cert_chain(cert, key)

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_emulator/ledger", self._get_ledger)
        app.router.add_get("/_emulator/faults", self._get_faults)
        app.router.add_put("/_emulator/faults", self._put_faults)
        app.router.add_delete("/_emulator/faults", self._delete_faults)
        app.router.add_post("/_emulator/outage", self._post_outage)
        app.router.add_get("/_emulator/quota", self._get_quota)
        app.router.add_put("/_emulator/quota", self._put_quota)
        app.router.add_delete("/_emulator/quota", self._delete_quota)
        app.router.add_post("/_emulator/reset", self._post_reset)
        app.router.add_post("/_emulator/certificate", self._post_certificate)
        app.router.add_get("/_emulator/requests", self._get_requests)
        app.router.add_get("/_emulator/webhooks", self._get_webhooks)
        app.router.add_get("/_emulator/challenges", self._get_challenges)
        app.router.add_put("/_emulator/webhooks/target", self._put_webhook_target)
        app.router.add_delete("/_emulator/webhooks/target", self._delete_webhook_target)
        return app

    async def _get_requests(self, _request: web.Request) -> web.Response:
        return json_response(200, {"by_operation": dict(self.emulator.requests)})

    async def _get_challenges(self, _request: web.Request) -> web.Response:
        return json_response(200, {"challenges": self.emulator.challenges.snapshot()})

    async def _get_webhooks(self, _request: web.Request) -> web.Response:
        return json_response(200, self.emulator.webhooks.snapshot())

    async def _put_webhook_target(self, request: web.Request) -> web.Response:
        """`{"url": …, "secret": …, "time_factor": …, "timeout_s": …}`: where notifications go
        from now on (retries already scheduled included)."""
        try:
            target = WebhookTarget.model_validate_json(await request.read())
            self.emulator.webhooks.set_target(target)
        except ValidationError as exc:
            return json_response(422, {"error": "invalid webhook target", "detail": orjson.loads(exc.json())})
        except ValueError as exc:
            return json_response(422, {"error": "invalid webhook target", "detail": str(exc)})
        return json_response(200, {"target": target.public()})

    async def _delete_webhook_target(self, _request: web.Request) -> web.Response:
        self.emulator.webhooks.set_target(None)
        return json_response(200, {"target": None})

    async def _get_ledger(self, _request: web.Request) -> web.Response:
        return json_response(200, self.emulator.ledger.snapshot())

    async def _get_faults(self, _request: web.Request) -> web.Response:
        return json_response(200, {"plan": self.emulator.faults.plan.model_dump(), "outage": self.outage})

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            plan = FaultPlan.model_validate_json(await request.read())
        except ValidationError as exc:
            return json_response(422, {"error": "invalid fault plan", "detail": orjson.loads(exc.json())})
        self.emulator.faults.set(plan)
        return json_response(200, {"plan": plan.model_dump()})

    async def _delete_faults(self, _request: web.Request) -> web.Response:
        self.emulator.faults.clear()
        await self.set_outage(False)
        return json_response(200, {"plan": self.emulator.faults.plan.model_dump()})

    async def _get_quota(self, _request: web.Request) -> web.Response:
        return json_response(200, self.emulator.quota.snapshot())

    async def _put_quota(self, request: web.Request) -> web.Response:
        """`{"rate_limit_per_s": 25, "burst": 25}`: the account's quota from now on."""
        try:
            plan = QuotaPlan.model_validate_json(await request.read())
        except ValidationError as exc:
            return json_response(422, {"error": "invalid quota", "detail": orjson.loads(exc.json())})
        self.emulator.quota.set(plan)
        return json_response(200, self.emulator.quota.snapshot())

    async def _delete_quota(self, _request: web.Request) -> web.Response:
        self.emulator.quota.clear()
        return json_response(200, self.emulator.quota.snapshot())

    async def _post_outage(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read() or b"{}")
        await self.set_outage(bool(doc.get("on", True)))
        return json_response(200, {"outage": self.outage})

    async def _post_reset(self, _request: web.Request) -> web.Response:
        self.emulator.reset()
        await self.set_outage(False)
        return json_response(200, {"reset": True})

    async def _post_certificate(self, request: web.Request) -> web.Response:
        if self._issue_certificate is None or self.ssl_context is None:
            return json_response(409, {"error": "this emulator has no certificate issuer"})
        doc = orjson.loads(await request.read() or b"{}")
        days = float(doc.get("days_valid", 1))
        cert, key = await asyncio.to_thread(self._issue_certificate, days)  # key generation and file I/O
        self.reload_certificate(cert, key)
        return json_response(200, {"days_valid": days, "cert": str(cert)})


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("site has no TCP address")
