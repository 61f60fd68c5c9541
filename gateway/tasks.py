"""Stopping the gateway's background tasks (reconciler, watchers, sweepers) the one way."""

from __future__ import annotations

import asyncio


async def stop_task(task: asyncio.Task[object] | None) -> None:
    """Cancel `task` and wait until it has unwound, so cleanup runs after it, never beside it.

    The task's own CancelledError is the expected end and is swallowed; a cancellation of the
    caller (a shutdown timeout, say) arrives as a CancelledError from the same `await` and is
    passed on, or the caller would carry on as if nobody had asked it to stop."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
