"""POST /v1/webhooks/{provider} on the real gateway, with the real emulators behind it: each
scheme refused and accepted over HTTP, journal first and applied once (dedupe, any order),
Adyen settled by notification only, asynchronous follow-ups pending until theirs, orphans kept."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestClient
from typer.testing import CliRunner

from emulators.faults import FaultRule
from gateway.app_keys import RECONCILER, STORE, WEBHOOKS
from gateway.cli import app as cli
from gateway.config import ConfigError, parse_config
from gateway.journal.webhook_events import WebhookState
from tests.conftest import (
    card_payment,
    charges,
    gateway_config_data,
    idem,
    journal,
    metrics_text,
    pay,
    pg_schema,
    set_faults,
    txlog,
)
from tests.webhook_shapes import (
    CHECKOUT_OLD_SECRET,
    STRIPE_OLD_SECRET,
    WEBHOOK_ENV,
    WEBHOOK_PROVIDERS,
    adyen_item,
    adyen_notification,
    checkout_event,
    checkout_headers,
    stripe_event,
    stripe_headers,
)

JSON = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def _webhook_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in WEBHOOK_ENV.items():
        monkeypatch.setenv(name, value)


async def gateway(make_config, start_gateway, order: tuple[str, ...], **changes: Any) -> TestClient:  # type: ignore[no-untyped-def]
    return await start_gateway(make_config(order=order, providers=WEBHOOK_PROVIDERS, **changes),
                               webhook_interval_s=3600)


async def deliver(client: TestClient, provider: str, body: bytes, headers: dict[str, str] | None = None,
                  *, process: bool = True) -> tuple[int, str]:
    resp = await client.post(f"/v1/webhooks/{provider}", data=body, headers=headers or JSON)
    text = await resp.text()
    if process:
        await client.app[WEBHOOKS].processor.run_once()  # the background pass may have done it already
    return resp.status, text


async def follow_up(client: TestClient, pid: str, op: str, body: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/v1/payments/{pid}/{op}", json=body or {}, headers=headers or idem())
    return resp.status, await resp.json()


@pytest.mark.parametrize("journal_backend", ["sqlite", "postgres"])
async def test_an_adyen_payment_left_pending_is_settled_by_its_notification_never_by_a_lookup(
        make_config, start_gateway, emulators, monkeypatch, journal_backend: str) -> None:  # type: ignore[no-untyped-def]
    storage: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        if journal_backend == "postgres":
            monkeypatch.setenv("GATEWAY_PG_DSN", await stack.enter_async_context(pg_schema()))
            storage = {"storage": {"backend": "postgres"}}
        client = await gateway(make_config, start_gateway, ("adyen", "stripe"), **storage)
        await _settled_by_notification(client, emulators)
        await client.close()


async def _settled_by_notification(client: TestClient, emulators: dict[str, Any]) -> None:
    adyen = emulators["adyen"]
    set_faults(adyen, FaultRule(kind="error", status=500, after_processing=True, operations=("authorize",)))
    headers = idem()
    status, doc = await pay(client, card_payment(), headers)
    assert (status, doc["status"], doc["provider"]) == (201, "pending", "adyen")
    assert doc["error_code"] is not None  # why it is pending: the 500
    pid = doc["id"]
    assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 0
    record = await journal(client, pid)
    assert record.status.value == "pending"
    assert [a.operation for a in record.attempts if a.operation == "status"] == []  # Adyen is never asked

    [charge] = charges(adyen, pid)
    body = adyen_notification(adyen_item("AUTHORISATION", charge.id, pid, 1299))
    assert await deliver(client, "adyen", body) == (200, "[accepted]")
    record = await journal(client, pid)
    assert (record.status.value, record.provider_reference, record.captured_amount) == ("approved", charge.id, 1299)
    replay = await client.post("/v1/payments", json=card_payment(), headers=headers)
    replayed = await replay.json()
    assert replay.headers.get("Idempotent-Replayed") == "true" and replayed["status"] == "approved"
    assert replayed["error_code"] is None, "an approved payment carries no stale error"
    assert [line["status"] for line in await txlog(client, pid) if line["event"] == "webhook"] == ["approved"]

    # The same delivery again (Adyen delivers at least once): journalled once, changes nothing.
    version = record.version
    assert await deliver(client, "adyen", body) == (200, "[accepted]")
    assert (await journal(client, pid)).version == version
    # A late refusal never undoes the approval.
    late = adyen_notification(adyen_item("AUTHORISATION", charge.id, pid, 1299, success=False, reason="Refused"))
    assert await deliver(client, "adyen", late) == (200, "[accepted]")
    assert (await journal(client, pid)).status.value == "approved"
    events = {e.event_id: e for e in await client.app[STORE].webhook_events()}
    assert [e.state for e in events.values()].count(WebhookState.APPLIED) == 1
    assert events[f"AUTHORISATION:{charge.id}:false"].state is WebhookState.UNCHANGED
    text = await metrics_text(client)
    assert 'gateway_webhooks_received_total{provider="adyen",result="duplicate"} 1.0' in text
    assert 'gateway_webhooks_processed_total{provider="adyen",state="applied"} 1.0' in text


async def test_adyen_follow_ups_answered_received_stay_pending_until_their_notification(
        make_config, start_gateway, emulators) -> None:
    client = await gateway(make_config, start_gateway, ("adyen", "stripe"))
    _, doc = await pay(client, card_payment(capture=False))
    pid, psp = doc["id"], doc["provider_reference"]
    capture_key = idem()
    status, body = await follow_up(client, pid, "capture", headers=capture_key)
    assert (status, body["status"], body["pending_follow_up"]) == (202, "capture_pending",
                                                                    {"operation": "capture", "amount": 1299})
    assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 0
    pending = (await journal(client, pid)).follow_up
    assert pending is not None and pending.answered
    item = adyen_item("CAPTURE", "CAPTUREPSP1", pending.provider_key, 1299, original=psp)

    assert await deliver(client, "adyen", adyen_notification(item)) == (200, "[accepted]")
    record = await journal(client, pid)
    assert (record.status.value, record.captured_amount, record.follow_up) == ("captured", 1299, None)
    replayed = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=capture_key)
    assert replayed.status == 200 and (await replayed.json())["status"] == "captured"
    # Delivered again, and a refusal of it delivered late: the first final answer stands.
    refusal = adyen_item("CAPTURE", "CAPTUREPSP1", pending.provider_key, 1299, original=psp, success=False)
    assert await deliver(client, "adyen", adyen_notification(item, refusal)) == (200, "[accepted]")
    assert (await journal(client, pid)).status.value == "captured"

    # A refund refused by notification: the payment is as it was, the key answers the refusal.
    refund_key = idem()
    status, body = await follow_up(client, pid, "refunds", {"amount": 500}, refund_key)
    assert (status, body["status"]) == (202, "refund_pending")
    pending = (await journal(client, pid)).follow_up
    assert pending is not None
    refused = adyen_item("REFUND", "REFUNDPSP1", pending.provider_key, 500, original=psp, success=False,
                         reason="Insufficient balance on payment")
    assert await deliver(client, "adyen", adyen_notification(refused)) == (200, "[accepted]")
    record = await journal(client, pid)
    assert (record.status.value, record.refunded_amount, record.follow_up) == ("captured", 0, None)
    answer = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 500}, headers=refund_key)
    assert answer.status == 422 and (await answer.json())["code"] == "refund_refused"

    # A refund that succeeds, then fails later (REFUND_FAILED): its amount comes off again.
    refund_key = idem()
    await follow_up(client, pid, "refunds", {"amount": 300}, refund_key)
    pending = (await journal(client, pid)).follow_up
    assert pending is not None
    done = adyen_item("REFUND", "REFUNDPSP2", pending.provider_key, 300, original=psp)
    assert await deliver(client, "adyen", adyen_notification(done)) == (200, "[accepted]")
    assert (await journal(client, pid)).refunded_amount == 300
    failed = adyen_item("REFUND_FAILED", "REFUNDPSP2F", pending.provider_key, 300, original=psp)
    assert await deliver(client, "adyen", adyen_notification(failed)) == (200, "[accepted]")
    record = await journal(client, pid)
    assert (record.status.value, record.refunded_amount) == ("captured", 0)
    answer = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 300}, headers=refund_key)
    assert answer.status == 422


async def test_a_checkout_follow_up_accepted_202_is_pending_until_its_webhook(make_config, start_gateway,
                                                                            emulators) -> None:
    client = await gateway(make_config, start_gateway, ("checkout", "stripe"))
    _, doc = await pay(client, card_payment(capture=False))
    pid = doc["id"]
    status, body = await follow_up(client, pid, "capture")
    assert (status, body["status"]) == (202, "capture_pending")
    pending = (await journal(client, pid)).follow_up
    assert pending is not None
    event = checkout_event("payment_captured", {"id": doc["provider_reference"], "action_id": "act_1",
                                                "reference": pending.provider_key, "amount": 1299,
                                                "currency": "EUR"})
    assert (await deliver(client, "checkout", event, checkout_headers(event, CHECKOUT_OLD_SECRET)))[0] == 200
    record = await journal(client, pid)
    assert (record.status.value, record.captured_amount) == ("captured", 1299)


async def test_an_event_for_a_payment_we_do_not_know_is_kept_as_an_orphan_and_listed(
        tmp_path, dev_certs, start_gateway, emulators) -> None:  # type: ignore[no-untyped-def]
    data = gateway_config_data(tmp_path, dev_certs, emulators, ("stripe",), providers=WEBHOOK_PROVIDERS)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(data))
    client = await start_gateway(parse_config(data), webhook_interval_s=3600)
    intent = {"id": "pi_unknown", "object": "payment_intent", "amount": 700, "currency": "eur",
              "capture_method": "automatic", "status": "succeeded",
              "metadata": {"gateway_payment_id": f"pay_unknown{uuid.uuid4().hex}"}}
    body = stripe_event("payment_intent.succeeded", intent)
    assert (await deliver(client, "stripe", body, stripe_headers(body)))[0] == 200
    [orphan] = await client.app[STORE].webhook_events(WebhookState.ORPHAN)
    assert orphan.event.provider_reference == "pi_unknown" and orphan.outcome == "no such payment"
    assert 'gateway_webhooks_processed_total{provider="stripe",state="orphan"} 1.0' in await metrics_text(client)
    listed = await asyncio.to_thread(CliRunner().invoke, cli, ["webhooks-in", "list", "--state", "orphan", "--json",
                                                               "--config", str(config_file)])
    assert listed.exit_code == 0, listed.output
    [line] = [orjson.loads(text) for text in listed.output.splitlines()]
    assert (line["provider"], line["state"], line["provider_reference"], line["amount"]) == (
        "stripe", "orphan", "pi_unknown", 700)


@pytest.mark.parametrize("case", ["stripe_tampered", "stripe_expired", "stripe_unsigned", "adyen_forged",
                                  "checkout_wrong_secret"])
async def test_a_delivery_that_does_not_verify_gets_401_and_writes_nothing(make_config, start_gateway, emulators,
                                                                            case: str) -> None:
    client = await gateway(make_config, start_gateway, ("stripe", "adyen", "checkout"))
    _, doc = await pay(client)
    intent = {"id": doc["provider_reference"], "object": "payment_intent", "amount": 1299, "currency": "eur",
              "capture_method": "automatic", "metadata": {"gateway_payment_id": doc["id"]}}
    body = stripe_event("payment_intent.payment_failed", intent)
    provider, headers = "stripe", stripe_headers(body)
    if case == "stripe_tampered":
        body = body.replace(b"1299", b"1290")
    elif case == "stripe_expired":
        headers = stripe_headers(body, timestamp=int(time.time()) - 400)
    elif case == "stripe_unsigned":
        headers = JSON
    elif case == "adyen_forged":
        provider, body = "adyen", adyen_notification(adyen_item("AUTHORISATION", "X1", doc["id"], 1299,
                                                                key="22" * 32))
        headers = JSON
    else:
        provider = "checkout"
        body = checkout_event("payment_declined", {"id": "pay_x", "reference": doc["id"]})
        headers = checkout_headers(body, "not-the-secret")
    status, text = await deliver(client, provider, body, headers)
    assert status == 401 and '"invalid_signature"' in text
    assert await client.app[STORE].webhook_events() == []
    assert f'gateway_webhooks_rejected_total{{provider="{provider}",reason="signature"}} 1.0' in \
        await metrics_text(client)
    assert (await journal(client, doc["id"])).status.value == "approved"


async def test_rotated_secrets_unreadable_bodies_and_unknown_providers(make_config, start_gateway,
                                                                       emulators) -> None:
    client = await gateway(make_config, start_gateway, ("stripe",))
    body = stripe_event("charge.dispute.created", {"id": "dp_1", "object": "dispute"})
    assert (await deliver(client, "stripe", body, stripe_headers(body, STRIPE_OLD_SECRET)))[0] == 200
    [other] = await client.app[STORE].webhook_events()
    assert other.state is WebhookState.UNCHANGED
    signed_garbage = b'{"id": "evt_1", "type": "payment_intent.succeeded"}'
    status, text = await deliver(client, "stripe", signed_garbage, stripe_headers(signed_garbage))
    assert status == 400 and '"malformed_event"' in text
    assert (await client.post("/v1/webhooks/adyen", data=b"{}", headers=JSON)).status == 404  # not configured here
    huge = await client.post("/v1/webhooks/stripe", data=b"x" * 70_000, headers=JSON)
    assert huge.status == 413
    assert len(await client.app[STORE].webhook_events()) == 1
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    assert "401" in paths["/v1/webhooks/{provider}"]["post"]["responses"]


@pytest.mark.parametrize("env, problem", [({"ADYEN_HMAC_KEY": "not-hex"}, "is not an Adyen HMAC key"),
                                          ({"ADYEN_HMAC_KEY": ""}, "is not set")])
def test_webhook_keys_are_checked_at_start_naming_the_field(tmp_path, dev_certs, monkeypatch,  # type: ignore[no-untyped-def]
                                                               env: dict[str, str], problem: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    servers = {name: type("Server", (), {"url": "https://127.0.0.1:1"})() for name in ("adyen",)}
    with pytest.raises(ConfigError) as caught:
        parse_config(gateway_config_data(tmp_path, dev_certs, servers, ("adyen",), providers=WEBHOOK_PROVIDERS))
    assert str(caught.value).startswith("providers.adyen: environment variable ADYEN_HMAC_KEY (named by "
                                        "webhook_key_envs)") and problem in str(caught.value)
    assert "not-hex" not in str(caught.value)
