"""LocalPodExecutor: the one object both users hold. Each of its calls is handed to the room that
does it: start (start.py), watch (watch.py), stop (stop.py), report (report.py), over the shared
pod table and directories (state.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune_operator.local.executor.podspec import SecretReader
from finetune_operator.local.executor.report import PodReporter
from finetune_operator.local.executor.start import PodLauncher
from finetune_operator.local.executor.state import PodDirs, PodTable
from finetune_operator.local.executor.stop import PodStopper
from finetune_operator.local.executor.watch import PodWatch

DEFAULT_COMMAND = ("finetune-worker",)  # the worker image's ENTRYPOINT (DESIGN.md: one image, one script)


class LocalPodExecutor:
    """Runs Pod manifests (dicts) as local processes under `root` (see the package docstring).

    Args:
        root: holds `pvcs/<claimName>/` and `pods/<name>/`.
        bin_dir: where `command[0]` is looked up first (default: the directory of `sys.executable`).
        on_exit: called with the pod name from a background thread when a pod's process ends.
        enforce_memory_limits: SIGKILL pods over `resources.limits.memory` and report OOMKilled.
        default_command: the image ENTRYPOINT for containers without `command` (the worker image's).
        secrets: reads a Secret's data by (namespace, name) for `secretKeyRef` env and `secret`
            volumes (the test kubelet); without it they are skipped (the local runner).
    """

    def __init__(
        self,
        root: Path,
        *,
        bin_dir: Path | None = None,
        on_exit: Callable[[str], None] | None = None,
        enforce_memory_limits: bool = True,
        default_command: Sequence[str] = DEFAULT_COMMAND,
        secrets: SecretReader | None = None,
    ) -> None:
        self._dirs = PodDirs(root)
        self._pods = PodTable()
        self._watch = PodWatch(self._pods, on_exit)
        self._launcher = PodLauncher(
            self._pods, self._watch, self._dirs,
            bin_dir=Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent,
            default_command=list(default_command), secrets=secrets, enforce_memory=enforce_memory_limits,
        )  # fmt: skip
        self._stopper = PodStopper(self._pods, self._watch)
        self._reporter = PodReporter(self._pods)

    @property
    def root(self) -> Path:
        return self._dirs.root

    @property
    def bin_dir(self) -> Path:
        return self._launcher.bin_dir

    @property
    def default_command(self) -> list[str]:
        return self._launcher.default_command

    def pvc_dir(self, claim: str) -> Path:
        """The local directory that stands for PersistentVolumeClaim `claim` (created)."""
        return self._dirs.pvc(claim)

    def pod_dir(self, name: str) -> Path:
        return self._dirs.pod(name)

    # -- start -----------------------------------------------------------------------------------

    def start(self, pod: dict[str, Any]) -> None:
        """Start the pod's first container as a local process; a no-op if `metadata.name` is known.

        Raises:
            ValueError: the manifest has no name or no containers.
            RuntimeError: the executor is closed.
        """
        self._launcher.start(pod)

    # -- watch and report ------------------------------------------------------------------------

    def wait(self, name: str, timeout: float | None = None) -> bool:
        """Block until the pod's process has ended; False on timeout or for an unknown pod."""
        return self._watch.wait(name, timeout)

    def names(self) -> list[str]:
        return self._pods.names()

    def status(self, name: str) -> dict[str, Any] | None:
        """The pod's Kubernetes PodStatus dict, or None if no such pod was started (or it was deleted)."""
        return self._reporter.status(name)

    def logs(self, name: str, tail_lines: int | None = None) -> str:
        """The pod's combined stdout+stderr, or its last `tail_lines` lines (KeyError: no such pod)."""
        return self._reporter.logs(name, tail_lines)

    def log_bytes(self, name: str, offset: int = 0, tail_lines: int | None = None) -> tuple[bytes, int, bool]:
        """What a follow stream (`kubectl logs -f`) sends: the log from byte `offset` on, the offset
        to read on from, and whether the pod had ended before the read (KeyError: no such pod)."""
        return self._reporter.log_bytes(name, offset, tail_lines)

    # -- stop ------------------------------------------------------------------------------------

    def signal(self, name: str, sig: int) -> None:
        """Deliver `sig` to the pod's main process (SIGKILL: to its whole group; KeyError: no such pod)."""
        self._stopper.signal(name, sig)

    def oom_kill(self, name: str) -> None:
        """Kill the pod as the kernel OOM killer would: SIGKILL, reported as reason OOMKilled."""
        self._stopper.oom_kill(name)

    def delete(self, name: str, grace_seconds: float = 30) -> None:
        """SIGTERM, wait up to `grace_seconds` for the process to exit, then SIGKILL; forget the pod."""
        self._stopper.delete(name, grace_seconds)

    def terminate(self, name: str, *, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) a running pod without waiting or forgetting it, so its ending can still
        be observed (the local runner's Ctrl-C)."""
        self._stopper.terminate(name, kill=kill)

    def close(self) -> None:
        """Kill every pod still running and wait for them to be reaped."""
        self._stopper.close()

    def __enter__(self) -> LocalPodExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
