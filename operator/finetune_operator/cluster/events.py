"""Kubernetes Events posted off a pass's path, as client-go's EventRecorder does.

A pass queues its Events and goes on; one task posts them, oldest first. In a burst of launches
(500 jobs applied at once) the claims, pods and status writes of every pass then go first, and
the Events follow as the API server has room: with Events inline, a job's pod waited behind other
jobs' Events (bench_apiserver.py (b)). An Event is best effort, the status already tells the
story: one that cannot be posted is logged and dropped, and so is one that finds the queue full.

No kopf, no client: `post` is the client's create.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from finetune_operator.cluster.waiting import within

log = logging.getLogger("finetune_operator")
QUEUE_LIMIT = 10_000
DRAIN_SECONDS = 5.0  # at shutdown: post what is queued for at most this long


class EventQueue:
    """`put(event)` never waits; `close()` posts what is left (for at most DRAIN_SECONDS)."""

    def __init__(self, post: Callable[[dict[str, Any]], Awaitable[Any]], limit: int = QUEUE_LIMIT) -> None:
        self._post = post
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(limit)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def put(self, event: dict[str, Any]) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="finetune-events")
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%d events dropped: %d are waiting to be posted", self.dropped, self._queue.qsize())

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._post(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("could not post event %s on %s: %s", event.get("reason"),
                            (event.get("involvedObject") or {}).get("name"), e)  # fmt: skip
            finally:
                self._queue.task_done()

    async def close(self, timeout: float = DRAIN_SECONDS) -> None:
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self._queue.join(), timeout)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
