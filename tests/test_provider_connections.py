"""A provider's connections at a peak: a slow, healthy provider is never a failing one.

- The pool is at least as wide as the bulkhead. Every call the bulkhead admits needs a
  connection. With a smaller pool (the embedded default once had a bulkhead of 200 calls and
  100 connections), calls past the pool's width waited for a connection, and aiohttp counted
  that wait against the connect timeout: a provider answering in a second at a peak was "not
  connected", failed over, and its breaker opened.
- connect_timeout_ms times each connection's TCP and TLS setup, and only that: a peer that
  takes the TCP connection and never finishes the handshake is "not connected" then, not at
  the end of the try.
- Listening sockets take a burst of new connections (`LISTEN_BACKLOG`): with aiohttp's accept
  queue of 128, a burst of 256 cold connections lost the SYNs past it (the kernel's
  ListenOverflows), and their retransmit a second later read as connect timeouts at the
  emulator, and would add a second to a checkout's payments at the gateway.

The burst itself (256 payments at once on a cold pool to a provider answering in a second) is
measured by `make bench`'s `gateway_sqlite_slow` target, with its errors counted, rather than
here: in the suite, the emulator's and the client's handshakes share the test's loop, and a
clean-clone run under load once took them past the 1 s connect timeout it depends on.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from emulators.server import EmulatorServer
from gateway.certs.devca import DevCertLayout
from gateway.config import ConfigError, GatewayConfig
from gateway.drill.process import GatewayProcess, free_port
from gateway.workers import LISTEN_BACKLOG
from providers.base import ProviderRequest
from providers.errors import NotSent
from providers.transport import ProviderTransport
from tests.conftest import gateway_config_data

def test_a_pool_narrower_than_the_bulkhead_is_refused_naming_the_field(
        make_config: Callable[..., GatewayConfig]) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config(providers={"stripe": {"max_connections": 50, "bulkhead": {"max_concurrent": 80}}})
    message = str(raised.value)
    assert "providers.stripe" in message and "max_connections" in message and "80" in message, message
    assert make_config(providers={"stripe": {"max_connections": 300}}).providers["stripe"].connections == 300


async def test_a_handshake_that_never_finishes_is_a_connect_timeout_at_connect_timeout_ms() -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = ProviderTransport("silent", f"https://127.0.0.1:{port}", ssl_context=None, connect_timeout_s=0.2,
                                  max_connections=4)
    await transport.start()
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(NotSent) as raised:
            await transport.send(ProviderRequest("POST", "/v1/payment_intents", {}), timeout_s=5.0)
    finally:
        await transport.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert raised.value.code == "connect_timeout"
    assert "within 0.200s (connect_timeout_ms)" in str(raised.value), "the message names the timer that fired"
    assert asyncio.get_running_loop().time() - started < 2.0, "timed by connect_timeout, not the try's 5 s"


def _accept_queue(port: int) -> int:
    """The listening socket's backlog as the kernel holds it (`ss`: Send-Q of a LISTEN socket)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    [line] = [ln for ln in out.splitlines() if ln.strip()]
    return int(line.split()[2])


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_gateway_and_the_emulators_listen_with_a_peaks_accept_queue(
        tmp_path: Path, dev_certs: DevCertLayout, emulators: dict[str, EmulatorServer], workers: int) -> None:
    expected = min(LISTEN_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    port = free_port("127.0.0.1")
    data = gateway_config_data(tmp_path, dev_certs, emulators, ("stripe",), server={"host": "127.0.0.1", "port": port})
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(data))
    gateway = GatewayProcess(tmp_path / "gateway.yaml", f"http://127.0.0.1:{port}", {}, tmp_path / "gateway.log",
                             args=("--workers", str(workers)) if workers > 1 else ())
    await gateway.start()
    try:
        assert _accept_queue(port) == expected
    finally:
        await gateway.stop()
    assert _accept_queue(int(emulators["stripe"].url.rsplit(":", 1)[1])) == expected
