"""A circuit breaker per provider: pybreaker's state machine, driven correctly from asyncio.

pybreaker is not asyncio-native (`call_async` needs Tornado; `call(async_fn)` returns the
coroutine and counts a success). What works: `guard()` admits the awaited attempt itself and
hands pybreaker its verdict afterwards, through `call` on a function that raises the failure
or returns. Only outcomes that say something about the provider's health are failures
(`ProviderFailure`); declines return normally and count as the provider answering; an attempt
that never asked the provider (`NoVerdict`) counts as neither. `throw_new_error_on_trip=False` keeps the
tripping call's own error. pybreaker lets every concurrent caller through while half-open, so
an asyncio.Lock admits a single trial call at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pybreaker


class BreakerOpen(Exception):
    """The breaker refused the call: nothing was sent."""


class ProviderFailure(Exception):
    """Raised inside `guard()` to count an attempt as a failure."""


class NoVerdict(Exception):
    """Raised inside `guard()` when the attempt ended before the provider was asked (the
    gateway's own deadline, a wait for a connection): neither a failure nor a success."""


StateListener = Callable[[str, str, str], None]  # provider, old, new
HoldListener = Callable[[str, bool], None]  # provider, held (an operator's hold set or released)


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: ProviderBreaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: object) -> None:
        old = getattr(old_state, "name", str(old_state))
        new = getattr(new_state, "name", str(new_state))
        self._breaker.epoch += 1  # open->open too: a remote trip restarts the reset timeout
        if old == new:  # pybreaker re-announces open->open for calls in flight when it tripped
            return
        self._breaker.changed_at = time.time()
        for listener in self._breaker.listeners:
            listener(self._breaker.provider, old, new)


class ProviderBreaker:
    def __init__(self, provider: str, *, fail_max: int, reset_timeout_s: float) -> None:
        self.provider = provider
        self.listeners: list[StateListener] = []
        self.hold_listeners: list[HoldListener] = []
        self.changed_at = time.time()
        self.held_open = False
        self.hold_changed_at = 0.0
        # Bumped by every state change (and forced one): an attempt's verdict counts only in the
        # state it was admitted in, so one admitted while closed and ending after a trip and the
        # reset timeout cannot act as the trial, nor a success close a breaker an operator holds.
        self.epoch = 0
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            throw_new_error_on_trip=False,
            listeners=[_Listener(self)],
            name=provider,
        )
        self._trial = asyncio.Lock()

    @property
    def state(self) -> str:
        return self._cb.current_state

    def allows_call(self) -> bool:
        """Whether a call now would be let through; the router skips providers for which not."""
        if self.held_open:
            return False
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN and not self._reset_elapsed():
            return False
        return not self._trial.locked()

    def _reset_elapsed(self) -> bool:
        opened_at = self._cb._state_storage.opened_at  # pybreaker exposes no public accessor
        return opened_at is None or datetime.now(UTC) >= opened_at + timedelta(seconds=self._cb.reset_timeout)

    def _verdict(self, failure: ProviderFailure | None) -> None:
        """One attempt's outcome into pybreaker's state machine, in the state it was admitted in
        (the guard checks the epoch): closed counts or trips, a trial closes or opens again."""
        def attempt() -> None:
            if failure is not None:
                raise failure

        try:
            self._cb.call(attempt)
        except (pybreaker.CircuitBreakerError, ProviderFailure):
            pass

    def guard(self) -> _Guard:
        """Wrap exactly one provider attempt (`async with breaker.guard():`). Raise
        ProviderFailure inside to count a failure; BreakerOpen means nothing was sent."""
        return _Guard(self)

    def force_open(self, opened_at: float | None = None, *, hold: bool = False) -> None:
        """Open now; `opened_at` (epoch seconds) lets the reset timeout run from an earlier trip,
        e.g. another replica's. pybreaker keeps that instant in its storage, with no setter.
        `hold` (an operator draining a provider for maintenance) keeps it open past the reset
        timeout, with no trial call, until `force_close()`. Setting a hold is announced to the
        hold listeners (breaker sync makes it the fleet's)."""
        newly_held = hold and not self.held_open
        self.held_open = self.held_open or hold
        self.epoch += 1
        self._cb.open()
        if opened_at is not None:
            self._cb._state_storage.opened_at = datetime.fromtimestamp(opened_at, UTC)
        if newly_held:
            self._hold_changed(True)

    def force_close(self) -> None:
        """Close now, releasing an operator's hold (announced to the hold listeners)."""
        released = self.held_open
        self.held_open = False
        self.epoch += 1
        self._cb.close()
        if released:
            self._hold_changed(False)

    def _hold_changed(self, held: bool) -> None:
        self.hold_changed_at = time.time()
        for listener in self.hold_listeners:
            listener(self.provider, held)


class _Guard:
    """A class rather than a generator context manager: it sits on every payment's path.

    Admission happens on entry (an operator's hold, an open breaker, the single trial while
    half-open); the verdict on exit, through pybreaker's own `call`, so its state machine moves
    exactly as for a call: closed counts and trips, half-open closes or opens again. An attempt
    that ended without asking the provider (`NoVerdict`, a cancellation, our own bug) gives no
    verdict at all: pybreaker's `calling()` counted every exception as a failure and every
    normal exit as a success, so a gateway's own deadline or a cancelled call at shutdown
    counted against a healthy provider. Nor does an attempt whose breaker changed state while
    it ran (`ProviderBreaker.epoch`), or one that ends while an operator holds it open."""

    __slots__ = ("_breaker", "_epoch", "_trial")

    def __init__(self, breaker: ProviderBreaker) -> None:
        self._breaker = breaker
        self._trial = False
        self._epoch = 0

    async def __aenter__(self) -> None:
        b = self._breaker
        if b.held_open:
            raise BreakerOpen(f"{b.provider}: breaker held open by an operator")
        self._epoch = b.epoch
        state = b._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return
        if state == pybreaker.STATE_OPEN and not b._reset_elapsed():
            raise BreakerOpen(f"{b.provider}: breaker open, reset timeout not elapsed")
        if b._trial.locked():
            raise BreakerOpen(f"{b.provider}: breaker {state}, trial call in progress")
        await b._trial.acquire()  # free, as just checked: never waits
        self._trial = True

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        b = self._breaker
        try:
            if b.held_open or b.epoch != self._epoch:
                pass  # the breaker moved on while this attempt ran: its verdict is moot
            elif exc is None:
                b._verdict(None)
            elif isinstance(exc, ProviderFailure):
                b._verdict(exc)
        finally:
            self._release()
        return False

    def _release(self) -> None:
        if self._trial:
            self._trial = False
            self._breaker._trial.release()
