"""Ctrl-C (and SIGTERM, like Ctrl-C) in `finetune-operator local`: the first asks the workers to
checkpoint and stop (SIGTERM; their attempts end `preempted`), a second one, or the grace period
running out, stops them at once (SIGKILL). Then every interrupted attempt is closed in the status
files, each job is left Pending/Interrupted, and the user is told how to resume; exit 130."""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from finetune_operator.decisions.plan import Settings
from finetune_operator.local.display import StatusDisplay
from finetune_operator.local.story import close_interrupted
from finetune_operator.local.world import LocalWorld

EXIT_INTERRUPTED = 130


class Interruption:
    """Counts the interrupts (the signal handler) and stops `world`'s workers after them."""

    def __init__(self, world: LocalWorld, display: StatusDisplay, settings: Settings) -> None:
        self.world = world
        self.display = display
        self.settings = settings
        self.count = 0

    def handle(self, *_: object) -> None:
        """The SIGINT/SIGTERM handler: count, and wake the runner."""
        self.count += 1
        self.world.wake.set()

    def stop(self) -> int:
        """Stop the workers, record how their attempts ended, say how to resume; exit 130."""
        self.display.screen.end()
        self.display.say("interrupted: the worker checkpoints and stops (Ctrl-C again to stop at once)\n")
        forced = self._stop_workers()
        self._close_attempts(forced)
        self.display.screen.flush()
        return EXIT_INTERRUPTED

    def _stop_workers(self) -> bool:
        """SIGTERM every running pod and wait for them to end; SIGKILL them on a second interrupt or
        when the grace period is over. True when they were killed."""
        executor = self.world.executor
        for _, pod in self.world.live_pods():
            executor.terminate(pod)
        forced, deadline = False, time.monotonic() + self.settings.grace_seconds
        while self.world.live_pods():
            if (self.count > 1 or time.monotonic() > deadline) and not forced:
                forced = True
                self.display.say("stopping now\n")
                for _, pod in self.world.live_pods():
                    executor.terminate(pod, kill=True)
            self.world.wake.wait(0.2)
            self.world.wake.clear()
        return forced

    def _close_attempts(self, forced: bool) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        for name, job in self.world.jobs.items():
            if self.world.finished(name):
                continue
            observed = self.world.observe(name)
            job["status"] = close_interrupted(job, observed, now, self.settings, forced=forced)
            self.world.save_status(name)
            self.display.print_row(name)
            cp = (job["status"].get("checkpoint") or {}).get("name")
            where = f" from {cp}" if cp else " (no checkpoint yet)"
            self.display.screen.write(
                f"{self.display.who(name)}stopped; rerun to resume{where}: "
                f"the same command again (status: {self.world.status_file(name)})\n"
            )


@contextlib.contextmanager
def signals_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `handler` while the block runs (only the main thread can)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if main_thread:
        for sig in previous:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        if main_thread:
            for sig, old in previous.items():
                signal.signal(sig, old)
