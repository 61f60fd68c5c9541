"""The notification outbox in both stores: rows commit with the state change or not at all,
senders lease disjoint rows, an attempt is recorded once with its log line, ops can list and
replay. And the pure decision: which transition yields which event, and that nothing else does.
"""

from __future__ import annotations

import dataclasses
import time

import orjson
import pytest

from domain.outcome import PaymentStatus
from gateway.journal.errors import StaleWrite
from gateway.journal.records import OutboxLine, PendingFollowUp
from gateway.notifications.events import EventType, Settling, late_event
from gateway.notifications.outbox import NotificationOutbox, event_id
from gateway.journal.notification_records import AttemptRecord, DeliveryOutcome, DeliveryState
from tests.conftest import DB_ERRORS, Backend, payment


def settled(status: PaymentStatus = PaymentStatus.PENDING, to: PaymentStatus = PaymentStatus.APPROVED):
    """A payment read at `status` (version 1) and moved to `to`; the rows its settlement yields."""
    record = payment(status=status)
    return record, dataclasses.replace(record, status=to)


async def journalled(backend: Backend, status: PaymentStatus = PaymentStatus.PENDING):
    record = payment(status=status)
    await backend.store.save_payment(record)
    return record


def follow_up(op: str, prior: PaymentStatus) -> PendingFollowUp:
    return PendingFollowUp(operation=op, amount=500, provider_key=f"k-{op}", scope="checkout", front_key="f",
                           prior_status=prior.value, started_at=time.time(), deadline_s=5.0, answered=True)


# -- the decision ----------------------------------------------------------------------------------


def _after(before_record, **changes):
    return dataclasses.replace(before_record, **changes)


@pytest.mark.parametrize(("status", "to", "expected"), [
    (PaymentStatus.PENDING, PaymentStatus.APPROVED, EventType.PAYMENT_APPROVED),
    (PaymentStatus.PENDING, PaymentStatus.DECLINED, EventType.PAYMENT_DECLINED),
    (PaymentStatus.PENDING, PaymentStatus.FAILED, EventType.PAYMENT_FAILED),
    (PaymentStatus.ATTEMPTING, PaymentStatus.APPROVED, EventType.PAYMENT_APPROVED),  # a crashed request
    (PaymentStatus.RECEIVED, PaymentStatus.FAILED, EventType.PAYMENT_FAILED),
    (PaymentStatus.PENDING, PaymentStatus.PENDING, None),  # not settled yet
    (PaymentStatus.APPROVED, PaymentStatus.APPROVED, None),  # a second settlement, a replayed webhook
    (PaymentStatus.DECLINED, PaymentStatus.APPROVED, None),  # a late contradiction changes no event
    (PaymentStatus.CAPTURED, PaymentStatus.CAPTURED, None),
])
def test_payment_transitions(status: PaymentStatus, to: PaymentStatus, expected: EventType | None) -> None:
    before = payment(status=status)
    assert late_event(Settling.of(before), _after(before, status=to)) is expected


def test_follow_up_transitions_read_what_moved() -> None:
    approved = payment(status=PaymentStatus.CAPTURE_PENDING, follow_up=follow_up("capture", PaymentStatus.APPROVED))
    assert late_event(Settling.of(approved), _after(approved, follow_up=None, status=PaymentStatus.CAPTURED,
                                                    captured_amount=500)) is EventType.CAPTURE_SUCCEEDED
    assert late_event(Settling.of(approved), _after(approved, follow_up=None,
                                                    status=PaymentStatus.APPROVED)) is EventType.CAPTURE_FAILED
    assert late_event(Settling.of(approved), approved) is None  # still pending

    # A second partial refund that was refused returns to `refunded`: failed, not succeeded.
    refunding = payment(status=PaymentStatus.REFUND_PENDING, captured_amount=1299, refunded_amount=300,
                        follow_up=follow_up("refund", PaymentStatus.REFUNDED))
    assert late_event(Settling.of(refunding), _after(refunding, follow_up=None, status=PaymentStatus.REFUNDED)) \
        is EventType.REFUND_FAILED
    assert late_event(Settling.of(refunding), _after(refunding, follow_up=None, status=PaymentStatus.REFUNDED,
                                                     refunded_amount=800)) is EventType.REFUND_SUCCEEDED

    voiding = payment(status=PaymentStatus.VOID_PENDING, follow_up=follow_up("void", PaymentStatus.APPROVED))
    assert late_event(Settling.of(voiding), _after(voiding, follow_up=None, status=PaymentStatus.VOIDED)) \
        is EventType.VOID_SUCCEEDED
    assert late_event(Settling.of(voiding), _after(voiding, follow_up=None, status=PaymentStatus.APPROVED)) \
        is EventType.VOID_FAILED


def test_a_follow_up_reported_failed_after_its_success_is_told_as_failed() -> None:
    """Adyen's REFUND then REFUND_FAILED (or CAPTURE_FAILED), a Stripe refund.failed after a
    refund answered 200: the amount taken back is a late outcome the checkout must hear, after
    the success it heard first."""
    refunded = payment(status=PaymentStatus.REFUNDED, captured_amount=2500, refunded_amount=1000)
    assert late_event(Settling.of(refunded), _after(refunded, status=PaymentStatus.CAPTURED, refunded_amount=0)) \
        is EventType.REFUND_FAILED
    captured = payment(status=PaymentStatus.CAPTURED, captured_amount=2500)
    assert late_event(Settling.of(captured), _after(captured, status=PaymentStatus.APPROVED, captured_amount=0)) \
        is EventType.CAPTURE_FAILED
    assert late_event(Settling.of(captured), captured) is None  # nothing moved


def test_event_body_is_the_payment_as_read_and_the_id_is_letters_only() -> None:
    before, after = settled()
    after.merchant_reference = "order 4242 4242 4242 4242"  # card data that reached a record another way
    [row] = NotificationOutbox(enabled=True).rows(Settling.of(before), after)
    body = orjson.loads(row.body)
    assert body["id"] == row.event_id == event_id(after.id, after.version, EventType.PAYMENT_APPROVED)
    assert row.event_id.removeprefix("evt_").isalpha()
    assert body["type"] == "payment.approved" and body["payment_id"] == after.id
    assert body["payment"]["status"] == "approved" and body["payment"]["id"] == after.id
    assert "4242 4242 4242 4242" not in row.body.decode()  # redacted as the journal keeps it
    assert NotificationOutbox(enabled=False).rows(Settling.of(before), after) == ()


# -- the stores ------------------------------------------------------------------------------------


async def test_notifications_commit_with_the_row_or_not_at_all(backend: Backend) -> None:
    outbox = NotificationOutbox(enabled=True)
    record = await journalled(backend)
    before = Settling.of(record)
    stale = dataclasses.replace(record)
    record.status = PaymentStatus.APPROVED
    rows = outbox.rows(before, record)
    await backend.store.save_payment(record, notifications=rows)
    [stored] = await backend.store.list_notifications()
    assert (stored.event_id, stored.state, stored.attempts, stored.body) == (rows[0].event_id, DeliveryState.PENDING,
                                                                             0, rows[0].body)

    # The same transition from a stale read (a second settler): StaleWrite, no second event.
    stale.status = PaymentStatus.APPROVED
    with pytest.raises(StaleWrite):
        await backend.store.save_payment(stale, notifications=outbox.rows(before, stale))
    # An event id already stored sinks the whole write, row included.
    other = await journalled(backend)
    other.status = PaymentStatus.APPROVED
    with pytest.raises(DB_ERRORS):
        await backend.store.save_payment(other, notifications=rows)
    got = await backend.store.get_payment(other.id)
    assert got is not None and got.status is PaymentStatus.PENDING
    assert [n.event_id for n in await backend.store.list_notifications()] == [rows[0].event_id]
    assert await backend.store.count_pending_notifications() == 1


async def test_senders_lease_disjoint_rows_and_record_each_attempt_once(backend: Backend) -> None:
    outbox = NotificationOutbox(enabled=True)
    ids = []
    for _ in range(6):
        record = await journalled(backend)
        before = Settling.of(record)
        record.status = PaymentStatus.APPROVED
        rows = outbox.rows(before, record)
        await backend.store.save_payment(record, notifications=rows)
        ids.append(rows[0].event_id)
    other = backend.new_store()
    await other.open()
    try:
        mine = await backend.store.lease_notifications("a", 30, limit=4)
        theirs = await other.lease_notifications("b", 30, limit=10)
        assert len(mine) == 4 and len(theirs) == 2
        assert sorted(n.event_id for n in mine + theirs) == sorted(ids)
        assert await other.lease_notifications("b", 30, limit=10) == []  # all leased

        line = OutboxLine("notification_delivery:0a", b'{"event":"notification_delivery"}\n', "test", time.time())
        first = mine[0].event_id
        assert await backend.store.finish_notification(first, AttemptRecord(DeliveryOutcome.FAILED, retry_in_s=0,
                                                                            http_status=500, error="http_500"), line)
        # Failed with no pause: due again at once, lease ended, one attempt recorded.
        [again] = await other.lease_notifications("b", 30, limit=10)
        assert again.event_id == first and again.attempts == 1 and again.last_status == 500
        assert await other.finish_notification(first, AttemptRecord(DeliveryOutcome.DELIVERED, http_status=200))
        # A late finish by a sender whose lease was taken over writes nothing.
        assert not await backend.store.finish_notification(first, AttemptRecord(DeliveryOutcome.DELIVERED))
        [done] = await backend.store.list_notifications(event_id=first)
        assert done.state is DeliveryState.DELIVERED and done.attempts == 2 and done.delivered_at is not None
        assert await backend.store.count_pending_notifications() == 5
        assert await backend.store.claim_outbox("test", own_before=float("inf"), any_before=float("inf"),
                                                now=float("inf"), lease_until=time.time() + 60) == [line]

        assert await backend.store.finish_notification(mine[1].event_id, AttemptRecord(DeliveryOutcome.GIVEN_UP))
        assert await backend.store.replay_notifications(event_id=first) == 1
        assert await backend.store.replay_notifications(since=time.time() + 3600) == 0
        replayed = await other.lease_notifications("b", 30, limit=10)
        assert [n.event_id for n in replayed] == [first]  # the others are still leased, or given up
        assert await backend.store.replay_notifications(since=0) == 6
        assert await backend.store.count_pending_notifications() == 6
    finally:
        await other.close()


async def test_leases_end_when_released_and_old_finished_rows_are_purged(backend: Backend) -> None:
    outbox = NotificationOutbox(enabled=True)
    ids = []
    for _ in range(3):
        record = payment(status=PaymentStatus.PENDING)
        before = Settling.of(record)
        record.status = PaymentStatus.DECLINED
        rows = outbox.rows(before, record)
        await backend.store.save_payment(record, notifications=rows)
        ids.append(rows[0].event_id)
    assert len(await backend.store.lease_notifications("a", 600, limit=2)) == 2
    assert len(await backend.store.lease_notifications("b", 600, limit=2)) == 1
    assert await backend.store.release_notification_leases("a") == 2  # a stopping sender's own
    assert len(await backend.store.lease_notifications("c", 600, limit=5)) == 2
    assert await backend.store.release_notification_leases(None) == 3  # a sole owner at start: all of them
    [first, second, third] = await backend.store.lease_notifications("d", 600, limit=5)
    await backend.store.finish_notification(first.event_id, AttemptRecord(DeliveryOutcome.DELIVERED))
    await backend.store.finish_notification(second.event_id, AttemptRecord(DeliveryOutcome.GIVEN_UP))

    assert await backend.store.purge_notifications(time.time() - 3600) == 0  # younger than the retention
    assert await backend.store.purge_notifications(time.time() + 1) == 2  # finished ones only
    assert [n.event_id for n in await backend.store.list_notifications()] == [third.event_id]


# -- the configuration ------------------------------------------------------------------------------


def _config(notifications: dict) -> dict:
    return {
        "auth": {"clients": [{"name": "checkout", "key_env": "GATEWAY_KEY_CHECKOUT"}]},
        "providers": {"stripe": {"kind": "stripe", "base_url": "https://127.0.0.1:9101",
                                 "api_key_env": "STRIPE_API_KEY"}},
        "routes": [{"name": "default", "providers": ["stripe"]}],
        "notifications": notifications,
    }


@pytest.mark.parametrize(("section", "message"), [
    ({"url": "https://checkout.test/hooks"}, "notifications: secret_env: at least one variable is required"),
    ({"url": "https://checkout.test/hooks", "secret_env": ["NOT_SET_ANYWHERE"]},
     "environment variable NOT_SET_ANYWHERE (named by notifications.secret_env[0]) is not set"),
    ({"url": "https://checkout.test/hooks", "secret_env": ["NOTIFY_OK", "NOTIFY_SHORT"]},
     "notifications: secret_env[1]: NOTIFY_SHORT holds fewer than 24 characters"),
    ({"url": "ftp://checkout.test/hooks", "secret_env": ["NOTIFY_OK"]}, "notifications.url"),
    ({"retry_base_s": 10, "retry_max_s": 1}, "notifications: retry_max_s must be at least retry_base_s"),
    ({"max_concurrency": 0}, "notifications.max_concurrency"),
])
def test_config_errors_name_the_field(section: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import ConfigError, parse_config

    monkeypatch.setenv("NOTIFY_OK", "x" * 32)
    monkeypatch.setenv("NOTIFY_SHORT", "short")
    with pytest.raises(ConfigError) as err:
        parse_config(_config(section))
    assert message in str(err.value)


def test_config_loads_every_secret_and_the_redactor_knows_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import parse_config

    monkeypatch.setenv("NOTIFY_NEW", "n" * 32)
    monkeypatch.setenv("NOTIFY_OLD", "o" * 32)
    config = parse_config(_config({"url": "https://checkout.test/hooks", "secret_env": ["NOTIFY_NEW", "NOTIFY_OLD"]}))
    assert config.notifications.enabled
    assert [s.get_secret_value() for s in config.notifications.secrets] == ["n" * 32, "o" * 32]
    assert {"n" * 32, "o" * 32} <= set(config.secret_values())
    assert "n" * 32 not in repr(config)
    assert not parse_config(_config({})).notifications.enabled
