"""The real servers around a fleet drill's gateway processes: a Redis and an HAProxy of the
drill's own (free loopback ports, so the drill may stop and start them without touching anyone
else's), a PostgreSQL schema of its own in the shared server, and the process-level faults the
drill applies to its replicas (SIGKILL of a whole replica, its PostgreSQL sessions terminated).

HAProxy runs in the foreground (`-db`) with a configuration written here: round robin over the
replicas, health checks on `GET /readyz`, retries on another replica only for a connection that
was never made, and a runtime socket (`stats socket ... level admin`) through which the drill
drains a replica before restarting it, as an operator would (`set server gateways/r1 state drain`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from gateway.drill.process import GatewayProcessError, free_port

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
HAPROXY = "/usr/sbin/haproxy"
CHECK_INTER_MS = 200  # HAProxy's health-check interval: a replica is out within ~2 of these
SERVER_TIMEOUT_S = 15  # above the drill's request deadline: the gateway always answers first


class FleetSetupError(GatewayProcessError):
    """A server around the fleet (Redis, HAProxy, a migration) did not come up."""


class RedisServer:
    """A redis-server on a free loopback port, without persistence: `stop` takes Redis away,
    `start` brings it back empty (what a Redis restart without a snapshot looks like)."""

    def __init__(self) -> None:
        self.port = free_port(HOST)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        client = aioredis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    await client.ping()
                    return
                except (RedisError, OSError):
                    if time.monotonic() > deadline or self._proc.returncode is not None:
                        raise FleetSetupError(f"redis-server did not start on port {self.port}") from None
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), START_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    port: int


def haproxy_config(port: int, socket_path: Path, backends: Sequence[Backend]) -> str:
    servers = "\n".join(f"    server {b.name} {HOST}:{b.port}" for b in backends)
    return f"""global
    maxconn 4000
    stats socket {socket_path} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server {SERVER_TIMEOUT_S}s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 5s
    timeout check 1s
    retries 2
    retry-on conn-failure
    option redispatch 1
    default-server check inter {CHECK_INTER_MS}ms fall 2 rise 1 maxconn 500

frontend payments
    bind {HOST}:{port}
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
{servers}
"""


class HAProxy:
    """HAProxy in the foreground in front of `backends`; `url` is what the checkout calls."""

    def __init__(self, workdir: Path, backends: Sequence[Backend]) -> None:
        self.port = free_port(HOST)
        self.socket_path = workdir / "haproxy.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.config_path.write_text(haproxy_config(self.port, self.socket_path, backends), encoding="utf-8")
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                HAPROXY, "-db", "-f", str(self.config_path), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.returncode is not None:
                raise FleetSetupError(f"haproxy exited with {self._proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                await self.command("show info")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise FleetSetupError("haproxy's runtime socket did not come up") from None
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.send_signal(signal.SIGUSR1)  # soft stop: finish what is in flight
        try:
            await asyncio.wait_for(self._proc.wait(), START_TIMEOUT_S)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()

    async def command(self, line: str) -> str:
        """One command on the runtime API; its answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 5.0)).decode()
        finally:
            writer.close()

    async def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers as `show stat` reports them (status, scur: sessions now, ...)."""
        lines = (await self.command("show stat")).splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line)
        return {r["svname"]: r for r in rows if r.get("pxname") == "gateways" and r["svname"] not in
                ("FRONTEND", "BACKEND")}

    async def drain(self, name: str, timeout_s: float) -> float:
        """No new requests to `name`; returns once its in-flight sessions are done (or timeout)."""
        started = time.monotonic()
        await self.command(f"set server gateways/{name} state drain")
        while time.monotonic() - started < timeout_s:
            if (await self.servers())[name].get("scur") == "0":
                break
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def ready(self, name: str, timeout_s: float) -> float:
        """Back in rotation; returns once its health check passes (status UP)."""
        started = time.monotonic()
        await self.command(f"set server gateways/{name} state ready")
        while time.monotonic() - started < timeout_s:
            if (await self.servers())[name].get("status", "").startswith("UP"):
                break
            await asyncio.sleep(0.05)
        return time.monotonic() - started


# -- PostgreSQL: a schema of the drill's own, and its sessions cut ----------------------------------


def dsn_with_search_path(dsn: str, schema: str) -> str:
    """asyncpg passes unknown DSN query parameters to the server as settings."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"] + [("search_path", schema)]
    return urlunsplit(parts._replace(query=urlencode(query)))


@asynccontextmanager
async def postgres_schema(dsn: str, prefix: str = "gw_fleet") -> AsyncIterator[str]:
    """A DSN whose tables live in a fresh schema of their own, dropped afterwards."""
    schema = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(dsn, timeout=5)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield dsn_with_search_path(dsn, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it (a replica: its supervisor and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def kill_tree(pids: Iterable[int]) -> None:
    """SIGKILL every one at once: a replica dies as a whole (a host or container crash)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def gone(pids: Iterable[int], timeout_s: float = START_TIMEOUT_S) -> None:
    """Until none of `pids` runs any more (dead or a zombie: neither holds a socket)."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state in ("Z", "X"):
                break
            await asyncio.sleep(0.02)


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def client_ports(pids: Iterable[int], server_port: int) -> list[int]:
    """Local ports of the TCP connections these processes hold to `server_port` on loopback:
    how pg_stat_activity.client_port names their PostgreSQL sessions."""
    inodes = set().union(*(_socket_inodes(pid) for pid in pids))
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.append(int(local.rsplit(":", 1)[1], 16))
    return ports


async def terminate_backends(dsn: str, pids: Iterable[int]) -> int:
    """`pg_terminate_backend` on every session the given processes hold (the gateway role's
    backends of this fleet, not the other users of a shared server); how many were cut."""
    port = urlsplit(dsn).port or 5432
    ports = client_ports(pids, port)
    if not ports:
        return 0
    admin = await asyncpg.connect(dsn, timeout=5)
    try:
        return int(await admin.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND usename = current_user AND pid <> pg_backend_pid() "
            "AND client_port = ANY($1::int[])", ports))
    finally:
        await admin.close()
