"""`gateway certs rotate` / `rollback` killed at every step (a real process, `os._exit(137)`
through `GATEWAY_ROTATE_CRASH_AT` right after the step, as `kill -9` would): the next command
or watcher pass completes the swap, the live pair matches its key, the original pair stays
recoverable with `rollback`, and a running gateway never loads a mismatched pair."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gateway.certs.devca import DevCertLayout, issue_dev_pair, write_pem_pair
from gateway.certs.swap import CRASH_AT_ENV, STEPS, Pair, PairLocation, locked
from gateway.certs.watcher import CertificateWatcher
from gateway.cli.certs import certs_app
from gateway.config import parse_config
from gateway.metrics import Metrics
from gateway.provider_pool import ProviderPool
from gateway.txlog import build_ops_logger
from emulators.server import EmulatorServer
from tests.conftest import gateway_config_data
from tests.test_certs_rotate import _config_data, _mtls_echo, _presented_serial, _serial

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = STEPS[STEPS.index("intent"):]  # after the intent is on disk the swap must complete


@pytest.fixture
def certs(dev_certs: DevCertLayout, tmp_path: Path) -> DevCertLayout:
    shutil.copytree(dev_certs.root, tmp_path / "certs")
    return DevCertLayout(tmp_path / "certs")


class Stage:
    """Live pair A, a good older pair P0 as `.prev`, and B to rotate to, all from the dev CA."""

    def __init__(self, tmp_path: Path, certs: DevCertLayout, config: Path) -> None:
        self.config = config
        self.location = PairLocation(certs.client_cert("stripe"), certs.client_key("stripe"))
        self.a = self.location.live()
        self.p0 = Pair(*issue_dev_pair(certs, usage="client", common_name="gateway-client-stripe", days_valid=60))
        self.b = Pair(*issue_dev_pair(certs, usage="client", common_name="gateway-client-stripe", days_valid=90))
        write_pem_pair(self.p0.cert_pem, self.p0.key_pem, self.location.prev_cert, self.location.prev_key)
        self.b_files = (tmp_path / "b.pem", tmp_path / "b.key")
        self.b_files[0].write_bytes(self.b.cert_pem)
        self.b_files[1].write_bytes(self.b.key_pem)

    def on_disk(self) -> tuple[Pair | None, Pair | None, bool]:
        return self.location.live(), self.location.previous(), self.location.intent.exists()

    def kill_at(self, step: str, *command: str) -> None:
        """Run `gateway certs COMMAND` in a real process that dies right after ``step``."""
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", "certs", *command, "--config", str(self.config)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), CRASH_AT_ENV: step},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 137, proc.stderr

    def rotate_b(self) -> list[str]:
        return ["rotate", "stripe", "--cert", str(self.b_files[0]), "--key", str(self.b_files[1])]

    def cli(self, *command: str) -> str:
        result = CliRunner().invoke(certs_app, [*command, "--config", str(self.config)])
        assert result.exit_code == 0, result.output
        return result.output


@pytest.fixture
def stage(tmp_path: Path, certs: DevCertLayout) -> Stage:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(_config_data(tmp_path, certs)))
    return Stage(tmp_path, certs, config)


def _assert_whole_or_pending(stage: Stage, step: str) -> None:
    """Right after the kill: untouched before the commit point, an intent to finish after it."""
    live, prev, pending = stage.on_disk()
    if step in COMMITTED:
        assert pending
    else:
        assert (live, prev, pending) == (stage.a, stage.p0, False)


@pytest.mark.parametrize("step", STEPS)
def test_a_rotate_killed_at_any_step_is_completed_and_rollback_restores_the_original(
    step: str, stage: Stage
) -> None:
    stage.kill_at(step, *stage.rotate_b())
    _assert_whole_or_pending(stage, step)

    output = stage.cli("rollback", "stripe")
    if step in COMMITTED:  # the rotation is completed first (B live, A kept), then rolled back
        assert "completed an interrupted rotate first" in output
        assert stage.on_disk() == (stage.a, stage.b, False)
    else:  # nothing had changed: the rollback goes to P0, keeping A
        assert stage.on_disk() == (stage.p0, stage.a, False)
    assert stage.on_disk()[0].matches

    stage.cli(*stage.rotate_b())  # and the next rotation works
    assert stage.on_disk()[0] == stage.b


def test_running_a_killed_rotate_again_finishes_it_once(stage: Stage) -> None:
    stage.kill_at("key", *stage.rotate_b())
    live, _prev, pending = stage.on_disk()
    assert pending and live is not None and not live.matches  # the instant between the two renames

    output = stage.cli(*stage.rotate_b())
    assert "completed an interrupted rotate first" in output and "already in service" in output
    assert stage.on_disk() == (stage.b, stage.a, False)  # the original is .prev, not the broken pair
    stage.cli("rollback", "stripe")
    assert stage.on_disk() == (stage.a, stage.b, False)


def test_running_a_killed_rollback_again_rolls_back_once(stage: Stage) -> None:
    stage.kill_at("key", "rollback", "stripe")
    output = stage.cli("rollback", "stripe")
    assert "completed an interrupted rollback first" in output and "already in service" in output
    assert stage.on_disk() == (stage.p0, stage.a, False)


def test_a_broken_live_pair_never_replaces_a_good_prev(stage: Stage, certs: DevCertLayout) -> None:
    stage.location.key.write_bytes(certs.client_key("adyen").read_bytes())  # mismatched, however it came about
    output = stage.cli(*stage.rotate_b())
    assert "did not match its key, so it was not kept" in output
    assert stage.on_disk() == (stage.b, stage.p0, False)


@pytest.mark.parametrize("step", COMMITTED)
async def test_the_watcher_completes_a_killed_rotation_and_never_loads_a_mismatched_pair(
    step: str, stage: Stage, tmp_path: Path, certs: DevCertLayout, emulators: dict[str, EmulatorServer]
) -> None:
    data = gateway_config_data(tmp_path, certs, emulators, order=("stripe",))
    config = parse_config(data)
    pool, stream = ProviderPool(config), io.StringIO()
    watcher = CertificateWatcher(config, pool.client_contexts(), Metrics(), build_ops_logger(stream),
                                 on_certificate_problem=pool.set_certificate_problem, probe_endpoints=False)
    await watcher.run_once()
    ctx = pool["stripe"].ssl_context
    assert stage.a is not None
    async with _mtls_echo(certs) as url:
        assert await _presented_serial(url, ctx) == _serial(stage.a.cert_pem)
        await asyncio.to_thread(stage.kill_at, step, *stage.rotate_b())

        # While the swap is held elsewhere (an operator's command finishing it), the watcher
        # leaves it alone and loads only a whole pair: at "key" the files on disk do not match.
        with locked(stage.location):
            await watcher.run_once()
        whole = stage.b if step == "cert" else stage.a
        assert await _presented_serial(url, ctx) == _serial(whole.cert_pem)
        assert pool["stripe"].certificate_problem is None

        await watcher.run_once()  # completes the swap, then loads the whole new pair
        assert stage.on_disk() == (stage.b, stage.a, False)
        assert await _presented_serial(url, ctx) == _serial(stage.b.cert_pem)
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert "certificate_swap_completed" in events and "certificate_reloaded" in events
