"""What the executor keeps: each pod's record (its process and how it ended), the table of pods by
name that start, watch, stop and report share, and the directories under the executor's root."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.local.executor.podspec import parse_memory_quantity


def utc_timestamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LocalPod:
    """One pod's first container, run as a local process group."""

    name: str
    dir: Path
    container: str
    started_at: str
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    finished_at: str | None = None
    reason: str | None = None  # forced reason (OOMKilled, StartError)
    start_error: str | None = None
    memory_limit: int | None = None
    fallback_to_logs: bool = True
    done: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def for_container(cls, name: str, pod_dir: Path, container: dict[str, Any], *,
                      enforce_memory: bool) -> LocalPod:  # fmt: skip
        """The record of a container about to start (its memory limit kept when it is enforced)."""
        record = cls(name, pod_dir, container.get("name", "main"), started_at=utc_timestamp())
        record.fallback_to_logs = container.get("terminationMessagePolicy") != "File"
        limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        if limit is not None and enforce_memory:
            record.memory_limit = parse_memory_quantity(limit)
        return record

    @property
    def running(self) -> bool:
        """Its process was started and has not been reaped yet."""
        return self.proc is not None and not self.done.is_set()


class PodTable:
    """The pods by name, guarded by `lock`; `closed` once the executor is closed. Single reads take
    no lock (a dict lookup is atomic); whatever changes the table, or walks it, does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self._pods: dict[str, LocalPod] = {}

    def get(self, name: str) -> LocalPod | None:
        return self._pods.get(name)

    def __getitem__(self, name: str) -> LocalPod:
        return self._pods[name]

    def __contains__(self, name: str) -> bool:
        return name in self._pods

    def add(self, record: LocalPod) -> None:
        """Hold `lock` around the check for the name and this."""
        self._pods[record.name] = record

    def forget(self, record: LocalPod) -> None:
        with self.lock:
            if self._pods.get(record.name) is record:
                del self._pods[record.name]

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._pods)

    def running_with_memory_limit(self) -> list[LocalPod]:
        with self.lock:
            return [p for p in self._pods.values() if p.memory_limit is not None and not p.done.is_set()]

    def close(self) -> list[LocalPod]:
        """Refuse new pods from now on; every pod still held."""
        with self.lock:
            self.closed.set()
            return list(self._pods.values())


class PodDirs:
    """`root/pvcs/<claimName>/` (kept across pods: what makes resume work) and `root/pods/<name>/`."""

    def __init__(self, root: Path) -> None:
        # workers run in their pod directory: relative paths would land there
        self.root = Path(root).resolve()
        (self.root / "pvcs").mkdir(parents=True, exist_ok=True)
        (self.root / "pods").mkdir(parents=True, exist_ok=True)

    def pvc(self, claim: str) -> Path:
        """The local directory that stands for PersistentVolumeClaim `claim` (created)."""
        path = self.root / "pvcs" / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pod(self, name: str) -> Path:
        return self.root / "pods" / name

    def fresh_pod(self, name: str) -> Path:
        """An empty directory for pod `name`: one left by a deleted pod of the same name is removed."""
        path = self.pod(name)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path
