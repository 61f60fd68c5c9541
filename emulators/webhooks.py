"""The emulators' webhook feed: signed notifications posted to a configured URL, retried on the
provider's own schedule, with the webhook faults applied.

Real providers settle much of their work by notification (Adyen has no payment lookup, and its
modifications only answer `received`), so a gateway is only tested against them if its emulator
sends notifications the way they do: each provider's event shape and signature (built as pure
data in the provider's emulator module: `sign_webhook`, `forge_webhook`), its retry schedule on a
non-2xx answer or a timeout, compressed by `WebhookTarget.time_factor` for tests and drills, at
least once and in no promised order.

One sender per emulator. Every notification is its own task: the first delivery, then a retry
after each wait of the provider's schedule until a 2xx answer or the schedule runs out. Bounded:
at most `max_in_flight` notifications are being delivered at once (more are recorded as
`overflow` and not sent), every attempt has the target's timeout, every schedule is finite, and
`close()` (the emulator stopping) cancels them all. What was emitted and every attempt are kept
(bounded) for `GET /_emulator/webhooks`, so drills can count deliveries and forged acceptances.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import ssl
import time
from collections import deque
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import aiohttp
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr

from emulators.faults import FaultInjector, WebhookDecision


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """The waits between delivery attempts after a failed one, as the provider documents them.
    `attempts` is the first delivery plus one retry per wait: the schedule is the attempt cap."""

    waits_s: tuple[float, ...]

    @property
    def attempts(self) -> int:
        return len(self.waits_s) + 1

    @classmethod
    def filled(cls, head_s: tuple[float, ...], every_s: float, horizon_s: float) -> RetrySchedule:
        """`head_s`, then one wait of `every_s` after another while the total stays within
        `horizon_s` (Adyen: every 8 hours up to 30 days)."""
        waits = list(head_s)
        while sum(waits) + every_s <= horizon_s:
            waits.append(every_s)
        return cls(tuple(waits))

    @classmethod
    def doubling(cls, first_s: float, cap_s: float, horizon_s: float) -> RetrySchedule:
        """Exponential backoff: `first_s`, doubling up to `cap_s` per wait, within `horizon_s`."""
        waits: list[float] = []
        wait = first_s
        while sum(waits) + wait <= horizon_s:
            waits.append(wait)
            wait = min(wait * 2, cap_s)
        return cls(tuple(waits))


class WebhookTarget(BaseModel):
    """Where an emulator posts its notifications, and the secret it signs them with (the
    provider's "webhook signing secret" / "HMAC key" / "signature key")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: AnyHttpUrl
    secret: SecretStr = Field(min_length=1)
    # Multiplies every wait of the retry schedule: 0.001 turns Adyen's 9 s into 9 ms.
    time_factor: float = Field(1.0, gt=0.0, le=1.0)
    timeout_s: float = Field(10.0, gt=0.0, le=60.0)  # Adyen wants an answer within 10 s

    def public(self) -> dict[str, Any]:
        return {"url": str(self.url), "time_factor": self.time_factor, "timeout_s": self.timeout_s}


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One notification as the provider would send it, before signing."""

    event_id: str  # the provider's id (Adyen has none: pspReference:eventCode:success)
    label: str  # the event type / eventCode
    operation: str  # authorize, capture, refund, void: what webhook faults match on
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SignedRequest:
    body: bytes
    headers: dict[str, str]


class WebhookSigner(Protocol):
    """What a provider's emulator supplies: its signature scheme and a forgery of its events."""

    def sign_webhook(self, doc: dict[str, Any], secret: str, now: float) -> SignedRequest: ...

    def forge_webhook(self, doc: dict[str, Any]) -> dict[str, Any]: ...

    def check_webhook_secret(self, secret: str) -> None:
        """Raise ValueError when the secret cannot be this provider's (Adyen: a hex key)."""


Copy = Literal["original", "duplicate", "forged"]


@dataclass(slots=True)
class Delivery:
    """One delivery attempt: `status` is the receiver's HTTP status, None when none came."""

    seq: int
    event_id: str
    label: str
    operation: str
    copy: Copy
    attempt: int
    at: float
    status: int | None = None
    error: str | None = None  # "dropped" (a webhook_drop fault), or why the POST failed

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(slots=True)
class Emitted:
    seq: int
    event: WebhookEvent
    at: float
    state: str = "pending"  # pending, delivered, abandoned, no_target, overflow, cancelled

    def view(self) -> dict[str, Any]:
        return {"seq": self.seq, "event_id": self.event.event_id, "label": self.event.label,
                "operation": self.event.operation, "at": self.at, "state": self.state, "doc": self.event.doc}


class WebhookSender:
    """Posts one emulator's notifications; see the module docstring."""

    def __init__(self, signer: WebhookSigner, schedule: RetrySchedule, faults: FaultInjector, *,
                 max_in_flight: int = 10_000, history: int = 20_000) -> None:
        self._signer = signer
        self.schedule = schedule
        self._faults = faults
        self._max_in_flight = max_in_flight
        self._target: WebhookTarget | None = None
        self._ssl: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: list[tuple[int, asyncio.Event]] = []  # webhook_reorder: (seq, release)
        self._seq = itertools.count(1)
        self._emitted: deque[Emitted] = deque(maxlen=history)
        self._deliveries: deque[Delivery] = deque(maxlen=history)
        self._closed = False

    @property
    def target(self) -> WebhookTarget | None:
        return self._target

    def set_target(self, target: WebhookTarget | None) -> None:
        """Takes effect for every later attempt, retries already scheduled included."""
        if target is not None:
            self._signer.check_webhook_secret(target.secret.get_secret_value())
        self._target = target

    def set_client_ssl(self, context: ssl.SSLContext | None) -> None:
        """The TLS context for an https target (the dev CA that signed the gateway's certificate)."""
        self._ssl = context

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def emitted(self) -> list[Emitted]:
        return list(self._emitted)

    def deliveries(self) -> list[Delivery]:
        return list(self._deliveries)

    def snapshot(self) -> dict[str, Any]:
        return {"target": self._target.public() if self._target is not None else None,
                "schedule_s": list(self.schedule.waits_s), "in_flight": self.in_flight,
                "events": [e.view() for e in self._emitted],
                "deliveries": [asdict(d) | {"accepted": d.accepted} for d in self._deliveries]}

    def emit(self, event: WebhookEvent) -> None:
        """Called by a handler once the provider has done what the event reports, whatever
        becomes of the HTTP answer (a timeout after processing still notifies)."""
        if self._closed:
            return
        emitted = Emitted(next(self._seq), event, time.time())
        self._emitted.append(emitted)
        if self._target is None:
            emitted.state = "no_target"
            return
        if len(self._tasks) >= self._max_in_flight:
            emitted.state = "overflow"
            return
        decision = self._faults.decide_webhook(event.operation)
        self._spawn(self._deliver(emitted, decision, "original"))
        for _ in range(decision.copies):
            self._spawn(self._deliver(emitted, WebhookDecision(delay_s=decision.delay_s), "duplicate"))
        if decision.forge:
            self._spawn(self._forged(emitted))

    async def idle(self) -> None:
        """Wait until nothing is being delivered (every notification delivered, abandoned or
        cancelled), so a drill or test can read the final delivery log."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def clear(self) -> None:
        """Forget the history and cancel what is still being delivered (the emulator's reset)."""
        for task in list(self._tasks):
            task.cancel()
        self._emitted.clear()
        self._deliveries.clear()

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- delivery ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, emitted: Emitted, decision: WebhookDecision, copy: Copy) -> None:
        try:
            if decision.delay_s > 0:
                await asyncio.sleep(decision.delay_s)
            if decision.reorder_hold_s is not None:
                await self._hold(emitted.seq, decision.reorder_hold_s)
            for attempt, wait_s in zip(range(1, self.schedule.attempts + 1), self._waits()):
                if wait_s:
                    await asyncio.sleep(wait_s * (self._target.time_factor if self._target else 1.0))
                if attempt <= decision.drops:
                    self._record(emitted, copy, attempt, error="dropped")
                    accepted = False
                else:
                    accepted = await self._attempt(emitted, copy, attempt, emitted.event.doc, None)
                if attempt == 1 and copy == "original" and decision.reorder_hold_s is None:
                    self._release_before(emitted.seq)
                if accepted:
                    if copy == "original":
                        emitted.state = "delivered"
                    return
            if copy == "original":
                emitted.state = "abandoned"
        except asyncio.CancelledError:
            if copy == "original" and emitted.state == "pending":
                emitted.state = "cancelled"
            raise

    def _waits(self) -> Iterator[float]:
        yield 0.0
        yield from self.schedule.waits_s

    async def _forged(self, emitted: Emitted) -> None:
        """What an attacker would post: the event tampered with, signed with a key that is not
        the target's. Sent once; a receiver that accepts it is what drills count."""
        doc = self._signer.forge_webhook(emitted.event.doc)
        await self._attempt(emitted, "forged", 1, doc, secrets.token_hex(32))

    async def _hold(self, seq: int, hold_s: float) -> None:
        """webhook_reorder: wait until a notification emitted after this one has had its first
        delivery attempt (or `hold_s` passes), so this one arrives after it."""
        release = asyncio.Event()
        entry = (seq, release)
        self._held.append(entry)
        try:
            await asyncio.wait_for(release.wait(), hold_s)
        except TimeoutError:
            pass
        finally:
            if entry in self._held:
                self._held.remove(entry)

    def _release_before(self, seq: int) -> None:
        for held_seq, release in list(self._held):
            if held_seq < seq:
                release.set()
                self._held.remove((held_seq, release))

    async def _attempt(self, emitted: Emitted, copy: Copy, attempt: int, doc: dict[str, Any],
                       secret: str | None) -> bool:
        target = self._target
        if target is None:
            self._record(emitted, copy, attempt, error="no target")
            return False
        signed = self._signer.sign_webhook(doc, secret or target.secret.get_secret_value(), time.time())
        if self._session is None:
            self._session = aiohttp.ClientSession()
        delivery = self._record(emitted, copy, attempt)
        try:
            async with self._session.post(str(target.url), data=signed.body, headers=signed.headers,
                                          ssl=self._ssl if self._ssl is not None else True,
                                          timeout=aiohttp.ClientTimeout(total=target.timeout_s)) as response:
                await response.read()
                delivery.status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            delivery.error = type(exc).__name__
        return delivery.accepted

    def _record(self, emitted: Emitted, copy: Copy, attempt: int, *, error: str | None = None) -> Delivery:
        event = emitted.event
        delivery = Delivery(emitted.seq, event.event_id, event.label, event.operation, copy, attempt, time.time(),
                            error=error)
        self._deliveries.append(delivery)
        return delivery
