"""SIGTERM as a request to stop at the next safe point (the exit-75 contract), for train and export.

Deliberately light (stdlib only): `finetune-worker` installs the watch first thing, before torch and
transformers load, so a SIGTERM that arrives during start-up or model load is recorded rather than
killing the process with 143. Training honours it at the next step boundary (or before the first
step), export at the next stage or shard boundary.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class PreemptionWatch:
    """Records SIGTERM (and SIGINT) instead of dying, so the worker can stop at a safe point.

    The handler only records: writing from a signal handler can fail with a reentrant-call error
    when the signal lands inside another write to stdout. Whoever acts on the request reports it.
    """

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionWatch:
        """Take over SIGTERM/SIGINT; a no-op off the main thread (in-process callers keep their own handling)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking early once a stop is requested (test pause hooks use this)."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(0.05)


@contextmanager
def watching(watch: PreemptionWatch | None) -> Iterator[PreemptionWatch]:
    """The caller's watch (the CLI's, installed at start-up), or one installed for the block's duration."""
    if watch is not None:
        yield watch
        return
    own = PreemptionWatch().install()
    try:
        yield own
    finally:
        own.uninstall()
