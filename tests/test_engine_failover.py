"""The engine's failover rules (DESIGN: outcome taxonomy, rules 1-3), end to end.

Real HTTP all the way: the gateway app via aiohttp_client, several Stripe-kind emulators over
mTLS under different provider names ("primary", "backup", "third"), faults injected at run
time. Every scenario is checked from four sides: the HTTP answer, the journal, the emulators'
ledgers and the transaction log.

The fixtures (`stripes`, `engine_config`) and helpers come from conftest.py.
"""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest

from gateway.api.payments import new_payment_id
from gateway.app_keys import RECONCILER
from gateway.redaction import Redactor
from emulators.faults import FaultRule
from tests.conftest import (
    AUTH,
    PROVIDER_NAMES,
    card_payment,
    charges,
    entries,
    idem,
    journal,
    metrics_text,
    pay,
    set_faults,
    steps,
    txlog,
)

APPROVE = "4242424242424242"
HARD_DECLINE = "4000000000009995"  # insufficient_funds
DO_NOT_HONOR = "4000000000001018"
GENERIC_DECLINE = "4000000000000002"


# -- helpers --------------------------------------------------------------------------------------


def seed_hitting_first_only(share: float = 0.5) -> int:
    """A FaultPlan seed whose rule with `share` hits the first matching request, not the second.

    FaultInjector draws one `random()` per share<1 rule per matching request, from
    random.Random(seed); so the first request is hit and the second is spared."""
    for seed in range(10_000):
        rng = random.Random(seed)
        if rng.random() < share <= rng.random():
            return seed
    raise AssertionError("no seed found")


# -- 1. outage: fail over ---------------------------------------------------------------------------


async def test_primary_outage_fails_over_to_backup(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    await stripes["primary"].set_outage(True)

    status, doc = await pay(client)

    assert status == 201
    assert doc["status"] == "approved" and doc["provider"] == "backup"
    assert steps(doc) == [("primary", 1, "authorize", "unavailable"), ("primary", 2, "authorize", "unavailable"),
                          ("backup", 1, "authorize", "approved")]
    assert [a["raw_code"] for a in doc["attempts"][:2]] == ["connect_failed", "connect_failed"]
    assert [a["failover_reason"] for a in doc["attempts"]] == [None, None, "unavailable:connect_failed"]
    pid = doc["id"]
    assert entries(stripes["primary"], pid) == []
    [charge] = charges(stripes["backup"], pid)
    assert charge.idempotency_key == f"{pid}-backup-auth"
    assert doc["provider_reference"] == charge.id

    record = await journal(client, pid)
    assert record.status.value == "approved" and record.provider == "backup"
    assert [(a.provider, a.outcome) for a in record.attempts] == [
        ("primary", "unavailable"), ("primary", "unavailable"), ("backup", "approved")]
    assert [a.idempotency_key for a in record.attempts] == [f"{pid}-primary-auth"] * 2 + [f"{pid}-backup-auth"]

    [line] = await txlog(client, pid)
    assert line["event"] == "payment" and line["status"] == "approved" and line["provider"] == "backup"
    assert line["failovers"] == 1 and line["retries"] == 1
    assert [a["provider"] for a in line["attempts"]] == ["primary", "primary", "backup"]
    assert 'gateway_failovers_total{from_provider="primary",reason="unavailable"} 1.0' in await metrics_text(client)


# -- 2. hard decline: never fails over -----------------------------------------------------------


async def test_hard_decline_is_never_sent_to_backup(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())

    status, doc = await pay(client, card_payment(HARD_DECLINE))

    assert status == 201
    assert doc["status"] == "declined" and doc["decline_code"] == "insufficient_funds"
    assert doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "hard_decline")]
    pid = doc["id"]
    [entry] = entries(stripes["primary"], pid)
    assert not entry.approved and entry.decline_code == "insufficient_funds"
    assert entries(stripes["backup"], pid) == []
    assert stripes["backup"].emulator.ledger.snapshot()["entries"] == []
    assert (await journal(client, pid)).status.value == "declined"
    [line] = await txlog(client, pid)
    assert line["status"] == "declined" and line["failovers"] == 0 and line["retries"] == 0


# -- 3. soft decline: cascades at most once, only where the route allows -------------------------


async def test_soft_decline_cascades_once_when_route_allows(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())

    status, doc = await pay(client, card_payment(DO_NOT_HONOR))

    assert status == 201
    assert doc["status"] == "declined" and doc["decline_code"] == "do_not_honor"
    assert steps(doc) == [("primary", 1, "authorize", "soft_decline"), ("backup", 1, "authorize", "soft_decline")]
    assert doc["attempts"][1]["failover_reason"] == "soft_decline:do_not_honor"
    pid = doc["id"]
    assert len(entries(stripes["primary"], pid)) == 1 and len(entries(stripes["backup"], pid)) == 1
    assert charges(stripes["primary"], pid) == charges(stripes["backup"], pid) == []
    [line] = await txlog(client, pid)
    assert line["failovers"] == 1
    assert 'gateway_failovers_total{from_provider="primary",reason="soft_decline"} 1.0' in await metrics_text(client)


@pytest.mark.parametrize(("card", "cascade_on"), [
    (DO_NOT_HONOR, []),                    # the route allows no cascading at all
    (GENERIC_DECLINE, ["do_not_honor"]),  # a soft code the route does not list
])
async def test_soft_decline_stays_when_route_does_not_allow(engine_config, start_gateway, stripes,
                                                            card, cascade_on) -> None:
    client = await start_gateway(engine_config(route={"cascade_on": cascade_on}))

    status, doc = await pay(client, card_payment(card))

    assert status == 201 and doc["status"] == "declined" and doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "soft_decline")]
    assert entries(stripes["backup"], doc["id"]) == []


async def test_soft_decline_everywhere_tries_only_two_providers(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config(("primary", "backup", "third")))
    for name in PROVIDER_NAMES:
        set_faults(stripes[name], FaultRule(kind="decline", decline_code="do_not_honor"))

    status, doc = await pay(client, card_payment(APPROVE))

    assert status == 201 and doc["status"] == "declined" and doc["decline_code"] == "do_not_honor"
    assert [a["provider"] for a in doc["attempts"]] == ["primary", "backup"]
    pid = doc["id"]
    assert len(entries(stripes["primary"], pid)) == 1
    assert len(entries(stripes["backup"], pid)) == 1
    assert entries(stripes["third"], pid) == []
    [line] = await txlog(client, pid)
    assert line["failovers"] == 1


# -- 4. unknown settled by a status query ----------------------------------------------------------


async def test_timeout_after_processing_is_settled_by_status_query(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"timeout_ms": 300}}))
    set_faults(stripes["primary"], FaultRule(kind="timeout_after", hang_s=5, operations=("authorize",)))

    status, doc = await pay(client)

    assert status == 201
    assert doc["status"] == "approved" and doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "unknown"), ("primary", 1, "status", "approved")]
    assert doc["attempts"][0]["raw_code"] == "read_timeout"
    pid = doc["id"]
    [charge] = charges(stripes["primary"], pid)
    assert doc["provider_reference"] == charge.id
    assert entries(stripes["backup"], pid) == []
    assert sum(len(s.emulator.ledger.charges()) for s in stripes.values()) == 1
    record = await journal(client, pid)
    assert record.status.value == "approved" and record.provider_reference == charge.id
    [line] = await txlog(client, pid)
    assert line["status"] == "approved" and line["failovers"] == 0


# -- 5. unknown that cannot be settled: pending, then the reconciler ------------------------------


async def test_unknown_at_a_replaying_provider_is_settled_by_the_same_key(engine_config, start_gateway,
                                                                          stripes) -> None:
    """Stripe replays the stored answer for a key, so when neither the call nor the status query
    settles it, re-sending with the same key is safe and tells: one charge, never a failover."""
    client = await start_gateway(engine_config(providers={"primary": {"timeout_ms": 300}}))
    set_faults(stripes["primary"],
               FaultRule(kind="timeout_after", hang_s=5, operations=("authorize",), share=0.5),
               FaultRule(kind="latency", latency_ms=1500, operations=("status",)), seed=seed_hitting_first_only())

    status, doc = await pay(client)

    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "unknown"), ("primary", 1, "status", "unknown"),
                          ("primary", 2, "authorize", "approved")]
    assert len(charges(stripes["primary"], doc["id"])) == 1
    assert entries(stripes["backup"], doc["id"]) == []


async def test_a_refused_retry_after_an_unknown_never_fails_over(engine_config, start_gateway, stripes) -> None:
    """The first call may have charged (unknown, the status query cannot tell); the retry with
    the same key is refused by the breaker before sending. That refusal proves nothing about the
    first call, so the payment is pending at the primary, never sent to the backup."""
    client = await start_gateway(engine_config(providers={"primary": {
        "timeout_ms": 300, "breaker": {"fail_max": 1, "reset_timeout_s": 30}}}))
    set_faults(stripes["primary"],
               FaultRule(kind="timeout_after", hang_s=5, operations=("authorize",)),
               FaultRule(kind="latency", latency_ms=1500, operations=("status",)))

    status, doc = await pay(client)

    assert status == 201 and doc["status"] == "pending" and doc["provider"] == "primary"
    assert steps(doc)[-1] == ("primary", 2, "authorize", "unavailable")
    assert doc["attempts"][-1]["raw_code"] == "breaker_open"
    assert entries(stripes["backup"], doc["id"]) == []


async def test_unsettled_unknown_is_pending_then_reconciled(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"timeout_ms": 300,
                                                                      "retry": {"max_attempts": 1}}}))
    set_faults(stripes["primary"],
               FaultRule(kind="timeout_after", hang_s=5, operations=("authorize",)),
               FaultRule(kind="latency", latency_ms=1500, operations=("status",)))
    headers = idem()
    body = card_payment()

    status, doc = await pay(client, body, headers)

    assert status == 201
    assert doc["status"] == "pending" and doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "unknown"), ("primary", 1, "status", "unknown")]
    pid = doc["id"]
    assert len(charges(stripes["primary"], pid)) == 1  # the charge went through; only its answer was lost
    assert entries(stripes["backup"], pid) == []
    assert (await journal(client, pid)).status.value == "pending"
    [line] = await txlog(client, pid)
    assert line["status"] == "pending"

    stripes["primary"].emulator.faults.clear()
    assert await client.app[RECONCILER].run_once(min_age_s=0, ignore_backoff=True) == 1

    got = await (await client.get(f"/v1/payments/{pid}", headers=AUTH)).json()
    [charge] = charges(stripes["primary"], pid)
    assert got["status"] == "approved" and got["provider"] == "primary"
    assert got["provider_reference"] == charge.id
    assert entries(stripes["backup"], pid) == []
    assert [line["event"] for line in await txlog(client, pid)] == ["payment", "reconciliation"]

    replay = await client.post("/v1/payments", json=body, headers=headers)
    replayed = await replay.json()
    assert replay.status == 201 and replayed["id"] == pid
    assert replayed["status"] == "approved", (
        "the caller's retry of its original key must now get the settled answer, not the stale 'pending'")
    assert len(charges(stripes["primary"], pid)) == 1


# -- 6. 503 before processing: retried with the same key -------------------------------------------
# No provider documents a 503 as "not processed", so it is unknown: a status query cannot prove
# absence at Stripe (its search lags), but Stripe replays answers, so the same key may be re-sent.


async def test_503_before_processing_is_retried_with_same_key(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    set_faults(stripes["primary"], FaultRule(kind="error", status=503, share=0.5, operations=("authorize",)),
               seed=seed_hitting_first_only())

    status, doc = await pay(client)

    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "unknown"), ("primary", 1, "status", "not_found"),
                          ("primary", 2, "authorize", "approved")]
    assert doc["attempts"][0]["http_status"] == 503
    pid = doc["id"]
    record = await journal(client, pid)
    assert {a.idempotency_key for a in record.attempts if a.operation == "authorize"} == {f"{pid}-primary-auth"}
    [charge] = charges(stripes["primary"], pid)
    assert charge.idempotency_key == f"{pid}-primary-auth"
    assert entries(stripes["backup"], pid) == []
    [line] = await txlog(client, pid)
    assert line["retries"] == 1 and line["failovers"] == 0


async def test_permanent_503_exhausts_max_attempts_then_stays_pending(engine_config, start_gateway, stripes) -> None:
    """Every try answers 503 and nothing proves the primary did not charge: never a failover."""
    client = await start_gateway(engine_config(providers={"primary": {"retry": {"max_attempts": 3}}}))
    set_faults(stripes["primary"], FaultRule(kind="error", status=503, operations=("authorize",)))

    status, doc = await pay(client)

    assert status == 201 and doc["status"] == "pending" and doc["provider"] == "primary"
    assert [s for s in steps(doc) if s[2] == "authorize"] == [
        ("primary", 1, "authorize", "unknown"), ("primary", 2, "authorize", "unknown"),
        ("primary", 3, "authorize", "unknown")]
    pid = doc["id"]
    record = await journal(client, pid)
    assert {a.idempotency_key for a in record.attempts if a.operation == "authorize"} == {f"{pid}-primary-auth"}
    assert entries(stripes["primary"], pid) == []  # 503 before processing: nothing was created
    assert entries(stripes["backup"], pid) == []


async def test_all_providers_unavailable_fails_cleanly(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    for name in ("primary", "backup"):
        await stripes[name].set_outage(True)  # connection refused: provably not processed

    status, doc = await pay(client)

    assert status == 502
    assert doc["status"] == "failed" and doc["error_code"].startswith("all_providers_unavailable")
    assert (await journal(client, doc["id"])).status.value == "failed"
    assert all(s.emulator.ledger.snapshot()["entries"] == [] for s in stripes.values())


# -- 7. 429 with Retry-After ------------------------------------------------------------------------


async def test_429_retry_after_is_honoured(engine_config, start_gateway, stripes) -> None:
    retry_after_s = 0.1  # jittered backoff is capped at 5 ms here, so the gap can only come from the header
    client = await start_gateway(engine_config())
    set_faults(stripes["primary"],
               FaultRule(kind="rate_limit", retry_after_s=retry_after_s, share=0.5, operations=("authorize",)),
               seed=seed_hitting_first_only())

    status, doc = await pay(client)

    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "primary"
    assert steps(doc) == [("primary", 1, "authorize", "unavailable"), ("primary", 2, "authorize", "approved")]
    assert doc["attempts"][0]["http_status"] == 429
    record = await journal(client, doc["id"])
    first, second = record.attempts
    assert first.idempotency_key == second.idempotency_key
    assert second.started_at - first.started_at - first.latency_ms / 1000 >= retry_after_s - 0.005
    assert len(charges(stripes["primary"], doc["id"])) == 1
    assert entries(stripes["backup"], doc["id"]) == []


# -- 10. follow-ups stay with the provider that authorised ------------------------------------------


async def test_capture_after_failover_goes_to_backup_and_replays(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    await stripes["primary"].set_outage(True)
    status, doc = await pay(client, card_payment(capture=False))
    assert status == 201 and doc["status"] == "approved" and doc["provider"] == "backup"
    assert doc["captured_amount"] == 0
    pid = doc["id"]
    await stripes["primary"].set_outage(False)  # the primary is healthy again: the capture must still not go there

    capture_headers = idem()
    resp = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=capture_headers)
    body = await resp.read()
    captured = orjson.loads(body)

    assert resp.status == 200
    assert captured["status"] == "captured" and captured["captured_amount"] == 1299
    assert captured["provider"] == "backup"
    assert captured["attempts"][-1]["provider"] == "backup"
    assert captured["attempts"][-1]["operation"] == "capture"
    [entry] = entries(stripes["backup"], pid)
    assert entry.status == "succeeded" and entry.captured == 1299
    assert stripes["primary"].emulator.ledger.snapshot()["entries"] == []
    record = await journal(client, pid)
    assert record.status.value == "captured"
    assert {a.provider for a in record.attempts if a.operation == "capture"} == {"backup"}

    replay = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=capture_headers)
    assert replay.status == 200
    assert await replay.read() == body
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert len((await journal(client, pid)).attempts) == len(record.attempts)
    text = await metrics_text(client)
    assert 'gateway_attempts_total{operation="capture",outcome="approved",provider="backup"} 1.0' in text
    capture_lines = [line for line in text.splitlines() if 'operation="capture"' in line]
    assert capture_lines and not any('provider="primary"' in line for line in capture_lines)
    assert [line["event"] for line in await txlog(client, pid)] == ["payment", "capture"]


async def test_capture_never_fails_over_when_authorising_provider_is_down(engine_config, start_gateway,
                                                                          stripes) -> None:
    client = await start_gateway(engine_config())
    await stripes["primary"].set_outage(True)
    _, doc = await pay(client, card_payment(capture=False))
    assert doc["provider"] == "backup"
    pid = doc["id"]
    await stripes["primary"].set_outage(False)
    await stripes["backup"].set_outage(True)

    headers = idem()
    resp = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=headers)

    assert resp.status == 503
    assert (await resp.json())["code"] == "provider_unavailable"
    assert stripes["primary"].emulator.ledger.snapshot()["entries"] == []
    record = await journal(client, pid)
    assert record.status.value == "approved"
    assert {a.provider for a in record.attempts if a.operation == "capture"} == {"backup"}

    # the key was freed: the caller's retry reaches the backup once it is back
    await stripes["backup"].set_outage(False)
    resp = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=headers)
    assert resp.status == 200 and (await resp.json())["status"] == "captured"
    assert entries(stripes["backup"], pid)[0].captured == 1299
    assert stripes["primary"].emulator.ledger.snapshot()["entries"] == []


async def test_void_goes_to_authorising_provider(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    _, doc = await pay(client, card_payment(capture=False))
    assert doc["status"] == "approved" and doc["provider"] == "primary"

    resp = await client.post(f"/v1/payments/{doc['id']}/void", json={}, headers=idem())

    assert resp.status == 200
    voided = await resp.json()
    assert voided["status"] == "voided"
    [entry] = entries(stripes["primary"], doc["id"])
    assert entry.voided and entry.status == "canceled"
    assert entries(stripes["backup"], doc["id"]) == []
    assert (await journal(client, doc["id"])).status.value == "voided"


async def test_refund_goes_to_authorising_provider(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    await stripes["primary"].set_outage(True)
    _, doc = await pay(client)
    assert doc["status"] == "approved" and doc["provider"] == "backup" and doc["captured_amount"] == 1299
    await stripes["primary"].set_outage(False)

    resp = await client.post(f"/v1/payments/{doc['id']}/refunds", json={"amount": 500}, headers=idem())

    assert resp.status == 200
    refunded = await resp.json()
    assert refunded["status"] == "refunded" and refunded["refunded_amount"] == 500
    [entry] = entries(stripes["backup"], doc["id"])
    assert entry.refunded == 500
    assert stripes["primary"].emulator.ledger.snapshot()["entries"] == []
    record = await journal(client, doc["id"])
    assert record.refunded_amount == 500
    assert {a.provider for a in record.attempts if a.operation == "refund"} == {"backup"}


async def test_capture_of_declined_payment_is_409(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    _, doc = await pay(client, card_payment(HARD_DECLINE, capture=False))
    assert doc["status"] == "declined"
    before = [(e.status, e.captured) for e in entries(stripes["primary"], doc["id"])]

    resp = await client.post(f"/v1/payments/{doc['id']}/capture", json={}, headers=idem())

    assert resp.status == 409
    assert (await resp.json())["code"] == "invalid_payment_state"
    assert [(e.status, e.captured) for e in entries(stripes["primary"], doc["id"])] == before
    assert entries(stripes["backup"], doc["id"]) == []
    record = await journal(client, doc["id"])
    assert record.status.value == "declined"
    assert [a.operation for a in record.attempts] == ["authorize"]


@pytest.mark.parametrize("path", ["capture", "void", "refunds"])
async def test_follow_up_without_idempotency_key_is_400(engine_config, start_gateway, stripes, path) -> None:
    client = await start_gateway(engine_config())
    _, doc = await pay(client, card_payment(capture=False))

    resp = await client.post(f"/v1/payments/{doc['id']}/{path}", json={}, headers=AUTH)

    assert resp.status == 400
    err = await resp.json()
    assert err["code"] == "idempotency_key_missing" and err["field"] == "Idempotency-Key"
    [entry] = entries(stripes["primary"], doc["id"])
    assert entry.status == "requires_capture" and entry.captured == 0 and not entry.voided
    assert (await journal(client, doc["id"])).status.value == "approved"


# -- 11. the caller's deadline ----------------------------------------------------------------------


async def test_request_timeout_bounds_the_answer(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"timeout_ms": 3000}}))
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=1000, operations=("authorize",)))

    started = time.monotonic()
    resp = await client.post("/v1/payments", json=card_payment(), headers={**idem(), "Request-Timeout": "200"})
    elapsed = time.monotonic() - started
    doc = await resp.json()

    assert elapsed < 1.0, f"answered after {elapsed:.3f}s despite Request-Timeout: 200"
    assert doc["status"] in ("pending", "failed")
    pid = doc["id"]
    assert entries(stripes["backup"], pid) == []  # the primary may still charge: never sent elsewhere
    assert len(charges(stripes["primary"], pid)) <= 1
    assert len(entries(stripes["primary"], pid)) == 1
    record = await journal(client, pid)
    assert record.status.value == doc["status"]
    [line] = await txlog(client, pid)
    assert line["status"] == doc["status"]


# -- 12. idempotency races at the front door --------------------------------------------------------


async def test_concurrent_identical_requests_charge_once(engine_config, start_gateway, stripes) -> None:
    client = await start_gateway(engine_config())
    # slow enough that the copies arrive while the first one is in flight
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=100, operations=("authorize",)))
    headers = idem()
    body = card_payment()

    async def one() -> tuple[int, bytes]:
        resp = await client.post("/v1/payments", json=body, headers=headers)
        return resp.status, await resp.read()

    answers = await asyncio.gather(*(one() for _ in range(20)))

    statuses = [status for status, _ in answers]
    assert set(statuses) <= {201, 409}, statuses
    created = [raw for status, raw in answers if status == 201]
    assert created and all(raw == created[0] for raw in created)
    conflicts = [orjson.loads(raw) for status, raw in answers if status == 409]
    assert all(c["code"] == "idempotency_key_in_use" for c in conflicts)
    assert conflicts, "20 simultaneous copies should meet the first one in flight"
    doc = orjson.loads(created[0])
    assert doc["status"] == "approved"
    assert stripes["primary"].emulator.ledger.snapshot()["charges"] == 1
    assert len(charges(stripes["primary"], doc["id"])) == 1
    assert stripes["backup"].emulator.ledger.snapshot()["entries"] == []
    assert len(await txlog(client)) == 1 and len(await txlog(client, doc["id"])) == 1


async def test_payment_ids_survive_log_redaction(engine_config, start_gateway, stripes) -> None:
    """The redactor masks any Luhn-valid 12-19 digit run as a card number. A generated payment id
    holding such a run by chance (hex ids did, a few in a thousand) would be masked in its own
    transaction line, which then names no payment."""
    redact = Redactor()
    masked = [pid for pid in (new_payment_id() for _ in range(20_000))
              if redact(None, "info", {"payment_id": pid})["payment_id"] != pid]
    assert masked == [], f"{len(masked)} of 20000 generated ids are masked by the redactor, e.g. {masked[:3]}"

    client = await start_gateway(engine_config())
    ids = [(await pay(client))[1]["id"] for _ in range(5)]
    assert sorted(line["payment_id"] for line in await txlog(client)) == sorted(ids)
async def test_capture_retry_while_first_capture_still_in_flight_is_not_final(engine_config, start_gateway,
                                                                              stripes) -> None:
    """A capture whose tries timed out while Stripe was still processing it (Stripe answers a
    same-key retry meanwhile with 409 `idempotency_key_in_use`) is not refused: it is accepted
    as `capture_pending` and its key replays that, never a final "capture refused", while the
    provider goes on to capture it."""
    client = await start_gateway(engine_config(providers={"primary": {"timeout_ms": 250}}))
    _, doc = await pay(client, card_payment(capture=False))
    pid = doc["id"]
    set_faults(stripes["primary"], FaultRule(kind="latency", latency_ms=800, operations=("capture",)))
    headers = idem()

    first = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=headers)
    assert first.status == 202 and (await first.json())["status"] == "capture_pending"
    second = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=headers)
    second_doc = await second.json()
    [entry] = entries(stripes["primary"], pid)
    # The emulator exposes no event for "request finished"; poll its ledger, bounded.
    for _ in range(60):
        if entry.status == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert entry.status == "succeeded" and entry.captured == 1299  # the first capture did go through
    third = await client.post(f"/v1/payments/{pid}/capture", json={}, headers=headers)
    third_doc = await third.json()
    record = await journal(client, pid)

    assert second.status == 202 and second_doc["status"] == "capture_pending"
    assert third.status == 202 and third_doc["status"] == "capture_pending"
    assert record.status.value == "capture_pending"
    capture_keys = {a.idempotency_key for a in record.attempts if a.operation == "capture"}
    assert len(capture_keys) == 1 and {a.provider for a in record.attempts if a.operation == "capture"} == {"primary"}


# -- rule 5: each transaction's line names its payment ------------------------------------------


