"""Live progress of running pods: one `pods/log?follow=true` stream per pod, not a read per interval.

A follow stream is how `kubectl logs -f` reads: one long-running request for the life of the pod
(the API server counts it once and, as for watches, exempts it from its in-flight limits), where a
tail read every FINETUNE_RESYNC_SECONDS costs one request each time. The stream keeps the pod's
last LOG_TAIL_LINES lines, at most TAIL_BYTES, in memory; reconcile reads them from there, so a
Training job costs the API server at most one request per interval: its status write, when
progress moved.

Anything that stops the stream is answered the same way: after `retry_seconds` it is opened again
and the tail is read afresh (tailLines: nothing recent is missed, nothing is counted twice). A
failure (a 5xx from an unreachable kubelet, a refused connection, a timeout) is kept as the reason
progress is stale until a stream opens again. A clean end (the container exited, the server
restarted) and a stream silent for `read_timeout` (it may be half-open) are no error. Nothing here
ever holds a reconcile pass: passes read `tail()`, which never waits.

No kopf and no API client here: the stream comes from an `Opener` (kube.Kube.follow_log).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from finetune_operator.cluster.waiting import within

Key = tuple[str, str]  # (namespace, pod)
# (namespace, pod, tailLines) -> an async context manager yielding the log's byte chunks
Opener = Callable[[str, str, int], AbstractAsyncContextManager[AsyncIterator[bytes]]]
TAIL_BYTES = 64 * 1024  # the tail kept per pod; progress lines are well under 1 KiB
LINE_BYTES = 16 * 1024  # a longer line is cut here (it is not a progress line)
log = logging.getLogger("finetune_operator")


@dataclass(frozen=True)
class Tail:
    """The last lines of a pod's log as the stream delivered them, or why it could not be read."""

    read_at: float  # time.monotonic() of the last data (or failure)
    text: str | None
    error: str | None = None


class _Lines:
    """The last `count` lines of a byte stream, at most TAIL_BYTES, each at most LINE_BYTES."""

    def __init__(self, count: int) -> None:
        self.lines: collections.deque[bytes] = collections.deque(maxlen=count)
        self.size = 0
        self.partial = b""

    def feed(self, chunk: bytes) -> bool:
        """Take a chunk; True when at least one whole line was added."""
        data = self.partial + chunk
        *whole, self.partial = data.split(b"\n")
        self.partial = self.partial[:LINE_BYTES]
        for line in whole:
            self._add(line[:LINE_BYTES])
        return bool(whole)

    def _add(self, line: bytes) -> None:
        if self.lines.maxlen is not None and len(self.lines) == self.lines.maxlen:
            self.size -= len(self.lines[0])
        self.lines.append(line)
        self.size += len(line)
        while self.size > TAIL_BYTES and len(self.lines) > 1:
            self.size -= len(self.lines.popleft())

    def text(self) -> str:
        return b"\n".join(self.lines).decode("utf-8", "replace")


class LogFollower:
    """One follow stream per pod asked for (`tail`), until `stop` (see the module docstring)."""

    def __init__(self, opener: Opener, retry_seconds: float, tail_lines: int, read_timeout: float = 300.0,
                 describe: Callable[[BaseException], str] = str) -> None:  # fmt: skip
        self._open = opener
        self.retry_seconds = retry_seconds
        self.tail_lines = tail_lines
        self.read_timeout = read_timeout  # a stream silent this long is opened again
        self._describe = describe
        self._tails: dict[Key, Tail] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self.opened = 0  # streams opened, for tests and the benchmark

    def tail(self, namespace: str, pod: str) -> Tail | None:
        """The pod's tail as last streamed (None before any data); starts following it if needed."""
        key = (namespace, pod)
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._follow(key), name=f"log {namespace}/{pod}")
        return self._tails.get(key)

    def following(self) -> set[Key]:
        return set(self._tasks)

    def stop(self, namespace: str, pod: str) -> None:
        task = self._tasks.pop((namespace, pod), None)
        self._tails.pop((namespace, pod), None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._tails.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, key: Key) -> None:
        namespace, pod = key
        last_error: str | None = None
        while True:
            try:
                await self._stream(key)
                last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                error = f"cannot read the log of pod {pod}: {self._describe(e)}"
                previous = self._tails.get(key)
                self._tails[key] = Tail(time.monotonic(), previous.text if previous else None, error)
                if error != last_error:
                    log.warning("[%s/%s] %s", namespace, pod, error)
                last_error = error
            await asyncio.sleep(self.retry_seconds)

    async def _stream(self, key: Key) -> None:
        """One stream, from open to its end. Its first line replaces the previous stream's tail."""
        lines = _Lines(self.tail_lines)
        self.opened += 1
        async with self._open(key[0], key[1], self.tail_lines) as chunks:
            previous = self._tails.get(key)
            if previous is not None and previous.error:  # open again: progress is no longer stale
                self._tails[key] = Tail(time.monotonic(), previous.text)
            iterator = chunks.__aiter__()
            while True:
                try:
                    chunk = await within(iterator.__anext__(), self.read_timeout)
                except (StopAsyncIteration, asyncio.TimeoutError):
                    break  # ended, or silent so long the connection may be half-open: open again
                if lines.feed(chunk):
                    self._tails[key] = Tail(time.monotonic(), lines.text())
        if lines.partial:  # the last line of an ended stream has no newline yet
            lines.feed(b"\n")
            self._tails[key] = Tail(time.monotonic(), lines.text())
