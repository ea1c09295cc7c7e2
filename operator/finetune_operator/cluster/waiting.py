"""A wait with a deadline that a cancel always ends.

`asyncio.wait_for` on Python 3.10 and 3.11 loses a cancel that reaches its caller in the same turn
of the event loop as the awaited thing completes: it returns the result instead of raising
CancelledError (python/cpython#86296; 3.12 rebuilt it on `asyncio.timeout`). A loop that waits so
(the scheduler's wake-up, a log stream's next chunk) then never ends, and whatever awaits it at
shutdown waits forever: kopf's cleanup did, and the operator never stopped. `asyncio.wait` raises
its caller's cancel and never its own, so `within` is built on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`awaitable`'s result, or asyncio.TimeoutError once `timeout` seconds pass (None: no deadline).

    As `asyncio.wait_for`: on the deadline or a cancel the awaitable is cancelled and awaited to its
    end, so nothing of it runs on after this returns. Unlike it, a cancel is never lost.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait([task], timeout=timeout)
    except asyncio.CancelledError:
        await _cancel_and_wait(task)
        raise
    if not done:
        await _cancel_and_wait(task)
        if not task.cancelled():  # it ended on its own while being cancelled
            return task.result()
        raise asyncio.TimeoutError
    return task.result()


async def _cancel_and_wait(task: asyncio.Future[T]) -> None:
    task.cancel()
    await asyncio.wait([task])  # raises only the caller's own cancel, never the task's end
    if not task.cancelled():
        task.exception()  # retrieved: asyncio logs no "exception was never retrieved" for it


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set (True) or `timeout` seconds pass (False)."""
    try:
        await within(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True
