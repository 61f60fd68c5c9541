"""Opening the journal at start-up: a database that is not up yet (a fleet and its PostgreSQL
starting together, a database restarting) is waited for, with capped exponential backoff and
one log line per try, for at most `wait_s`; then start-up fails with one line that says why. A
schema mismatch or refused credentials are not waited for: they do not fix themselves."""

from __future__ import annotations

import asyncio
import time

import structlog

from gateway.journal.errors import JournalUnavailable
from gateway.journal.store import Store

FIRST_RETRY_S = 0.25
MAX_RETRY_S = 5.0


async def open_store(store: Store, *, wait_s: float, log: structlog.typing.FilteringBoundLogger) -> None:
    give_up_at = time.monotonic() + wait_s
    delay = FIRST_RETRY_S
    while True:
        try:
            await store.open()
            return
        except JournalUnavailable as exc:
            left = give_up_at - time.monotonic()
            if left <= 0:
                waited = f"; still unavailable after {wait_s:g} s (storage.start_wait_s)" if wait_s else ""
                raise JournalUnavailable(f"journal unavailable at start-up: {exc}{waited}") from exc
            pause = min(delay, left)
            log.warning("journal_unavailable_at_start", reason=str(exc), retry_in_s=round(pause, 3),
                        gives_up_in_s=round(left, 1))
            await asyncio.sleep(pause)
            delay = min(delay * 2, MAX_RETRY_S)
