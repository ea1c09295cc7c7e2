"""Stop: signals to a pod's processes, as a container runtime sends them. Delete is SIGTERM to the
main process, up to the grace period for it to exit, then SIGKILL to the whole group (a container's
cgroup dies whole); terminate signals without waiting or forgetting, so the ending can be observed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

from finetune_operator.local.executor.podspec import killpg
from finetune_operator.local.executor.state import LocalPod, PodTable
from finetune_operator.local.executor.watch import PodWatch


class PodStopper:
    """Stops the pods of `table`."""

    def __init__(self, table: PodTable, watch: PodWatch) -> None:
        self._pods = table
        self._watch = watch

    def signal(self, name: str, sig: int) -> None:
        """Deliver `sig` to the pod's main process (SIGKILL: to its whole process group).

        Raises:
            KeyError: no such pod.
        """
        record = self._pods[name]
        if not record.running:
            return
        if sig == signal.SIGKILL:
            self._kill_group(record)
        else:
            _signal_main(record, sig)

    def oom_kill(self, name: str) -> None:
        """Kill the pod as the kernel OOM killer would: SIGKILL, reported as reason OOMKilled.

        Raises:
            KeyError: no such pod.
        """
        record = self._pods[name]
        if record.running:
            record.reason = "OOMKilled"
            self._kill_group(record)

    def terminate(self, name: str, *, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) a running pod without waiting or forgetting it."""
        record = self._pods.get(name)
        if record is None or not record.running:
            return
        if kill:
            self._kill_group(record)
        else:
            _signal_main(record, signal.SIGTERM)

    def delete(self, name: str, grace_seconds: float) -> None:
        """Stop the pod (see `stop_and_reap`) and forget it; its emptyDir volumes go with it."""
        record = self._pods.get(name)
        if record is None:
            return
        self.stop_and_reap(record, grace_seconds)
        self._pods.forget(record)
        shutil.rmtree(record.dir / "volumes", ignore_errors=True)

    def stop_and_reap(self, record: LocalPod, grace_seconds: float) -> None:
        """SIGTERM, wait up to `grace_seconds` for the process to exit, then SIGKILL the group."""
        if record.proc is None:
            return
        if not record.done.is_set():
            _signal_main(record, signal.SIGTERM)
            if not record.done.wait(max(0.0, grace_seconds)):
                self._kill_group(record)
                record.done.wait(10)
        self._kill_group(record)  # leftovers in the group (a container's cgroup dies whole)

    def close(self) -> None:
        """Refuse new pods, kill every pod still running and wait for them to be reaped."""
        for record in self._pods.close():
            self.stop_and_reap(record, 0)
        self._watch.join()

    @staticmethod
    def _kill_group(record: LocalPod) -> None:
        assert record.proc is not None
        killpg(record.proc.pid, signal.SIGKILL)


def _signal_main(record: LocalPod, sig: int) -> None:
    assert record.proc is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.proc.pid, sig)
