"""The gateway as a separate process, for drills that kill it: `python -m gateway.cli serve`.

Started with the drill's configuration file and its secrets in the child's environment only (the
drill process's own environment is never changed). Ready when `/healthz` answers. `kill` is a
SIGKILL (no shutdown hook runs: the crash the journal must survive); `stop` is a SIGTERM with a
bounded wait for the graceful drain, then a SIGKILL. Each start appends the child's output to
one log file in the drill's log directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

import gateway

READY_TIMEOUT_S = 30.0
READY_POLL_S = 0.05
STOP_TIMEOUT_S = 20.0
_PROJECT_ROOT = Path(gateway.__file__).resolve().parents[1]


class GatewayProcessError(RuntimeError):
    """The gateway process did not come up (its log's last lines are in the message)."""


def free_port(host: str) -> int:
    """A port nothing listens on right now; the gateway binds it on every start (SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """The drill's environment plus `env` (the child's secrets), with this checkout importable."""
    return {**os.environ, **env,
            "PYTHONPATH": os.pathsep.join(p for p in (str(_PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}


async def run_gateway_command(args: Sequence[str], env: Mapping[str, str], log_path: Path,
                              timeout_s: float = READY_TIMEOUT_S) -> int:
    """One `gateway ...` command to its end (`db migrate`, as ops would run it); its exit code.
    Its output is appended to `log_path`."""
    with log_path.open("ab") as log:
        log.write(f"--- gateway {' '.join(args)} ---\n".encode())
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            env=child_env(env), cwd=str(_PROJECT_ROOT))
        try:
            return await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise GatewayProcessError(f"gateway {' '.join(args)} did not finish within {timeout_s:g} s") from None


class GatewayProcess:
    def __init__(self, config_path: Path, url: str, env: Mapping[str, str], log_path: Path,
                 args: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.args = tuple(args)  # more `gateway serve` options (`--workers 2`)
        self.url = url
        self._env = child_env(env)
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> float:
        """Spawn and wait until it serves; returns the seconds that took."""
        if self.running:
            raise RuntimeError("the gateway process is already running")
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path), *self.args,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=self._env, cwd=str(_PROJECT_ROOT),
            )
        self.starts += 1
        await self._wait_ready(started + READY_TIMEOUT_S)
        return time.monotonic() - started

    async def _wait_ready(self, until: float) -> None:
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < until:
                assert self._proc is not None
                if self._proc.returncode is not None:
                    self.exit_codes.append(self._proc.returncode)
                    raise GatewayProcessError(f"the gateway exited with {self._proc.returncode} while starting:\n"
                                              f"{self._log_tail()}")
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(READY_POLL_S)
        await self.kill()
        raise GatewayProcessError(f"the gateway did not answer /healthz within {READY_TIMEOUT_S:g} s:\n"
                                  f"{self._log_tail()}")

    async def kill(self) -> None:
        """SIGKILL and reap: the process gets no chance to flush, drain or close anything."""
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.send_signal(signal.SIGKILL)
        self.exit_codes.append(await self._proc.wait())

    async def stop(self) -> int | None:
        """SIGTERM (the gateway drains in-flight requests and closes its stores), bounded."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        self._proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self._proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            await self.kill()
            return self.exit_codes[-1]
        self.exit_codes.append(code)
        return code

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
