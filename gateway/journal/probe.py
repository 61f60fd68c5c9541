"""Whether the journal takes writes now, for `/readyz`.

A cheap probe every `interval_s` (`Store.ping`: one trivial statement, which on PostgreSQL also
says whether the server is writable), never a round trip per request. While it fails, the
replica reports not ready with the reason, so the load balancer sends its traffic elsewhere;
requests that still arrive get 503 `journal_unavailable` from the store itself. A journal busy
with work (`StoreOverloaded`) is not broken: the probe keeps its last verdict, so a loaded fleet
does not drain itself replica by replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from gateway.journal.errors import JournalUnavailable, StoreOverloaded
from gateway.journal.store import Store


class JournalProbe:
    def __init__(self, store: Store, *, interval_s: float, log: structlog.typing.FilteringBoundLogger,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self._store = store
        self.interval_s = interval_s
        self._log = log
        self._on_change = on_change
        self.ready = True  # the store has just opened
        self.reason: str | None = None

    async def check(self) -> bool:
        try:
            async with asyncio.timeout(self.interval_s):
                await self._store.ping()
        except JournalUnavailable as exc:
            self._set(False, str(exc))
        except TimeoutError:
            self._set(False, f"the journal did not answer within {self.interval_s:g} s")
        except StoreOverloaded:
            pass
        else:
            self._set(True, None)
        return self.ready

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception as exc:  # a bug in one check must not end readiness checks for good
                self._log.exception("journal_probe_failed", error=type(exc).__name__)

    def _set(self, ready: bool, reason: str | None) -> None:
        changed = ready != self.ready
        self.ready, self.reason = ready, reason
        if not changed:
            return
        if ready:
            self._log.info("journal_available")
        else:
            self._log.warning("journal_unavailable", reason=reason)
        if self._on_change is not None:
            self._on_change(ready)
