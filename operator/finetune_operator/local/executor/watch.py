"""Watch: noticing that pods end. One reaper thread per process (its exit code, as a runtime reports
it, and the `on_exit` callback), and one OOM-killer thread for the pods with a memory limit, which
SIGKILLs a pod whose process tree goes over it, as the kernel's cgroup OOM killer does."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

from finetune_operator.local.executor.podspec import killpg, tree_rss
from finetune_operator.local.executor.state import LocalPod, PodTable, utc_timestamp

MEMORY_POLL_SECONDS = 0.2


class PodWatch:
    """Reaps the pods of `table` as they end and tells `on_exit` (from a background thread)."""

    def __init__(self, table: PodTable, on_exit: Callable[[str], None] | None = None) -> None:
        self._pods = table
        self._on_exit = on_exit
        self._oom_killer: threading.Thread | None = None

    def reap_when_done(self, record: LocalPod) -> None:
        threading.Thread(target=self._reap, args=(record,), name=f"pod-{record.name}", daemon=True).start()

    def _reap(self, record: LocalPod) -> None:
        assert record.proc is not None
        code = record.proc.wait()
        record.exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N
        record.finished_at = utc_timestamp()
        record.done.set()
        self.notify(record.name)

    def notify(self, name: str) -> None:
        if self._on_exit is not None:
            with contextlib.suppress(Exception):  # a callback must not kill the reaper
                self._on_exit(name)

    def enforce_memory_limits(self) -> None:
        """Start the OOM killer if it is not running yet (hold the table's lock)."""
        if self._oom_killer is None:
            killer = threading.Thread(target=self._kill_over_limit, name="pod-oom-killer", daemon=True)
            killer.start()
            self._oom_killer = killer

    def _kill_over_limit(self) -> None:
        while not self._pods.closed.wait(MEMORY_POLL_SECONDS):
            for record in self._pods.running_with_memory_limit():
                if record.proc is not None and tree_rss(record.proc.pid) > (record.memory_limit or 0):
                    record.reason = "OOMKilled"
                    killpg(record.proc.pid, signal.SIGKILL)

    def wait(self, name: str, timeout: float | None = None) -> bool:
        """Block until the pod's process has ended; False on timeout or for an unknown pod."""
        record = self._pods.get(name)
        return record is not None and record.done.wait(timeout)

    def join(self, timeout: float = 5) -> None:
        """Wait for the OOM killer to notice the table closed."""
        if self._oom_killer is not None:
            self._oom_killer.join(timeout=timeout)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
