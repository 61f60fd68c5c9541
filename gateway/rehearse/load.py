"""The rehearsal's open-loop load: each payment is sent when the profile says it is due, whether
or not earlier ones have been answered, so a gateway that cannot keep up shows as latency and
shed answers, never as a politely slower load (a closed loop would hide exactly that).

Latency is measured from when a payment was *due*, not from when the client got to send it, so
a client that fell behind cannot hide time either (coordinated omission). Bounded: the plan is
bounded by the profile (count), sending stops at the profile's end plus nothing (time), at most
`max_in_flight` requests are open (past that a payment is counted `client_cap`, not queued), and
every request has the client timeout. Loopback only; each payment its own Idempotency-Key, which a
request without an answer is sent with once more after the load (`ask_again`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import aiohttp
import orjson

from gateway.drill.report import SendResult
from gateway.drill.runner import PlannedPayment, answer_result
from gateway.rehearse.profile import PaymentKind

# Cards every emulator approves, by brand (Visa: each provider's documented approve card;
# Mastercard: the networks' public test number, unlisted at every emulator, so approved).
BRAND_CARDS = {"visa": "4242424242424242", "mastercard": "5555555555554444"}


@dataclass(frozen=True, slots=True)
class Planned:
    payment: PlannedPayment
    due_s: float
    kind: PaymentKind


@dataclass(frozen=True, slots=True)
class Sent:
    """One payment as the rehearsal's client saw it."""

    result: SendResult
    due_s: float
    message: str | None = None  # an error answer's message (which shedding it was)
    failovers: int = 0
    provider_429s: int = 0


def plan(arrivals: Sequence[float], kinds: Sequence[PaymentKind], run_id: str, decline_card: str,
         seed: int) -> list[Planned]:
    rng = random.Random(seed)
    out = []
    for i, (due, kind) in enumerate(zip(arrivals, kinds, strict=True)):
        ref = f"rehearse-{run_id}-{i:07d}"
        card = decline_card if kind.decline else BRAND_CARDS.get(kind.brand, BRAND_CARDS["visa"])
        out.append(Planned(PlannedPayment(i, ref, ref, card, kind.decline, rng.randrange(1, 1000) * 100), due, kind))
    return out


def body(p: Planned) -> bytes:
    doc: dict[str, object] = {
        "amount": p.payment.amount, "currency": p.kind.currency, "merchant_reference": p.payment.merchant_reference,
        "payment_method": {"type": "card", "number": p.payment.card, "exp_month": 12, "exp_year": 2034,
                           "cvc": "123"},
        "metadata": {"rehearsal": "true"},
    }
    if p.kind.country:
        doc["country"] = p.kind.country
    return orjson.dumps(doc)


@dataclass(slots=True)
class LoadState:
    """What the load has done so far, for the live display."""

    started_at: float = 0.0  # monotonic
    scheduled: int = 0
    in_flight: int = 0
    sent: list[Sent] = field(default_factory=list)
    capped: list[float] = field(default_factory=list)  # due times of payments not sent: max_in_flight reached

    @property
    def client_cap(self) -> int:
        return len(self.capped)


async def _send(session: aiohttp.ClientSession, p: Planned, due_at: float) -> Sent:
    try:
        async with session.post("/v1/payments", data=body(p),
                                headers={"Idempotency-Key": p.payment.idempotency_key,
                                         "Content-Type": "application/json"}) as response:
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sent(SendResult(p.payment.index, p.payment.merchant_reference, (time.monotonic() - due_at) * 1000,
                               error=type(exc).__name__, decline_card=p.payment.decline_card), p.due_s)
    latency = (time.monotonic() - due_at) * 1000
    result = answer_result(p.payment, latency, status, raw)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    attempts = [a for a in doc.get("attempts") or () if isinstance(a, dict)]
    return Sent(result, p.due_s, message=doc.get("message") if result.payment_id is None else None,
                failovers=sum(1 for a in attempts if a.get("failover_reason")),
                provider_429s=sum(1 for a in attempts if a.get("http_status") == 429))


def client_session(base_url: str, client_key: str, max_in_flight: int, timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url, connector=aiohttp.TCPConnector(limit=max_in_flight),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 headers={"Authorization": f"Bearer {client_key}"})


async def run_load(session: aiohttp.ClientSession, planned: Sequence[Planned], state: LoadState, *,
                   max_in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
    """Send every planned payment at its due time (see the module doc); returns once every
    request sent has its answer or its timeout."""
    tasks: set[asyncio.Task[None]] = set()
    state.started_at = start = clock()

    async def one(p: Planned, due_at: float) -> None:
        state.in_flight += 1
        try:
            state.sent.append(await _send(session, p, due_at))
        finally:
            state.in_flight -= 1

    for p in planned:
        due_at = start + p.due_s
        delay = due_at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        state.scheduled += 1
        if state.in_flight >= max_in_flight:
            state.capped.append(p.due_s)
            continue
        task = asyncio.create_task(one(p, due_at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def ask_again(session: aiohttp.ClientSession, planned: Sequence[Planned], state: LoadState, *,
                    concurrency: int = 32) -> int:
    """What a checkout does with a request that got no answer: ask once more with the same
    Idempotency-Key. If the gateway had taken it, the answer is the payment (replayed, or 409
    while still in flight); if it never arrived, it is taken now. Either way it is no longer
    unknown, so `lost` counts only what the gateway took and then lost. Each retried payment
    keeps its first latency (the checkout waited that long at least); returns how many."""
    by_index = {p.payment.index: p for p in planned}
    todo = [i for i, s in enumerate(state.sent) if s.result.http_status is None]
    gate = asyncio.Semaphore(concurrency)

    async def again(i: int) -> None:
        first = state.sent[i]
        async with gate:
            retried = await _send(session, by_index[first.result.index], time.monotonic())
        state.sent[i] = replace(retried, due_s=first.due_s, result=replace(retried.result,
                                                                          latency_ms=first.result.latency_ms))

    await asyncio.gather(*(again(i) for i in todo))
    return len(todo)
