"""Stopping the gateway's background tasks (reconciler, watchers, sweepers) the one way."""

from __future__ import annotations

import asyncio


async def stop_task(task: asyncio.Task[object] | None) -> None:
    """Cancel `task` and wait until it has unwound, so cleanup runs after it, never beside it.

    The task's own CancelledError is the expected end and is swallowed. A cancellation of the
    caller that arrives *while it waits* (a shutdown timeout, say) comes as a CancelledError from
    the same `await` and is passed on, or the caller would carry on as if nobody had asked it to
    stop. One that was already under way when it started waiting (aiohttp's run_app runs the
    app's cleanup inside the cancelled main task on SIGTERM) is not this wait's to re-raise."""
    if task is None or task.done():
        return
    current = asyncio.current_task()
    cancelling = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > cancelling:
            raise
