"""Stopping the gateway's background tasks (reconciler, watchers, sweepers) the one way."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_task(task: asyncio.Task[object] | None) -> None:
    """Cancel `task` and wait until it has unwound, so cleanup runs after it, never beside it."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
