"""The scenario on the run's clock: the emulators driven through their admin API as ops would
drive a provider's sandbox (faults, outage, quota), the expired client certificate installed
through the certificate machinery, and each event's place in the verdict's windows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from emulators.faults import FaultPlan, FaultRule
from emulators.server import EmulatorServer
from gateway.certs.devca import DevCertLayout, issue_dev_pair
from gateway.certs.rotate import install_pair, provider_target
from gateway.config import GatewayConfig
from gateway.rehearse.scenario import Brownout, CertificateExpires, Outage, Recover, Scenario
from gateway.rehearse.verdict import FaultMark

EXPIRED_DAYS = -1 / 1440  # the staged client certificate ran out a minute ago


class Emulators:
    """The run's emulators by provider name, driven through their admin API as ops would."""

    def __init__(self, servers: Mapping[str, EmulatorServer], session: aiohttp.ClientSession,
                 base_rules: Mapping[str, tuple[FaultRule, ...]]) -> None:
        self.servers = servers
        self._session = session
        self._base = base_rules

    async def _call(self, method: str, name: str, path: str, doc: Any) -> None:
        async with self._session.request(method, f"{self.servers[name].admin_url}{path}",
                                         data=orjson.dumps(doc)) as response:
            if response.status != 200:
                raise RuntimeError(f"{name} emulator {method} {path}: {response.status} {await response.text()}")

    async def faults(self, name: str, extra: Sequence[FaultRule] = (), seed: int | None = None) -> None:
        plan = FaultPlan(rules=(*self._base.get(name, ()), *extra), seed=seed)
        await self._call("PUT", name, "/_emulator/faults", plan.model_dump(mode="json"))

    async def outage(self, name: str, on: bool) -> None:
        await self._call("POST", name, "/_emulator/outage", {"on": on})

    async def quota(self, name: str, rate: float, burst: int) -> None:
        await self._call("PUT", name, "/_emulator/quota", {"rate_limit_per_s": rate, "burst": burst})


def expire_client_certificate(layout: DevCertLayout, config: GatewayConfig, name: str) -> str:
    """An already-expired pair installed over the provider's live files (what `gateway certs
    issue-dev --provider NAME --days -1` does); its serial."""
    cert_pem, key_pem = issue_dev_pair(layout, usage="client", common_name=f"gateway-client-{name}",
                                       days_valid=EXPIRED_DAYS)
    return install_pair(provider_target(config, name), cert_pem, key_pem, now=datetime.now(UTC)).installed.serial


def roles_of(data: Mapping[str, Any]) -> dict[str, str]:
    route = list(data["routes"][0]["providers"])
    return {"primary": route[0], "backup": route[-1]}


async def run_timeline(scenario: Scenario, duration_s: float, roles: Mapping[str, str], emulators: Emulators,
                    expire: Callable[[str], str], started_at: float, happened: list[str],
                    seed: int) -> list[dict[str, Any]]:
    """Apply each event at its time; what happened, when."""
    done: list[dict[str, Any]] = []
    for event in sorted(scenario.events, key=lambda e: e.at):
        at_s = event.at * duration_s
        await asyncio.sleep(max(0.0, started_at + at_s - time.monotonic()))
        action = event.action
        name = roles[action.role]
        entry: dict[str, Any] = {"at_s": round(at_s, 2), "provider": name, "event": action.describe(name)}
        match action:
            case Brownout():
                await emulators.faults(name, action.rules(), seed)
            case Outage():
                await emulators.outage(name, True)
            case Recover():
                await emulators.outage(name, False)
                await emulators.faults(name)
            case CertificateExpires():
                entry["serial"] = await asyncio.to_thread(expire, name)
        entry["applied_s"] = round(time.monotonic() - started_at, 2)
        happened.append(f"{entry['applied_s']:.0f}s {entry['event']}")
        done.append(entry)
    return done


def fault_marks(scenario: Scenario, duration_s: float, roles: Mapping[str, str]) -> list[FaultMark]:
    marks = []
    for e in scenario.events:
        name = roles[e.action.role]
        key = f"cert:{name}" if isinstance(e.action, CertificateExpires) else name
        marks.append(FaultMark(e.at * duration_s, e.action.short(name), key,
                                 clears=isinstance(e.action, Recover)))
    return marks
