"""`/livez` checks nothing outside the process; `/readyz` fails, naming the reason, while the
journal cannot be written, while the transaction log is stalled, and while no route has a usable
provider (an expired client certificate included), and comes back by itself.

The faults are real: another connection holding SQLite's write lock (an operator's shell, a
backup); the log's file system frozen with `fsfreeze` (a loop-mounted ext4 image: writes block
in the kernel without failing, as on a hung disk or network mount); an expired client
certificate on disk at start.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from emulators.server import EmulatorServer
from gateway.certs.devca import DevCertLayout, issue_dev_pair, write_pem_pair
from gateway.config import GatewayConfig, parse_config
from tests.conftest import gateway_config_data, pay, txlog

POLL_S = 0.05


async def ready_state(client: TestClient, status: int, timeout: float = 15) -> dict[str, Any]:
    """/readyz once it answers `status` (the probes run on their own schedule: poll, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get("/readyz")
        body = await resp.json()
        if resp.status == status:
            return body
        assert time.monotonic() < deadline, f"/readyz still {resp.status}: {body}"
        await asyncio.sleep(POLL_S)


async def assert_live(client: TestClient) -> None:
    for path in ("/livez", "/healthz"):
        resp = await client.get(path)
        assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_readyz_fails_while_the_journal_cannot_be_written(
        make_config: Callable[..., GatewayConfig], start_gateway: Any) -> None:
    config = make_config(storage={"probe_interval_s": 0.2})
    client = await start_gateway(config)
    assert (await client.get("/readyz")).status == 200
    holder = sqlite3.connect(config.storage.sqlite_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the journal's write lock
    try:
        body = await ready_state(client, 503)
        assert body["ready"] is False and body["journal"]["status"] == "unavailable"
        assert [r for r in body["reasons"] if r.startswith("journal: ")], body["reasons"]
        await assert_live(client)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    body = await ready_state(client, 200)
    assert body["reasons"] == [] and body["journal"] == {"status": "ok", "reason": None}


@contextmanager
def frozen_disk(root: Path) -> Iterator[tuple[Path, Callable[[bool], None]]]:
    """A small ext4 file system on a loop device, and a switch that freezes and thaws it. Always
    thawed and unmounted at the end (a frozen mount left behind would hang whoever writes there)."""
    image, mount = root / "disk.img", root / "disk"
    mount.mkdir()
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    frozen = False

    def freeze(on: bool) -> None:
        nonlocal frozen
        subprocess.run(["fsfreeze", "-f" if on else "-u", str(mount)], check=True)
        frozen = on

    try:
        yield mount, freeze
    finally:
        if frozen:
            freeze(False)
        # Lazily: if the test failed, its gateway still has the log open until its fixture closes it.
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


async def test_readyz_fails_while_the_transaction_log_is_stalled(
        make_config: Callable[..., GatewayConfig], start_gateway: Any, tmp_path: Path) -> None:
    with frozen_disk(tmp_path) as (disk, freeze):
        config = make_config(log={"dir": str(disk / "logs"), "stall_after_s": 0.5})
        client = await start_gateway(config)
        assert (await pay(client))[0] == 201
        await ready_state(client, 200)
        try:
            freeze(True)
            status, doc = await pay(client)  # answered: its line is in the journal's outbox
            assert status == 201
            body = await ready_state(client, 503)
            log = body["transaction_log"]
            assert log["status"] == "stalled" and log["backlog"] >= 1 and log["oldest_wait_s"] >= 0.5
            assert [r for r in body["reasons"] if r.startswith("transaction log stalled: ")], body["reasons"]
            assert body["journal"]["status"] == "ok" and not body["degraded_routes"]
            await assert_live(client)
        finally:
            freeze(False)
        body = await ready_state(client, 200)
        assert body["transaction_log"]["status"] == "ok" and body["transaction_log"]["backlog"] == 0
        assert len(await txlog(client, doc["id"])) == 1
        await client.close()  # before the file system goes away


@pytest.fixture
def certs(dev_certs: DevCertLayout, tmp_path: Path) -> DevCertLayout:
    """A private copy of the dev certificates (same CA), so expiring one touches no other test."""
    shutil.copytree(dev_certs.root, tmp_path / "certs")
    return DevCertLayout(tmp_path / "certs")


async def test_readyz_fails_when_no_route_has_a_usable_provider(
        tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer], start_gateway: Any) -> None:
    expired = issue_dev_pair(certs, usage="client", common_name="gateway-client-stripe", days_valid=-1)
    write_pem_pair(*expired, certs.client_cert("stripe"), certs.client_key("stripe"))

    only_stripe = parse_config(gateway_config_data(tmp_path / "one", certs, emulators, order=("stripe",)))
    client = await start_gateway(only_stripe)
    body = await ready_state(client, 503, timeout=0)
    assert body["providers"]["stripe"] == {"usable": False, "reason": "client_certificate_expired",
                                           "breaker": "closed", "bulkhead_active": 0}
    assert body["reasons"] == ["no route has a usable provider (stripe: client_certificate_expired)"]
    assert body["degraded_routes"] == ["default"]
    await assert_live(client)
    await client.close()

    # A second route that adyen serves: ready, the stripe-only route named as degraded.
    data = gateway_config_data(tmp_path / "two", certs, emulators, order=("stripe", "adyen"))
    data["routes"] = [{"name": "usd", "match": {"currencies": ["USD"]}, "providers": ["stripe"]},
                      {"name": "default", "providers": ["adyen"]}]
    client = await start_gateway(parse_config(data))
    body = await ready_state(client, 200, timeout=0)
    assert body["ready"] is True and body["reasons"] == []
    assert body["routes"] == {"usd": {"usable_providers": []}, "default": {"usable_providers": ["adyen"]}}
    assert body["degraded_routes"] == ["usd"]
