"""What a worker of `serve --workers N` tells the other workers about itself, when they ask.

Each worker serves one document on its seat socket (`WorkerSeat.seat_socket`, a Unix socket in
the supervisor's private runtime directory): a peer connects, reads one JSON line, and the
connection closes. The console uses it to show the whole host: the worker that builds a
snapshot asks the others for their traffic windows and adds them to its own.

Pull, not push, because the figures are wanted rarely and must cost nothing otherwise: nothing
runs on the payment path, nothing runs while nobody watches, and the supervisor holds no copy
of anything (a worker's window lives in that worker, bounded there). The price is that a dead
worker's window goes with it; its traffic stays in the host's Prometheus counters. Asking is
bounded: one connection per other seat, all at once, each within `timeout_s`; a seat that does
not answer in time (restarting, or too busy) is named as missing rather than waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.workers import WorkerSeat

MAX_REPORT_BYTES = 1 << 20
ASK_TIMEOUT_S = 0.5


@dataclass(frozen=True, slots=True)
class PeerReports:
    """The other seats' documents, and the seats that did not answer."""

    reports: list[dict[str, Any]]
    missing: list[int]


class SeatPeers:
    """This worker's seat socket (serving `provide()`) and its way of asking the other seats."""

    def __init__(self, seat: WorkerSeat, *, timeout_s: float = ASK_TIMEOUT_S, log: Any = None) -> None:
        self.seat = seat
        self.workers = seat.workers
        self._timeout_s = timeout_s
        self._log = log
        self._provide: Callable[[], dict[str, Any]] | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self, provide: Callable[[], dict[str, Any]]) -> None:
        """Answer the others with `provide()` (called on the loop, once per question)."""
        self._provide = provide
        # A predecessor's socket file in this seat is replaced (asyncio removes a stale socket).
        self._server = await asyncio.start_unix_server(self._answer, path=str(self.seat.seat_socket()))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _answer(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert self._provide is not None
            writer.write(orjson.dumps(self._provide()) + b"\n")
            await writer.drain()
        except ConnectionError:
            pass  # the asker gave up
        except Exception as exc:  # noqa: BLE001 - a bug here must not take down the worker; the asker sees it missing
            if self._log is not None:
                self._log.error("seat_report_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    async def ask(self) -> PeerReports:
        """Every other seat's document, asked at once, each within the timeout."""
        others = [i for i in range(1, self.workers + 1) if i != self.seat.index]
        answers = await asyncio.gather(*(self._ask(i) for i in others))
        return PeerReports(reports=[a for a in answers if a is not None],
                           missing=[i for i, a in zip(others, answers) if a is None])

    async def _ask(self, index: int) -> dict[str, Any] | None:
        writer = None
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(self.seat.seat_socket(index)),
                                                                    limit=MAX_REPORT_BYTES)
                doc = orjson.loads(await reader.readline())
            return doc if isinstance(doc, dict) else None
        except (OSError, TimeoutError, ValueError):  # not there (restarting), too slow, or cut short
            return None
        finally:
            if writer is not None:
                writer.close()
