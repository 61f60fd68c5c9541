"""`stop_task`: stops a background task, and never swallows a cancellation meant for its caller."""

from __future__ import annotations

import asyncio

import pytest

from gateway.tasks import stop_task


async def test_stop_task_waits_until_the_task_has_unwound() -> None:
    started, unwound = asyncio.Event(), asyncio.Event()

    async def background() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # unwinding takes a turn of the loop
            unwound.set()

    task = asyncio.create_task(background())
    await started.wait()

    await stop_task(task)

    assert unwound.is_set() and task.cancelled()
    await stop_task(task)  # a stopped task: nothing to do
    await stop_task(None)


async def test_a_cancellation_of_the_caller_is_passed_on() -> None:
    started, unwinding = asyncio.Event(), asyncio.Event()
    went_on: list[str] = []

    async def background() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            unwinding.set()
            await asyncio.Event().wait()  # a slow unwind: the caller's own cancel ends it

    async def caller() -> None:
        await stop_task(task)
        went_on.append("after stop_task")

    task = asyncio.create_task(background())
    await started.wait()
    stopping = asyncio.create_task(caller())
    await unwinding.wait()

    stopping.cancel()

    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert went_on == []
    assert task.cancelled()
