"""The servers `make bench` measures, each a real process on loopback with free ports.

Two Stripe emulators stand upstream of everything: one over plain HTTP (the floor, nginx and
the HTTP forwarder call it) and one over mTLS with dev certificates made for this run (the mTLS
forwarder and the gateway call it, the gateway exactly as `config/gateway.yaml` configures a
provider). Every target is a context manager that starts its process(es), waits until they
answer, and stops them; `pids` are the processes whose CPU and memory count as the target's.
nginx runs as this user with its own configuration, pid file and logs in the run's temporary
directory, never the system's service.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import yaml

from gateway.certs.devca import DevCertLayout, generate_dev_certs
from gateway.drill.fleet_services import postgres_schema
from gateway.drill.process import free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
GATEWAY_KEY = "bench-checkout-key"
STRIPE_KEY = "sk_test_bench"
PG_DSN = os.environ.get("BENCH_PG_DSN") or os.environ.get(
    "GATEWAY_TEST_PG_DSN", "postgresql://gateway:gateway@127.0.0.1:5432/gateway_test")

# One payment as the checkout sends it to a proxy (JSON), and as a proxy sends it to Stripe (form).
PAYMENT_JSON = orjson.dumps({"amount": 1299, "currency": "EUR", "merchant_reference": "bench",
                             "payment_method": {"type": "card", "number": "4242424242424242", "exp_month": 12,
                                                "exp_year": 2030, "cvc": "123"}}).decode()
STRIPE_FORM = ("amount=1299&currency=eur&confirm=true&payment_method_data%5Bcard%5D%5Bnumber%5D=4242424242424242"
               "&metadata%5Bgateway_payment_id%5D=bench")


class TargetUnavailable(RuntimeError):
    """A target that cannot run here (PostgreSQL down, a tool missing): the bench says why."""


@dataclass
class Emulator:
    url: str
    admin_url: str
    pid: int

    def reset(self, faults: dict[str, object] | None = None) -> None:
        """A fresh ledger and idempotency store, so every target meets the same emulator; then
        the target's own fault plan, if it has one (the reset cleared the last one)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.admin_url}/_emulator/reset", method="POST"),
                               timeout=10).read()
        if faults is not None:
            urllib.request.urlopen(urllib.request.Request(
                f"{self.admin_url}/_emulator/faults", data=orjson.dumps(faults), method="PUT",
                headers={"Content-Type": "application/json"}), timeout=10).read()


@dataclass
class Target:
    name: str
    label: str
    url: str  # what wrk loads: scheme, host, port and path
    body: str
    headers: dict[str, str]
    pids: list[int]
    upstream: Emulator
    notes: list[str] = field(default_factory=list)
    faults: dict[str, object] | None = None  # the upstream's fault plan while this target runs
    concurrency: tuple[int, ...] | None = None  # measured only at these (default: the bench's)


@dataclass
class Stack:
    work: Path
    certs: DevCertLayout
    http: Emulator
    mtls: Emulator


# Another checkout of the gateway (`git worktree add /tmp/before <commit>`): its `gateway serve`
# is the target `gateway_sqlite_baseline`, so an optimisation is measured before and after in
# one run, against the same forwarder and emulator.
BASELINE_TREE = os.environ.get("BENCH_BASELINE_TREE", "")


def _env(extra: dict[str, str] | None = None, root: Path = ROOT) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
            "GATEWAY_KEY_CHECKOUT": GATEWAY_KEY, "STRIPE_API_KEY": STRIPE_KEY, **(extra or {})}


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None, root: Path = ROOT) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, cwd=root, env=env or _env(root=root), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until `url` answers below 500; bounded, and fails at once if the process died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetUnavailable(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)  # another process is starting: nothing to await across processes
    raise TargetUnavailable(f"{url} did not answer within {READY_TIMEOUT_S:g} s: {log.read_text()[-2000:]}")


def _emulator(work: Path, certs: DevCertLayout, tls: bool) -> tuple[Emulator, subprocess.Popen[bytes]]:
    port, admin = free_port("127.0.0.1"), free_port("127.0.0.1")
    log = work / f"emulator-{'mtls' if tls else 'http'}.log"
    args = [PY, "-m", "gateway.cli", "emulator", "stripe", "--port", str(port), "--admin-port", str(admin)]
    args += ["--certs", str(certs.root)] if tls else ["--no-tls"]
    proc = _spawn(args, log)
    emulator = Emulator(f"{'https' if tls else 'http'}://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", proc.pid)
    _wait_ready(f"{emulator.admin_url}/_emulator/faults", proc, log)
    return emulator, proc


@contextmanager
def stack(work: Path) -> Iterator[Stack]:
    certs = generate_dev_certs(work / "certs", ["stripe"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        http, proc = _emulator(work, certs, tls=False)
        procs.append(proc)
        mtls, proc = _emulator(work, certs, tls=True)
        procs.append(proc)
        yield Stack(work, certs, http, mtls)
    finally:
        for proc in procs:
            _stop(proc)


def _stripe_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {STRIPE_KEY}", "Content-Type": "application/x-www-form-urlencoded"}


@contextmanager
def direct(s: Stack) -> Iterator[Target]:
    """The floor: wrk straight at the emulator, the request a proxy would send it."""
    yield Target("emulator", "emulator direct (floor)", f"{s.http.url}/v1/payment_intents", STRIPE_FORM,
                 _stripe_headers(), [s.http.pid], s.http, ["CPU is the emulator's own"])


NGINX_CONF = """daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream emulator {{
        server {upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://emulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@contextmanager
def nginx(s: Stack) -> Iterator[Target]:
    """nginx as a keep-alive reverse proxy: what forwarding costs in C, one worker process
    (the Python servers are one process each)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        raise TargetUnavailable("nginx is not installed (make bench installs it: apt-get install nginx)")
    work = s.work / "nginx"
    work.mkdir(exist_ok=True)
    port = free_port("127.0.0.1")
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port, upstream=s.http.url.removeprefix("http://")))
    log = work / "nginx.log"
    proc = _spawn([binary, "-p", str(work), "-e", str(work / "nginx-error.log"), "-c", str(conf)], log)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/_nginx_ready", proc, log)  # a 404 from the emulator: proxied
        yield Target("nginx", "nginx keep-alive proxy", f"http://127.0.0.1:{port}/v1/payment_intents", STRIPE_FORM,
                     _stripe_headers(), [proc.pid], s.http)
    finally:
        _stop(proc)


@contextmanager
def forwarder(s: Stack, tls: bool) -> Iterator[Target]:
    """The bare aiohttp forwarder (bench/forwarder.py), to the emulator over HTTP or mTLS."""
    port = free_port("127.0.0.1")
    upstream = s.mtls if tls else s.http
    args = [PY, str(ROOT / "bench" / "forwarder.py"), str(port), upstream.url]
    if tls:
        args += ["--ca", str(s.certs.provider_ca("stripe")), "--cert", str(s.certs.client_cert("stripe")),
                 "--key", str(s.certs.client_key("stripe"))]
    log = s.work / f"forwarder-{'mtls' if tls else 'http'}.log"
    proc = _spawn(args, log)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/healthz", proc, log)
        name = "forwarder_mtls" if tls else "forwarder_http"
        yield Target(name, f"aiohttp forwarder, {'mTLS' if tls else 'HTTP'}", f"http://127.0.0.1:{port}/v1/payments",
                     PAYMENT_JSON, {"Content-Type": "application/json"}, [proc.pid], upstream)
    finally:
        _stop(proc)


def gateway_config(s: Stack, port: int, work: Path, postgres: bool, sqlite_path: Path | None = None) -> dict[str, object]:
    """The embedded default of config/gateway.yaml with one provider over mTLS; limits raised
    so the bench measures cost, not shedding. `sqlite_path`: a journal file with history
    (bench/seed_journal.py) instead of a fresh one."""
    storage: dict[str, object] = ({"backend": "postgres", "postgres_dsn_env": "GATEWAY_PG_DSN"} if postgres
                                  else {"backend": "sqlite", "sqlite_path": str(sqlite_path or work / "gateway.db")})
    return {
        "server": {"host": "127.0.0.1", "port": port, "max_in_flight": 10_000},
        "auth": {"clients": [{"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"}]},
        "storage": storage,
        "log": {"dir": str(work / "logs")},
        "providers": {"stripe": {
            "kind": "stripe", "base_url": s.mtls.url, "api_key_env": "STRIPE_API_KEY",
            "tls": {"ca": str(s.certs.provider_ca("stripe")), "client_cert": str(s.certs.client_cert("stripe")),
                    "client_key": str(s.certs.client_key("stripe"))},
            "bulkhead": {"max_concurrent": 1000, "max_queue": 1000}}},
        "routes": [{"name": "default", "providers": ["stripe"]}],
    }


@contextmanager
def _pg_schema() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    schema = postgres_schema(PG_DSN, prefix="gw_bench")
    try:
        try:
            dsn = loop.run_until_complete(schema.__aenter__())
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise TargetUnavailable(f"PostgreSQL at {PG_DSN.rsplit('@', 1)[-1]} is not reachable: {exc}") from exc
        try:
            yield dsn
        finally:
            loop.run_until_complete(schema.__aexit__(None, None, None))
    finally:
        loop.close()


# Issue 18's memory goal is RSS at 256 *slow* payments in flight: each holds its request, its
# journal record and its provider connection for a second, not for the emulator's millisecond.
SLOW_UPSTREAM_MS = 1000
SLOW_FAULTS: dict[str, object] = {"rules": [{"kind": "latency", "latency_ms": SLOW_UPSTREAM_MS,
                                             "operations": ["authorize"]}]}


@contextmanager
def gateway(s: Stack, postgres: bool, sqlite_path: Path | None = None, name: str | None = None,
            workers: int = 1, root: Path = ROOT, slow: bool = False) -> Iterator[Target]:
    """`gateway serve [--workers N]` to the mTLS emulator: SQLite (the embedded default; a fresh
    file, or `sqlite_path`) or PostgreSQL in a schema of its own, dropped afterwards. With
    workers, the target's CPU is the supervisor's tree: every worker's. `slow`: every
    authorisation takes SLOW_UPSTREAM_MS at the emulator, measured at 256 in flight only."""
    name = name or ("gateway_pg" if postgres else "gateway_sqlite")
    work = s.work / name
    work.mkdir(exist_ok=True)
    port = free_port("127.0.0.1")
    with _pg_schema() if postgres else _no_schema() as dsn:
        (work / "gateway.yaml").write_text(yaml.safe_dump(gateway_config(s, port, work, postgres, sqlite_path)))
        log = work / "gateway.log"
        proc = _spawn([PY, "-m", "gateway.cli", "serve", "--config", str(work / "gateway.yaml"),
                       "--workers", str(workers)], log,
                      _env({"GATEWAY_PG_DSN": dsn} if dsn else None, root=root), root=root)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/healthz", proc, log)
            label = "gateway, PostgreSQL, mTLS" if postgres else "gateway, SQLite, mTLS (default)"
            if workers > 1:
                label = f"gateway, SQLite, mTLS, {workers} workers"
            if root != ROOT:
                label = f"gateway, SQLite, mTLS, baseline ({root})"
            if slow:
                label = f"gateway, SQLite, mTLS, provider answering in {SLOW_UPSTREAM_MS} ms"
            notes = ["CPU is the gateway process's; the shared PostgreSQL server's is not counted"] if postgres else []
            yield Target(name, label, f"http://127.0.0.1:{port}/v1/payments", PAYMENT_JSON,
                         {"Content-Type": "application/json", "Authorization": f"Bearer {GATEWAY_KEY}"},
                         [proc.pid], s.mtls, notes, faults=SLOW_FAULTS if slow else None,
                         concurrency=(256,) if slow else None)
        finally:
            _stop(proc)


@contextmanager
def _no_schema() -> Iterator[str]:
    yield ""


TARGETS = {
    "emulator": direct,
    "nginx": nginx,
    "forwarder_http": lambda s: forwarder(s, tls=False),
    "forwarder_mtls": lambda s: forwarder(s, tls=True),
    "gateway_sqlite": lambda s: gateway(s, postgres=False),
    "gateway_pg": lambda s: gateway(s, postgres=True),
    "gateway_sqlite_w2": lambda s: gateway(s, postgres=False, name="gateway_sqlite_w2", workers=2),
    "gateway_sqlite_slow": lambda s: gateway(s, postgres=False, name="gateway_sqlite_slow", slow=True),
}
if BASELINE_TREE:
    TARGETS["gateway_sqlite_baseline"] = lambda s: gateway(s, postgres=False, name="gateway_sqlite_baseline",
                                                           root=Path(BASELINE_TREE).resolve())
