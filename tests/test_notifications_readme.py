"""README's receiver example is real: the code block under `<!-- receiver-example -->` runs, as
written, against a delivery from the running gateway; it verifies the signature (and refuses a
tampered body, an old timestamp, a wrong secret), and deduplicates a replayed event. The
delivered event matches the OpenAPI `webhooks` section. `gateway webhooks list|replay` are the
ops commands that show and resend it."""

from __future__ import annotations

import asyncio
import re
import time
import types
from pathlib import Path

import jsonschema
import orjson
import pytest
from openapi_spec_validator import validate
from typer.testing import CliRunner

from gateway.app_keys import STORE
from gateway.cli import app as cli
from gateway.notifications.records import DeliveryState
from tests.notification_receiver import SECRET, SECRET_ENV, eventually, notifications_config, settle_later

README = Path(__file__).resolve().parents[1] / "README.md"


def receiver_example() -> types.ModuleType:
    text = README.read_text()
    match = re.search(r"<!-- receiver-example -->\n```python\n(.*?)\n```", text, re.S)
    assert match, "README has no receiver example"
    module = types.ModuleType("readme_receiver")
    exec(compile(match.group(1), str(README), "exec"), module.__dict__)  # noqa: S102 - our own README
    return module


@pytest.fixture(autouse=True)
def _signing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


async def test_the_readme_receiver_verifies_and_deduplicates_a_real_delivery(
        engine_config, start_gateway, aiohttp_server, tmp_path: Path) -> None:
    example = receiver_example()
    server = await aiohttp_server(example.make_app([SECRET]), host="127.0.0.1")
    config = engine_config(notifications=notifications_config(str(server.make_url("/gateway-notifications"))))
    client = await start_gateway(config)
    payment_id = await settle_later(client)

    async def delivered() -> bool:
        rows = await client.app[STORE].list_notifications()
        return [r.state for r in rows] == [DeliveryState.DELIVERED]

    await eventually(delivered)
    seen = server.app[example.SEEN]
    [event] = seen.values()
    assert event["payment_id"] == payment_id and event["type"] == "payment.approved"
    [row] = await client.app[STORE].list_notifications()
    assert row.last_status == 204 and row.attempts == 1

    # What the example refuses: a changed byte, an old timestamp, a secret it does not know.
    body = row.body
    t = int(time.time())
    from gateway.notifications.signing import signature_header

    assert example.verify(signature_header(body, [SECRET], t), body, [SECRET])
    assert not example.verify(signature_header(body, [SECRET], t), body.replace(b"approved", b"declined"), [SECRET])
    assert not example.verify(signature_header(body, [SECRET], t - 600), body, [SECRET])
    assert not example.verify(signature_header(body, ["another-secret-of-24-chars!"], t), body, [SECRET])
    assert example.verify(signature_header(body, ["new-secret-of-24-characters", SECRET], t), body, [SECRET])

    # The delivered event is what the OpenAPI document says the gateway sends.
    document = await (await client.get("/openapi.json")).json()
    validate(document)
    schema = {**document["webhooks"]["payment.approved"]["post"]["requestBody"]["content"]["application/json"][
        "schema"], "components": document["components"]}
    jsonschema.validate(orjson.loads(body), schema)
    assert set(document["webhooks"]) == {"payment.approved", "payment.declined", "payment.failed",
                                         "capture.succeeded", "capture.failed", "refund.succeeded", "refund.failed",
                                         "void.succeeded", "void.failed"}

    # Ops: list it, replay it; the receiver gets it again and keeps one.
    config_path = tmp_path / "gateway.yaml"
    config_path.write_bytes(orjson.dumps(config.model_dump(mode="json", exclude_defaults=True)))
    runner = CliRunner()
    listed = await asyncio.to_thread(runner.invoke, cli, ["webhooks", "list", "--config", str(config_path), "--json"])
    assert listed.exit_code == 0, listed.output
    [shown] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert (shown["event_id"], shown["state"], shown["attempts"]) == (row.event_id, "delivered", 1)
    plain = await asyncio.to_thread(runner.invoke, cli, ["webhooks", "list", "--config", str(config_path),
                                                         "--since", "2000-01-01T00:00Z"])
    assert plain.exit_code == 0 and row.event_id in plain.stdout and "delivered" in plain.stdout
    later = await asyncio.to_thread(runner.invoke, cli, ["webhooks", "list", "--config", str(config_path),
                                                         "--since", "2999-01-01T00:00Z"])
    assert later.exit_code == 1
    bad = await asyncio.to_thread(runner.invoke, cli, ["webhooks", "list", "--config", str(config_path),
                                                       "--since", "yesterday-ish"])
    assert bad.exit_code == 2 and "--since" in bad.output
    replayed = await asyncio.to_thread(runner.invoke, cli, ["webhooks", "replay", "--config", str(config_path),
                                                            "--event", row.event_id])
    assert replayed.exit_code == 0 and "replayed 1" in replayed.stdout

    async def delivered_twice() -> bool:
        [again] = await client.app[STORE].list_notifications()
        return again.state is DeliveryState.DELIVERED and again.attempts == 2

    await eventually(delivered_twice)
    assert list(seen) == [row.event_id]  # deduplicated by id
    none = await asyncio.to_thread(runner.invoke, cli, ["webhooks", "replay", "--config", str(config_path),
                                                        "--event", "evt_unknown"])
    assert none.exit_code == 1
    both = await asyncio.to_thread(runner.invoke, cli, ["webhooks", "replay", "--config", str(config_path)])
    assert both.exit_code == 2 and "exactly one of --event ID or --since T" in both.output
