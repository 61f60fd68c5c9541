"""CPU per payment and added latency: the gateway against a bare forwarder, same run, same
emulator, same load. Reports ratios, never absolute pass/fail.

    .venv/bin/python bench/bench_gateway.py [--payments 3000] [--concurrency 32]

Each server runs in its own process; its CPU time (utime+stime from /proc) over the measured
window divided by the payments sent is its CPU per payment. Traffic stays on 127.0.0.1 and
every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BODY = orjson.dumps({"amount": 1299, "currency": "EUR", "merchant_reference": "bench",
                     "payment_method": {"type": "card", "number": "4242424242424242", "exp_month": 12,
                                        "exp_year": 2030, "cvc": "123"}})
MAX_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def load(url: str, payments: int, concurrency: int, headers: dict[str, str]) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(payments))
    deadline = time.monotonic() + MAX_SECONDS

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            async with session.post(url, data=BODY, headers={**headers, "Idempotency-Key": f"b-{os.getpid()}-{url}-{i}",
                                                             "Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 201:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return latencies


def measure(name: str, proc: subprocess.Popen, url: str, ready: str, args: argparse.Namespace,
            headers: dict[str, str]) -> dict[str, float]:
    asyncio.run(wait_ready(ready))
    asyncio.run(load(url, min(200, args.payments), args.concurrency, headers))  # warm-up
    cpu0 = cpu_seconds(proc.pid)
    t0 = time.perf_counter()
    lat = asyncio.run(load(url, args.payments, args.concurrency, headers))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(proc.pid) - cpu0
    lat.sort()
    return {"name": name, "payments": len(lat), "cpu_us_per_payment": cpu / len(lat) * 1e6,
            "p50_ms": statistics.median(lat) * 1000, "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
            "throughput_per_s": len(lat) / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--payments", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    args.payments = min(args.payments, 100_000)
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    emu_port, fwd_port, gw_port = free_port(), free_port(), free_port()
    env = {**os.environ, "GATEWAY_KEY_CHECKOUT": "bench-key", "GATEWAY_KEY_REPORTING": "bench-read",
           "STRIPE_API_KEY": "sk_test_bench"}
    config = {
        "server": {"host": "127.0.0.1", "port": gw_port, "max_in_flight": 10_000},
        "auth": {"clients": [{"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"}]},
        "storage": {"sqlite_path": str(work / "gateway.db")},
        "log": {"dir": str(work / "logs")},
        "providers": {"stripe": {"kind": "stripe", "base_url": f"http://127.0.0.1:{emu_port}",
                                 "api_key_env": "STRIPE_API_KEY", "bulkhead": {"max_concurrent": 1000}}},
        "routes": [{"name": "default", "providers": ["stripe"]}],
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    procs = []
    try:
        emu = subprocess.Popen([PY, "-m", "gateway.cli", "emulator", "stripe", "--port", str(emu_port), "--no-tls"],
                               cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        procs.append(emu)
        asyncio.run(wait_ready(f"http://127.0.0.1:{emu_port + 100}/_emulator/faults"))
        fwd = subprocess.Popen([PY, str(ROOT / "bench" / "forwarder.py"), str(fwd_port), f"http://127.0.0.1:{emu_port}"],
                               cwd=ROOT, env=env)
        procs.append(fwd)
        base = measure("bare forwarder", fwd, f"http://127.0.0.1:{fwd_port}/v1/payments",
                       f"http://127.0.0.1:{fwd_port}/", args, {})
        gw = subprocess.Popen([PY, "-m", "gateway.cli", "serve", "--config", str(work / "gateway.yaml")], cwd=ROOT,
                              env=env, stderr=subprocess.DEVNULL)
        procs.append(gw)
        gate = measure("gateway", gw, f"http://127.0.0.1:{gw_port}/v1/payments",
                       f"http://127.0.0.1:{gw_port}/healthz", args, {"Authorization": "Bearer bench-key"})
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
    for r in (base, gate):
        print(f"{r['name']:15} {r['payments']:6d} payments  CPU {r['cpu_us_per_payment']:7.0f} µs/payment  "
              f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  {r['throughput_per_s']:7.0f}/s")
    print(orjson.dumps({"cpu_ratio": gate["cpu_us_per_payment"] / base["cpu_us_per_payment"],
                        "added_p50_ms": gate["p50_ms"] - base["p50_ms"], "baseline": base, "gateway": gate}).decode())


if __name__ == "__main__":
    main()
