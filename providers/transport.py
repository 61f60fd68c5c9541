"""The I/O half of every adapter: one keep-alive ClientSession per provider.

All of aiohttp's failure modes are translated here, once, into `NotSent` / `MaybeSent`. The
distinction rests on whether the request headers left our process, which aiohttp reports
through a trace hook; anything after that point is treated as possibly processed.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp

from providers.base import ProviderRequest, ProviderResponse
from providers.errors import MaybeSent, NotSent

MAX_RESPONSE_BYTES = 1 << 20


@dataclass(slots=True)
class _SendState:
    sent: bool = False
    fresh_connection: bool = False


async def _on_headers_sent(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: Any) -> None:
    state = ctx.trace_request_ctx
    if isinstance(state, _SendState):
        state.sent = True


async def _on_connection_created(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: Any) -> None:
    state = ctx.trace_request_ctx
    if isinstance(state, _SendState):
        state.fresh_connection = True


def _trace_config() -> aiohttp.TraceConfig:
    tc = aiohttp.TraceConfig()
    tc.on_request_headers_sent.append(_on_headers_sent)
    tc.on_connection_create_end.append(_on_connection_created)
    return tc


async def _read_capped(resp: aiohttp.ClientResponse, name: str) -> bytes:
    """The whole body (`content.read(n)` returns only what has arrived), at most
    MAX_RESPONSE_BYTES: a provider answer larger than that is not one we can trust."""
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise MaybeSent(f"{name}: answer of {resp.content_length} bytes is too large", code="response_too_large")
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(65536):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise MaybeSent(f"{name}: answer larger than {MAX_RESPONSE_BYTES} bytes", code="response_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


_CERTIFICATE_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "HANDSHAKE_FAILURE", "ACCESS_DENIED")


def _ssl_alert(exc: BaseException) -> bool:
    """A certificate alert from the peer: it refused the session, so it processed nothing. Any
    other TLS error (a bad record mid-stream) may come after the request was processed."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            reason = f"{seen.reason or ''} {seen}".upper()
            return any(alert in reason for alert in _CERTIFICATE_ALERTS)
        seen = seen.__cause__ or seen.__context__
    return False


class ProviderTransport:
    """Sends ProviderRequests to one provider over a pooled, TLS-capable session."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._ssl = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            ssl=self._ssl if self._ssl is not None else True,
            limit=self._max_connections,
            keepalive_timeout=30,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # connect_timeout_ms bounds getting a connection: DNS, every address tried, TCP and TLS
            # (`connect`), each address's setup too (`sock_connect`). A wait for a free pooled
            # connection would count as well, so the pool is never narrower than the bulkhead
            # (`ProviderConfig.connections`): nothing the bulkhead admits waits for one.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._connect_timeout_s, sock_connect=self._connect_timeout_s
            ),
            trace_configs=[_trace_config()],
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: ProviderRequest, timeout_s: float) -> ProviderResponse:
        """One HTTP exchange bounded by `timeout_s`; raises NotSent or MaybeSent on failure."""
        if self._session is None:
            raise NotSent(f"{self.name}: transport not started", code="not_started")
        state = _SendState()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.request(
                    request.method,
                    self.base_url + request.path,
                    data=request.body,
                    headers=dict(request.headers),
                    trace_request_ctx=state,
                    allow_redirects=False,
                ) as resp:
                    body = await _read_capped(resp, self.name)
                    return ProviderResponse(status=resp.status, headers=resp.headers, body=body)
        except aiohttp.ConnectionTimeoutError as exc:  # aiohttp's own connect timer, before anything was sent
            raise NotSent(f"{self.name}: not connected within {self._connect_timeout_s:.3f}s (connect_timeout_ms)",
                          code="connect_timeout") from exc
        except TimeoutError as exc:
            if state.sent:
                raise MaybeSent(f"{self.name}: no answer within {timeout_s:.3f}s", code="read_timeout") from exc
            raise NotSent(f"{self.name}: not connected within the try's {timeout_s:.3f}s",
                          code="connect_timeout") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise NotSent(f"{self.name}: certificate rejected: {exc}", code="tls_certificate_error") from exc
        except aiohttp.ClientSSLError as exc:
            raise NotSent(f"{self.name}: TLS handshake failed: {exc}", code="tls_handshake_failed") from exc
        except aiohttp.ClientConnectorError as exc:
            raise NotSent(f"{self.name}: connect failed: {exc.os_error}", code="connect_failed") from exc
        except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
            if _ssl_alert(exc) and state.fresh_connection:
                # Under TLS 1.3 a server rejects our client certificate after the client side
                # of the handshake finished, so the alert arrives on the first read. A server
                # never processes a request on a session it refused. On a reused connection
                # the session was accepted long ago: the error says nothing about this request.
                raise NotSent(f"{self.name}: TLS session refused: {exc}", code="tls_handshake_failed") from exc
            # Reset, disconnect, payload errors: whether they count as processed depends only
            # on whether our request left the process.
            code = "connection_reset" if state.sent else "connect_failed"
            cls = MaybeSent if state.sent else NotSent
            raise cls(f"{self.name}: {type(exc).__name__}: {exc}", code=code) from exc
