"""logfollow.LogFollower against scripted streams: what a pass reads (`tail`), bounds, reopening,
stale on failure and fresh again after, and stopping."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from finetune_operator.cluster import logfollow
from finetune_operator.cluster.logfollow import LogFollower
from finetune_operator.decisions.observe import parse_log_tail


class Server:
    """Scripted streams: each open takes the next script, a list of byte chunks, an exception to
    raise on open, or "hang" (a stream that sends nothing and stays open)."""

    def __init__(self, *scripts: Any) -> None:
        self.scripts = list(scripts)
        self.opens: list[tuple[str, str, int]] = []
        self.closed: list[str] = []

    @contextlib.asynccontextmanager
    async def open(self, namespace: str, pod: str, tail_lines: int) -> AsyncIterator[AsyncIterator[bytes]]:
        self.opens.append((namespace, pod, tail_lines))
        script = self.scripts.pop(0) if self.scripts else "hang"
        if isinstance(script, BaseException):
            raise script

        async def chunks() -> AsyncIterator[bytes]:
            if script == "hang":
                await asyncio.sleep(3600)
            for chunk in script:
                await asyncio.sleep(0)
                yield chunk

        try:
            yield chunks()
        finally:
            self.closed.append(pod)


def progress(step: int) -> bytes:
    return json.dumps({"event": "progress", "step": step, "totalSteps": 10}).encode() + b"\n"


async def settle(until: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not until():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_the_tail_follows_the_stream_across_chunk_boundaries() -> None:
    server = Server([b"starting\n", progress(1)[:10], progress(1)[10:] + progress(2)], "hang")
    follower = LogFollower(server.open, retry_seconds=0.01, tail_lines=40)
    assert follower.tail("ml", "p") is None  # nothing streamed yet; the pass does not wait
    await settle(lambda: (t := follower.tail("ml", "p")) and "starting" in (t.text or "") and '"step": 2' in t.text)
    tail = follower.tail("ml", "p")
    assert tail is not None and tail.error is None
    assert parse_log_tail(tail.text)[0] == {"step": 2, "totalSteps": 10}
    assert server.opens == [("ml", "p", 40)], "one stream, opened once"
    await follower.close()


async def test_the_tail_is_bounded_in_lines_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfollow, "TAIL_BYTES", 4096)
    huge = b"x" * (3 * logfollow.LINE_BYTES) + b"\n"
    server = Server([huge, *(progress(i) for i in range(100)), huge, progress(100)], "hang")
    follower = LogFollower(server.open, retry_seconds=0.01, tail_lines=5)
    follower.tail("ml", "p")
    await settle(lambda: (t := follower.tail("ml", "p")) and '"step": 100' in (t.text or ""))
    text = follower.tail("ml", "p").text or ""  # type: ignore[union-attr]
    assert len(text.encode()) <= 4096 and len(text.splitlines()) <= 5
    assert parse_log_tail(text)[0] == {"step": 100, "totalSteps": 10}
    await follower.close()


async def test_an_ended_stream_is_opened_again_and_its_tail_replaces_the_old() -> None:
    server = Server([progress(3)], [progress(7)], "hang")
    follower = LogFollower(server.open, retry_seconds=0.01, tail_lines=40)
    follower.tail("ml", "p")
    await settle(lambda: len(server.opens) == 3)
    tail = follower.tail("ml", "p")
    assert tail is not None and tail.error is None and parse_log_tail(tail.text)[0] == {"step": 7, "totalSteps": 10}
    await follower.close()


async def test_a_failure_is_stale_progress_until_a_stream_opens_again(caplog: pytest.LogCaptureFixture) -> None:
    outage = RuntimeError("500 InternalError")
    server = Server([progress(4)], outage, outage, outage, "hang")
    follower = LogFollower(server.open, retry_seconds=0.01, tail_lines=40, describe=lambda e: str(e))
    follower.tail("ml", "p")
    await settle(lambda: len(server.opens) >= 3)
    tail = follower.tail("ml", "p")
    assert tail is not None and tail.error == "cannot read the log of pod p: 500 InternalError"
    assert parse_log_tail(tail.text)[0] == {"step": 4, "totalSteps": 10}, "the last known progress is kept"
    await settle(lambda: len(server.opens) == 5 and not follower.tail("ml", "p").error)  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if "cannot read the log" in r.getMessage()]
    assert len(warnings) == 1, "one line per distinct error, not one per retry"
    await follower.close()


async def test_a_silent_stream_is_opened_again_without_going_stale() -> None:
    server = Server("hang", [progress(5)], "hang")
    follower = LogFollower(server.open, retry_seconds=0.01, tail_lines=40, read_timeout=0.05)
    follower.tail("ml", "p")
    await settle(lambda: len(server.opens) >= 2 and follower.tail("ml", "p") is not None)
    tail = follower.tail("ml", "p")
    assert tail is not None and tail.error is None and parse_log_tail(tail.text)[0] == {"step": 5, "totalSteps": 10}
    await follower.close()


async def test_stop_closes_the_stream_and_forgets_the_tail() -> None:
    server = Server([progress(1)], "hang")
    follower = LogFollower(server.open, retry_seconds=0.01, tail_lines=40)
    follower.tail("ml", "p")
    await settle(lambda: follower.tail("ml", "p") is not None)
    follower.tail("ml", "q")
    follower.stop("ml", "p")
    await settle(lambda: "p" in server.closed)
    assert follower.following() == {("ml", "q")} and follower.tail("ml", "q") is None
    opens = [o for o in server.opens if o[1] == "p"]
    await asyncio.sleep(0.05)
    assert [o for o in server.opens if o[1] == "p"] == opens, "a stopped pod's stream is not opened again"
    await follower.close()
    assert follower.following() == set() and "q" in server.closed


async def test_close_ends_a_stream_whose_chunk_arrives_as_it_is_cancelled() -> None:
    """A chunk delivered in the same turn of the loop as close()'s cancel must not cost the cancel
    (asyncio.wait_for on 3.11 lost it: the stream read on, and close() waited forever)."""
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def open_(namespace: str, pod: str, tail_lines: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async def stream() -> AsyncIterator[bytes]:
            while True:
                yield await chunks.get()

        yield stream()

    follower = LogFollower(open_, retry_seconds=0.01, tail_lines=40)
    follower.tail("ml", "p")
    chunks.put_nowait(progress(1))
    await settle(lambda: follower.tail("ml", "p") is not None)
    chunks.put_nowait(progress(2))  # the next chunk...
    closing = asyncio.ensure_future(follower.close())  # ...and the cancel, in one turn
    done, _ = await asyncio.wait([closing], timeout=2)
    assert done, "close() did not return: the stream went on reading after its cancel"
