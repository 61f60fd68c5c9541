"""The drills' follow-up phase: what a checkout does after its payments are approved.

For every approved payment: a capture of the whole amount (payments are authorised with
`capture: false` in the scenarios that have this phase), then a partial refund of a third.
Each follow-up has its own Idempotency-Key and is retried with that same key, like a checkout
would, while the gateway gives no answer, is down (a crash drill kills it), answers 409 for a
key still in flight or 503: at most MAX_TRIES tries and MAX_S seconds each. A 202 (accepted,
not yet confirmed: the reconciler settles it) is an answer: the refund is not sent again. The
payment's own pending state is waited out before its refund is sent.

Counts go into the summary (`follow_ups_*`); what the providers really did is compared with
the journal by `journal_mismatches`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import orjson

MAX_TRIES = 60
MAX_S = 30.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0
RETRY_STATUSES = frozenset({409, 502, 503, 504})
PENDING_STATUSES = frozenset({"capture_pending", "void_pending", "refund_pending"})


@dataclass(frozen=True, slots=True)
class FollowUpTarget:
    payment_id: str
    amount: int
    key_prefix: str  # each follow-up's Idempotency-Key is this plus its operation


@dataclass(slots=True)
class FollowUpTally:
    sent: Counter[str]
    answers: Counter[str]  # "<operation>:<http status>" of the final answer (or "no_answer")
    tries: int = 0

    def as_summary(self) -> dict[str, object]:
        return {"follow_ups_sent": sum(self.sent.values()), "follow_ups_tries": self.tries,
                "follow_up_answers": dict(sorted(self.answers.items()))}


Hook = Callable[[], Awaitable[None]]


async def post_follow_up(session: aiohttp.ClientSession, path: str, body: dict[str, object], key: str,
                tally: FollowUpTally, rng: random.Random) -> tuple[int | None, dict[str, object]]:
    """One follow-up, retried with the same key while no answer can be final yet."""
    give_up = time.monotonic() + MAX_S
    backoff = BACKOFF_MIN_S
    status: int | None = None
    doc: dict[str, object] = {}
    for _ in range(MAX_TRIES):
        tally.tries += 1
        try:
            async with session.post(path, data=orjson.dumps(body),
                                    headers={"Idempotency-Key": key, "Content-Type": "application/json"}) as r:
                status, raw = r.status, await r.read()
            parsed = orjson.loads(raw) if raw else {}
            doc = parsed if isinstance(parsed, dict) else {}
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            status, doc = None, {}
        if status is not None and status not in RETRY_STATUSES:
            break
        if status == 409 and doc.get("code") != "idempotency_key_in_use":
            break  # the payment's state refuses it: final
        delay = rng.uniform(0, backoff)
        backoff = min(BACKOFF_MAX_S, backoff * 2)
        if time.monotonic() + delay > give_up:
            break
        await asyncio.sleep(delay)
    return status, doc


async def await_settled(session: aiohttp.ClientSession, payment_id: str, until: float) -> None:
    """Until the payment no longer reads `<op>_pending` (the reconciler settles it), bounded."""
    while time.monotonic() < until:
        try:
            async with session.get(f"/v1/payments/{payment_id}") as r:
                doc = orjson.loads(await r.read()) if r.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            doc = {}
        if doc and doc.get("status") not in PENDING_STATUSES:
            return
        await asyncio.sleep(0.2)


async def run_follow_ups(session: aiohttp.ClientSession, targets: Sequence[FollowUpTarget], concurrency: int,
                         seed: int, *, on_done: Hook | None = None) -> FollowUpTally:
    """Capture, then refund a third, of every target, `concurrency` payments at a time."""
    tally = FollowUpTally(Counter(), Counter())
    rng = random.Random(seed)
    queue = iter(targets)

    async def one(target: FollowUpTarget) -> None:
        base = f"/v1/payments/{target.payment_id}"
        for op, path, body in (("capture", f"{base}/capture", {}),
                               ("refund", f"{base}/refunds", {"amount": max(1, target.amount // 3)})):
            tally.sent[op] += 1
            status, doc = await post_follow_up(session, path, body, f"{target.key_prefix}-{op}", tally, rng)
            tally.answers[f"{op}:{status if status is not None else 'no_answer'}"] += 1
            if status == 202 or doc.get("status") in PENDING_STATUSES:
                await await_settled(session, target.payment_id, time.monotonic() + MAX_S)
            elif status != 200:
                break  # the capture did not happen: nothing to refund
        if on_done is not None:
            await on_done()

    async def worker() -> None:
        for target in queue:
            await one(target)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(targets))))))
    return tally
