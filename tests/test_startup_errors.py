"""Start-up failures are one line naming the setting, the file and the problem (real `gateway
serve` processes), and a provider whose TLS files do not load is taken out of service, not the
gateway (in process, real emulators over mTLS): its traffic goes to the others until fixed files
are rotated in and the watcher loads them."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app_keys import CERT_WATCHER, POOL
from gateway.certs.devca import DevCertLayout
from gateway.config import parse_config
from emulators.server import EmulatorServer
from tests.conftest import AUTH, card_payment, gateway_config_data

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {name: SimpleNamespace(url="https://127.0.0.1:9") for name in ("stripe", "adyen", "checkout")}


@pytest.fixture
def certs(dev_certs: DevCertLayout, tmp_path: Path) -> DevCertLayout:
    """A private copy of the dev certificates, free to break."""
    shutil.copytree(dev_certs.root, tmp_path / "certs")
    return DevCertLayout(tmp_path / "certs")


def _config_file(tmp_path: Path, certs: DevCertLayout, **overrides: Any) -> Path:
    data = gateway_config_data(tmp_path, certs, OFFLINE)  # type: ignore[arg-type]
    data["server"] = {"port": 0, "shutdown_grace_s": 1}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _serve(config: Path, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


# --- fatal: one line, the setting and the file, no traceback -----------------------------------


def _server_tls(certs: DevCertLayout, tmp: Path, cert: bytes | None, key: Path | None = None) -> dict[str, Any]:
    path = tmp / "server.pem"
    if cert is not None:
        path.write_bytes(cert)
    return {"server": {"tls": {"cert": str(path), "key": str(key or certs.server_key())}}}


Broken = Callable[[DevCertLayout, Path], tuple[dict[str, Any], list[str]]]

FATAL: dict[str, Broken] = {
    "server_cert_empty": lambda c, t: (_server_tls(c, t, b""),
                                       ["server.tls.cert", str(t / "server.pem"), "not a PEM certificate"]),
    "server_cert_missing": lambda c, t: (_server_tls(c, t, None),
                                         ["server.tls.cert", str(t / "server.pem"), "cannot read"]),
    "server_key_of_another_cert": lambda c, t: (
        _server_tls(c, t, c.server_cert().read_bytes(), key=c.client_key("stripe")),
        ["server.tls.key", str(c.client_key("stripe")), "does not match the certificate"]),
    "sqlite_not_a_database": lambda c, t: (
        {"storage": {"sqlite_path": str(_file(t / "data" / "gateway.db", b"not sqlite" * 100))}},
        ["storage.sqlite_path", str(t / "data" / "gateway.db"), "not usable as an SQLite journal"]),
    "sqlite_path_is_a_directory": lambda c, t: (
        {"storage": {"sqlite_path": str(_dir(t / "db-dir"))}},
        ["storage.sqlite_path", str(t / "db-dir"), "Is a directory"]),
    "sqlite_under_a_file": lambda c, t: (
        {"storage": {"sqlite_path": str(_file(t / "plain", b"x") / "gateway.db")}},
        ["storage.sqlite_path", f"{t / 'plain'} is not a directory"]),
    "log_dir_under_a_file": lambda c, t: (
        {"log": {"dir": str(_file(t / "plain", b"x") / "logs")}},
        ["log.dir", f"{t / 'plain'} is not a directory"]),
    "log_file_is_a_directory": lambda c, t: (
        {"log": {"dir": str(_dir(t / "logs" / "transactions.jsonl").parent)}},
        ["log.dir", "transactions.jsonl", "Is a directory"]),
}


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _assert_one_line(proc: subprocess.Popen[str], expected: list[str]) -> None:
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0]


@pytest.mark.parametrize("case", list(FATAL))
def test_a_start_up_failure_is_one_line_naming_the_setting_and_the_file(
    case: str, tmp_path: Path, certs: DevCertLayout
) -> None:
    overrides, expected = FATAL[case](certs, tmp_path)
    _assert_one_line(_serve(_config_file(tmp_path, certs, **overrides)), expected)


def test_yaml_nested_thousands_deep_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "deep.yaml"
    config.write_text("auth: " + "[" * 5000 + "]" * 5000 + "\n")
    _assert_one_line(_serve(config), [str(config), "nested too deeply"])


# --- a provider's broken TLS files: that provider is out, the gateway serves ---------------------


def test_serve_starts_with_a_provider_whose_certificate_is_garbled(tmp_path: Path, certs: DevCertLayout) -> None:
    certs.client_cert("stripe").write_bytes(b"")
    proc = _serve(_config_file(tmp_path, certs))
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:  # the ops log, then aiohttp's banner
            if match := re.search(r"Running on http://127\.0\.0\.1:(\d+)", line):
                port = int(match[1])
                break
        assert port is not None, "the gateway did not start"

        async def ready() -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                return resp.status, await resp.json()

        status, doc = asyncio.run(ready())
        assert status == 200  # adyen and checkout are usable
        assert doc["providers"]["stripe"] == {**doc["providers"]["stripe"], "usable": False,
                                              "reason": "client_certificate_invalid"}
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=15)
        assert proc.returncode == 0, rest
        assert "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _garble(path: Path) -> None:
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")


BREAK_STRIPE: dict[str, tuple[Callable[[DevCertLayout], None], str]] = {
    "client_cert_empty": (lambda c: c.client_cert("stripe").write_bytes(b""), "client_certificate_invalid"),
    "client_cert_garbled": (lambda c: _garble(c.client_cert("stripe")), "client_certificate_invalid"),
    "client_cert_missing": (lambda c: c.client_cert("stripe").unlink(), "client_certificate_invalid"),
    "client_key_garbled": (lambda c: c.client_key("stripe").write_bytes(b"junk"), "client_certificate_invalid"),
    "client_key_of_another_cert": (
        lambda c: c.client_key("stripe").write_bytes(c.client_key("adyen").read_bytes()),
        "client_certificate_invalid"),
    "ca_missing": (lambda c: c.provider_ca("stripe").unlink(), "ca_bundle_invalid"),
    "ca_garbled": (lambda c: _garble(c.provider_ca("stripe")), "ca_bundle_invalid"),
}


@pytest.mark.parametrize("case", list(BREAK_STRIPE))
async def test_a_provider_whose_tls_files_do_not_load_is_skipped_until_they_are_fixed(
    case: str, tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer], start_gateway: Any
) -> None:
    originals = {p: p.read_bytes() for p in (certs.client_cert("stripe"), certs.client_key("stripe"),
                                              certs.provider_ca("stripe"))}
    breaks, reason = BREAK_STRIPE[case]
    breaks(certs)
    client = await start_gateway(parse_config(gateway_config_data(tmp_path, certs, emulators)))

    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["providers"]["stripe"]["reason"] == reason
    paid = await client.post("/v1/payments", json=card_payment(), headers={**AUTH, "Idempotency-Key": f"{case}-1"})
    doc = await paid.json()
    assert (paid.status, doc["status"], doc["provider"]) == (201, "approved", "adyen")
    stripe = [(a["outcome"], a["raw_code"]) for a in doc["attempts"] if a["provider"] == "stripe"]
    assert stripe == [("skipped", reason)]  # routed around before any call

    for path, data in originals.items():  # ops put good files back
        path.write_bytes(data)
    await client.app[CERT_WATCHER].reload_now()
    assert client.app[POOL]["stripe"].unusable_reason() is None
    paid = await client.post("/v1/payments", json=card_payment(), headers={**AUTH, "Idempotency-Key": f"{case}-2"})
    doc = await paid.json()
    assert (paid.status, doc["status"], doc["provider"]) == (201, "approved", "stripe")  # over mTLS again
