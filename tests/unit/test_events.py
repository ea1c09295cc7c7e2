"""Events posted off a pass's path (cluster/events.py): a pass never waits on an Event, Events go out
oldest first, one that fails is logged and the next still goes, shutdown drains what is queued."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from finetune_operator.cluster.events import EventQueue
from finetune_operator.cluster.kube import ApiError


def event(reason: str, name: str = "faq") -> dict[str, Any]:
    return {"reason": reason, "involvedObject": {"name": name}}


class Poster:
    """A client's create that waits for `gate` and records what it posted."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.gate = asyncio.Event()
        self.posted: list[str] = []
        self.fail = fail or set()

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.gate.wait()
        if body["reason"] in self.fail:
            raise ApiError(403, "Forbidden", "events is forbidden")
        self.posted.append(body["reason"])
        return body


async def test_put_never_waits_and_events_go_out_in_order() -> None:
    poster = Poster()
    queue = EventQueue(poster)
    for reason in ("Started", "Training", "AttemptCompleted", "ExportStarted"):
        queue.put(event(reason))  # the API is stuck: put still returns at once
    await asyncio.sleep(0.05)
    assert poster.posted == []
    poster.gate.set()
    await queue.close()
    assert poster.posted == ["Started", "Training", "AttemptCompleted", "ExportStarted"]


async def test_a_failed_post_is_logged_and_the_next_event_still_goes(caplog: pytest.LogCaptureFixture) -> None:
    poster = Poster(fail={"Started"})
    poster.gate.set()
    queue = EventQueue(poster)
    caplog.set_level(logging.WARNING, "finetune_operator")
    queue.put(event("Started", "job-a"))
    queue.put(event("Succeeded", "job-b"))
    await queue.close()
    assert poster.posted == ["Succeeded"]
    assert "could not post event Started on job-a: 403 Forbidden" in caplog.text


async def test_a_full_queue_drops_with_one_warning_and_close_gives_up_after_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    poster = Poster()  # never let through
    queue = EventQueue(poster, limit=2)
    caplog.set_level(logging.WARNING, "finetune_operator")
    for i in range(6):  # one is taken by the poster, two wait, three find the queue full
        queue.put(event(f"E{i}"))
        await asyncio.sleep(0)
    assert queue.dropped == 3
    assert caplog.text.count("events dropped") == 1
    await asyncio.wait_for(queue.close(timeout=0.1), 5)  # a stuck API server cannot hold shutdown
    assert poster.posted == []


async def test_close_without_any_event_is_a_no_op() -> None:
    await EventQueue(Poster()).close()
