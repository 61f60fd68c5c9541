"""The reconciler: owns every payment left `attempting` (a crash) or `pending` (an unknown
outcome), and every follow-up left `<op>_pending` (a crash, or an answer the provider did not
confirm). It settles each with a status query at the provider that holds it (through the same
`ProviderClient` as every call: breaker and bulkhead included), and stores the final answer for
the caller's idempotency key.

A provider without a lookup (Adyen: `has_status_lookup` False) is never asked: its payments and
follow-ups wait for their webhook (`gateway.webhooks`), which settles them.

Runs once at start (after a crash) and then periodically. Card data is never journalled, so a
payment the provider never saw is closed as `failed` (nothing charged) rather than re-sent; a
follow-up the provider never saw is undone (the payment returns to its prior status) and its
key released, so the caller's retry reaches the same provider key.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

import structlog

from domain.outcome import Outcome, PaymentStatus
from domain.types import FollowUp, Lookup, Operation, ProviderResult, StatusAnswer
from gateway import answers
from gateway.action_expiry import expire_abandoned, finish_interrupted_completion
from gateway.journal.records import PaymentRecord
from gateway.journal.errors import StaleWrite
from gateway.notifications.events import Settling
from gateway.orchestrator import PaymentService, apply_follow_up
from gateway.policy import POLICY
from gateway.provider_client import MIN_TRY_S
from gateway.settlement import follow_up_entry
from gateway.shopper_action import action_due, bind_action, cancelling

MIN_RECHECK_S = 5.0
MAX_RECHECK_S = 300.0
BATCH = 200  # rows leased per pass
PURGE_BATCH = 500  # expired keys deleted per store transaction (about 10 ms of SQLite on a 1 M-key file)
PURGE_BATCHES = 40  # per pass: 20,000 keys, at a pass every few seconds well above any payment rate
PURGE_PAUSE_FACTOR = 4.0  # after a full batch, wait this many times its duration
LEASE_S = 120.0  # beyond a pass over BATCH rows (each a status query bounded by its provider's timeout)
# Adyen retries a notification for days (9 s, 18 s, 27 s, then from a queue); an hour without one
# is worth an operator's look, never a guess.
NOTIFICATION_OVERDUE_S = 3600.0
# A follow-up at a provider without a lookup is sent again under its key for this long after it
# started, well inside the providers' key validity (Adyen keeps a key's answer at least 7 days);
# past it only its notification, or ops (`notification_overdue`), can settle it.
RESEND_WITHIN_S = 24 * 3600.0


class Reconciler:
    """`abandoned_after_s` must exceed the longest time any replica may still be working on a
    payment (the request deadline plus a margin): before that, a `received` or `attempting`
    row may belong to a live request elsewhere, and settling it could race that request."""

    def __init__(self, service: PaymentService, *, abandoned_after_s: float,
                 log: structlog.typing.FilteringBoundLogger, interval_s: float = 5.0, min_age_s: float = 2.0,
                 in_flight_s: float = 60.0, lookup_lag_s: float = 600.0, owner: str | None = None) -> None:
        """Unsettled payments are asked again after `interval_s` (at most MIN_RECHECK_S), then
        less and less often. An empty lookup proves nothing was made only `in_flight_s` after our
        last call to the provider (`lookup_lag_s` where the lookup is a lagging search).

        `owner` names its leases: a name that only one live process holds at a time and that
        its successor holds again (the app passes its transaction log's: host and log file), so
        a replica restarted in place, killed or rolled, takes its leases back at its first pass
        instead of waiting LEASE_S for them; by default a name of this process alone."""
        self.service = service
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"  # its leases' owner
        self.abandoned_after_s = abandoned_after_s
        self.log = log
        self.interval_s = interval_s
        self.min_age_s = min_age_s
        self._min_recheck_s = min(MIN_RECHECK_S, interval_s)
        self._in_flight_s = in_flight_s
        self._lookup_lag_s = lookup_lag_s
        self.wake = asyncio.Event()
        self._next_check: dict[str, tuple[float, float]] = {}  # payment id -> (next check, last delay)
        self._pass = asyncio.Lock()  # one pass at a time: two would settle and log a payment twice
        self._overdue: set[str] = set()  # payments whose missing notification was reported

    async def run_forever(self) -> None:
        woken = False
        while True:
            try:
                await self.run_once(ignore_backoff=woken)  # an operator's "reconcile now" asks everyone
                await self._purge_expired_keys()
            except Exception as exc:  # a bad pass must not end reconciliation for good
                self.log.exception("reconciler_pass_failed", error=type(exc).__name__)
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            woken = self.wake.is_set()
            self.wake.clear()

    async def _purge_expired_keys(self) -> None:
        """Expire answered keys in bounded batches, each its own short store transaction, so the
        payments queued behind the journal's writer go between them, and paced: after each full
        batch it waits PURGE_PAUSE_FACTOR times as long as the batch took, so a backlog (a
        restart after downtime longer than the retention: half a million keys once took the
        SQLite writer for seconds and the gateway answered nothing) gets at most a fifth of the
        writer. At most PURGE_BATCHES per pass; the next pass goes on where this one stopped.
        In steady state a pass finds the few keys that expired since the last one: one batch."""
        now = time.time()
        for _ in range(PURGE_BATCHES):
            started = time.monotonic()
            if await self.service.store.purge_expired_idempotency(now, PURGE_BATCH) < PURGE_BATCH:
                return
            await asyncio.sleep((time.monotonic() - started) * PURGE_PAUSE_FACTOR)

    async def run_once(self, *, min_age_s: float | None = None, abandoned_after_s: float | None = None,
                       ignore_backoff: bool = False) -> int:
        """Settle what can be settled now; returns how many payments or follow-ups reached a
        final state."""
        async with self._pass:
            return await self._run_once(min_age_s, abandoned_after_s, ignore_backoff)

    async def _run_once(self, min_age_s: float | None, abandoned_after_s: float | None,
                        ignore_backoff: bool) -> int:
        age = self.min_age_s if min_age_s is None else min_age_s
        abandoned = self.abandoned_after_s if abandoned_after_s is None else abandoned_after_s
        settled = 0
        now = time.time()
        # Leased to this reconciler: replicas reconciling together split the rows, and a dead
        # replica's rows come back once its lease runs out.
        unresolved = await self.service.store.lease_unresolved(self.owner, LEASE_S, limit=BATCH)
        for gone in self._next_check.keys() - {r.id for r in unresolved}:
            del self._next_check[gone]  # settled elsewhere (another replica, a request)
        left: list[PaymentRecord] = []  # what is still waiting for us after this pass
        waiting = [(r.id, r.version, r.action_expires_at) for r in unresolved if _shopper_has_time(r, now)]
        if waiting:
            await self.service.store.set_aside(waiting)  # out of the next passes' batches until due
        for record in unresolved:
            if record.id in self.service.in_flight or not _ours_now(record, now, age=age, abandoned=abandoned):
                continue  # a live request, here or elsewhere, may still own it
            due = self._next_check.get(record.id, (0.0, 0.0))[0]
            if not ignore_backoff and due > now:
                left.append(record)
                continue
            try:
                with self.service.tracing.span("reconcile.payment") as span:
                    span.record(record, "reconciliation")
                    done = await self._settle(record)
            except StaleWrite:
                # A request, or another replica, wrote the row since we read it: it is theirs
                # now, or ours again next pass. Nothing of ours was written, logged or counted.
                self.log.info("reconcile_lost_race", payment_id=record.id)
                done = False
            except Exception as exc:  # one payment's trouble must not stop the others
                self.log.exception("reconcile_failed", payment_id=record.id, provider=record.provider,
                                   error=type(exc).__name__)
                done = False
                await self.touch(record)
            if done:
                settled += 1
                self._next_check.pop(record.id, None)
            else:
                left.append(record)
                self._back_off(record.id, now)
        self.service.metrics.pending_seen(len(left), min((_waiting_since(r) for r in left), default=None), now)
        return settled

    def _back_off(self, payment_id: str, now: float) -> None:
        """Unsettled payments are asked again less and less often (up to every 5 minutes), so
        a provider that cannot answer is not queried in a tight loop."""
        last_delay = self._next_check.get(payment_id, (0.0, 0.0))[1]
        delay = self._min_recheck_s if last_delay == 0 else min(MAX_RECHECK_S, 2 * last_delay)
        self._next_check[payment_id] = (now + delay, delay)

    async def touch(self, record: PaymentRecord) -> None:
        """Move a row we could not settle behind the others (the store lists the oldest first),
        so a batch of stuck rows cannot starve newer ones."""
        try:
            record.updated_at = time.time()
            await self.service.store.save_payment(record)
        except Exception as exc:
            self.log.warning("reconcile_touch_failed", payment_id=record.id, error=type(exc).__name__)

    async def lookup(self, record: PaymentRecord, follow_up_id: str | None = None) -> StatusAnswer | None:
        """The status query, recorded as the payment's latest check (repeated checks replace
        each other, so the row does not grow per pass). None when the provider is not ours."""
        assert record.provider is not None
        client = self.service.clients.get(record.provider)
        if client is None:
            self.log.error("reconcile_unknown_provider", payment_id=record.id, provider=record.provider)
            return None
        attempt = client.new_attempt(Operation.STATUS, 0, None)
        last = record.attempts[-1] if record.attempts else None
        if last is not None and last.try_number == 0 and last.operation == Operation.STATUS.value:
            record.attempts[-1] = attempt
        else:
            record.attempts.append(attempt)
        deadline = time.monotonic() + max(client.handle.timeout_s, MIN_TRY_S) + MIN_TRY_S
        return await client.lookup(FollowUp(record.id, record.provider_reference, follow_up_id=follow_up_id),
                                   deadline, attempt)

    async def _settle(self, record: PaymentRecord) -> bool:
        if record.follow_up is not None and record.follow_up.operation == Operation.COMPLETE.value:
            return await finish_interrupted_completion(self, record)
        if record.status is PaymentStatus.ACTION_REQUIRED and (record.follow_up is None or cancelling(record)):
            return await expire_abandoned(self, record)  # its expiry, or the expiry's cancel in flight
        client = self.service.clients.get(record.provider) if record.provider is not None else None
        if client is not None and not client.mapping.has_status_lookup:
            if cancelling(record) or self._outcome_overdue(record):
                return await expire_abandoned(self, record)  # cancelled by our reference (Adyen)
            if self._resend_due(record, client.mapping.replays_answers):
                return await self._resend_follow_up(record)
            return await self._await_notification(record)
        if record.follow_up is not None:
            return await self._settle_follow_up(record)
        svc = self.service
        before = Settling.of(record)  # the checkout is notified of what this pass settles
        if record.provider is None:
            record.status, record.error_code = PaymentStatus.FAILED, "interrupted_before_provider_call"
        else:
            answer = await self.lookup(record)
            if answer is None:
                await self.touch(record)
                return False
            consistent = svc.clients[record.provider].mapping.status_query_consistent
            found = answer.lookup is Lookup.FOUND
            if found and answer.charges > 1:
                if not record.duplicate_charge_suspected:
                    svc.suspect_duplicate(record, ProviderResult(
                        Outcome.UNKNOWN, message=f"status query: {answer.charges} charges for one payment"))
                return await self._keep_pending(record)
            if answer.lookup is Lookup.NOT_FOUND and self._absence_proves_no_charge(record, consistent):
                record.status, record.error_code = PaymentStatus.FAILED, "not_charged"
            elif found and POLICY[answer.result.outcome].settles_charge:
                result = answer.result
                record.status, record.outcome = POLICY[result.outcome].status, result.outcome.value
                record.error_code = None  # why it was pending is not the final answer's
                if result.outcome is Outcome.ACTION_REQUIRED:
                    bind_action(record, result, svc.action_expiry_s)  # the shopper is asked now
                elif result.outcome is Outcome.APPROVED:
                    record.provider_reference = result.reference
                    if record.capture:
                        record.captured_amount = record.amount
                else:
                    record.decline_code = result.raw_code
            else:
                return await self._keep_pending(record)
        # The keys' stored answer first: a crash before the final row leaves a payment the next
        # pass settles the same way, never a final payment whose keys still say "in flight".
        record.updated_at = time.time()
        await svc.store.complete_idempotency_for(record.id, answers.payment_answer(record).stored())
        await svc.commit(record, "reconciliation", settled_from=before)  # row, log line, notification: together
        svc.metrics.reconciled.labels(record.status.value).inc()
        return True

    async def _await_notification(self, record: PaymentRecord) -> bool:
        """A provider without a lookup (Adyen) settles only by webhook (`gateway.webhooks`): the
        reconciler takes over what a dead request left (its payment line, its key's "pending"
        answer) and waits; nothing is ever guessed. Past NOTIFICATION_OVERDUE_S it says so once
        (ops line `notification_overdue`): ops check the provider's back office and have it
        resend the notification."""
        age = time.time() - (record.follow_up.started_at if record.follow_up is not None else record.created_at)
        if age > NOTIFICATION_OVERDUE_S and record.id not in self._overdue:
            self._overdue.add(record.id)
            self.log.warning("notification_overdue", payment_id=record.id, provider=record.provider,
                             status=record.status.value, age_s=round(age))
        if record.follow_up is None:
            return await self._keep_pending(record)
        return await self._keep_follow_up_pending(record)

    def _resend_due(self, record: PaymentRecord, replays_answers: bool) -> bool:
        """A follow-up the provider may never have received: its last try's answer is unknown (a
        reset, a timeout) or missing (the process died around the call), that call is past any
        time it could still be in flight, and the provider replays answers per key (Adyen), so
        sending it again under the same key makes it at most once. Without this it stayed
        `<op>_pending` for ever: Adyen has no lookup, and notifies nothing it never received."""
        pending = record.follow_up
        if pending is None or not replays_answers or pending.operation == Operation.COMPLETE.value:
            return False
        if time.time() - pending.started_at > RESEND_WITHIN_S:
            return False
        tries = [a for a in record.attempts if a.idempotency_key == pending.provider_key
                 and a.operation == pending.operation]
        if tries and tries[-1].outcome not in (None, Outcome.UNKNOWN.value, Outcome.UNAVAILABLE.value):
            return False  # accepted ("received"): its notification settles it; a send refused here is owed
        return self._quiet_since(record, None, pending.provider_key, floor=pending.started_at, consistent=True)

    async def _resend_follow_up(self, record: PaymentRecord) -> bool:
        """The follow-up sent again under its provider key, each try journalled before its call.
        Accepted: it waits for its notification, as any accepted one does; refused: settled,
        and its key answers so; unknown or not sent: asked again at a later pass."""
        svc = self.service
        pending = record.follow_up
        assert pending is not None and record.provider is not None
        op = Operation(pending.operation)
        client = svc.clients[record.provider]
        subject = FollowUp(payment_id=record.id, provider_reference=record.provider_reference, amount=pending.amount,
                           currency=record.currency, follow_up_id=pending.provider_key)

        async def write_ahead(_attempt: object) -> None:
            await svc.write_ahead(record, op.value)

        deadline = time.monotonic() + client.handle.timeout_s * 2 + MIN_TRY_S
        before = Settling.of(record)
        result = await svc.executor.run(client, op, subject, pending.provider_key, deadline, record.attempts,
                                        write_ahead, amount=pending.amount)
        self.log.info("follow_up_resent", payment_id=record.id, provider=record.provider, operation=op.value,
                      outcome=result.outcome.value, raw_code=result.raw_code)
        if result.outcome in (Outcome.UNKNOWN, Outcome.UNAVAILABLE) or result.settles_later:
            return await self._keep_follow_up_pending(record)
        record.updated_at = time.time()
        await self._settle_as(record, op, result)
        await svc.commit(record, "reconciliation", follow_up={"operation": op.value, "amount": pending.amount,
                                                              "resent": True}, settled_from=before)
        svc.metrics.reconciled.labels(record.status.value).inc()
        return True

    def _outcome_overdue(self, record: PaymentRecord) -> bool:
        """A payment left pending at a provider without a lookup (an unknown answer) whose
        outcome has not been notified within `three_ds.action_expiry_s`: it may be a challenge
        the shopper never saw (Adyen holds it open, and notifies nothing until it ends), so it
        is cancelled by our reference (Adyen's technical cancel) and ends as an abandoned
        challenge does. A charge made already refuses the cancel, and its notification settles it."""
        return (record.status is PaymentStatus.PENDING and record.follow_up is None
                and time.time() - record.created_at > self.service.action_expiry_s)

    async def _keep_follow_up_pending(self, record: PaymentRecord) -> bool:
        """Not settled yet: asked again later. Taking over a request that died, its key now
        replays "accepted, pending" (202) until then."""
        pending = record.follow_up
        assert pending is not None
        if not pending.answered:
            pending.answered = True
            await self.service.store.complete_idempotency_for(pending.provider_key, answers.follow_up_answer(
                record, Operation(pending.operation), ProviderResult(Outcome.UNKNOWN)).stored())
        await self.touch(record)
        return False

    async def _keep_pending(self, record: PaymentRecord) -> bool:
        """Not settled yet: the reconciler owns it and asks again later. A crashed request never
        wrote its payment line: taking it over writes that one line, and its key now replays
        "pending" instead of 409 until the payment settles."""
        svc = self.service
        taking_over = record.status is not PaymentStatus.PENDING
        record.status = PaymentStatus.PENDING
        record.updated_at = time.time()
        if taking_over:
            await svc.store.complete_idempotency_for(record.id, answers.payment_answer(record).stored())
            await svc.commit(record, "payment")
        else:
            await svc.store.save_payment(record)
        return False

    def _absence_proves_no_charge(self, record: PaymentRecord, lookup_consistent: bool) -> bool:
        """An empty status answer means "never charged" only once the last call to the provider
        is old enough that nothing can still be in flight or unindexed. Never for a payment we
        hold a provider id for."""
        if record.provider_reference is not None:
            return False
        return self._quiet_since(record, Operation.AUTHORIZE, None, floor=record.created_at,
                                 consistent=lookup_consistent)

    def _quiet_since(self, record: PaymentRecord, op: Operation | None, key: str | None, *, floor: float,
                     consistent: bool) -> bool:
        """No call of `op` (or with provider key `key`) to the payment's provider since `floor`,
        for long enough that an empty lookup means it was never made. A follow-up list is read
        from the payment by its id (`StatusAnswer.follow_ups_listed`): consistent."""
        calls = [a.started_at for a in record.attempts if a.provider == record.provider
                 and (op is None or a.operation == op.value) and (key is None or a.idempotency_key == key)]
        last_call = max(calls, default=floor)
        return time.time() - last_call > (self._in_flight_s if consistent else self._lookup_lag_s)

    async def _settle_as(self, record: PaymentRecord, op: Operation, result: ProviderResult) -> None:
        """The pending follow-up settled as the provider answered (a lookup's entry, a re-send's
        answer): onto the payment, and its key answers the same from now on."""
        pending = record.follow_up
        assert pending is not None
        apply_follow_up(record, op, result.outcome)
        await self.service.store.complete_idempotency_for(pending.provider_key,
                                                          answers.follow_up_answer(record, op, result).stored())

    async def _settle_follow_up(self, record: PaymentRecord) -> bool:
        """A capture, void or refund the provider did not confirm, or whose request died: the
        provider's list of the payment's follow-ups says whether ours was made."""
        svc = self.service
        before = Settling.of(record)
        pending = record.follow_up
        assert pending is not None
        op = Operation(pending.operation)
        answer = await self.lookup(record, follow_up_id=pending.provider_key)
        if answer is None:
            await self.touch(record)
            return False
        entry = follow_up_entry(answer, op, pending.provider_key) if answer.lookup is Lookup.FOUND else None
        follow_up = {"operation": op.value, "amount": pending.amount}
        record.updated_at = time.time()
        if entry is not None and entry.outcome is not Outcome.UNKNOWN:
            await self._settle_as(record, op, ProviderResult(entry.outcome,
                                                              raw_code=f"{op.value}_{entry.outcome.value}"))
        elif (entry is None and answer.lookup is Lookup.FOUND and answer.follow_ups_listed
              and self._quiet_since(record, None, pending.provider_key, floor=pending.started_at,
                                    consistent=True)):
            apply_follow_up(record, op, Outcome.UNAVAILABLE)
            if pending.answered:  # its key replays "accepted"; say what became of it instead
                await svc.store.complete_idempotency_for(pending.provider_key, answers.follow_up_not_made(op).stored())
            else:
                await svc.store.release_idempotency(pending.scope, pending.front_key)  # a retry may make it now
            follow_up["never_made"] = True
        else:
            return await self._keep_follow_up_pending(record)
        await svc.commit(record, "reconciliation", follow_up=follow_up, settled_from=before)
        svc.metrics.reconciled.labels(record.status.value).inc()
        return True


def _waiting_since(record: PaymentRecord) -> float:
    """When the unsettled thing began: the follow-up's start, else the payment's creation."""
    return record.follow_up.started_at if record.follow_up is not None else record.created_at


def _shopper_has_time(record: PaymentRecord, now: float) -> bool:
    """A payment waiting for its shopper, nothing to do for it before its action expires."""
    return (record.status is PaymentStatus.ACTION_REQUIRED and record.follow_up is None
            and record.action_expires_at is not None and not action_due(record, now))


def _ours_now(record: PaymentRecord, now: float, *, age: float, abandoned: float) -> bool:
    """Whether this row is the reconciler's to settle now. A pending payment or an answered
    follow-up once it is `age` old; a received or attempting payment, or an unanswered
    follow-up, only once its request is past its deadline (another replica, or this one, may
    still be working on it until then)."""
    if record.follow_up is not None:
        if record.follow_up.answered:
            return now - record.updated_at >= age
        return now - record.follow_up.started_at >= abandoned
    if record.status is PaymentStatus.PENDING:
        return now - record.updated_at >= age
    if record.status is PaymentStatus.ACTION_REQUIRED:
        return action_due(record, now)  # the shopper has until the action expires
    return now - record.created_at >= abandoned
