"""Run Pod manifests as local processes: the embedded local runner and the test kubelet share this.

One executor, two users (DESIGN.md): `finetune-operator local` drives the real `reconcile` with it,
and the tier-3 test kubelet starts the pods the operator creates in the emulated API with it.

What a pod becomes here:
  - `spec.containers[0]` `command + args` run as one local process in its own session (process
    group); without `command`, the image ENTRYPOINT is `default_command` (`finetune-worker`);
    `$(VAR)` references to the container's env are expanded as the kubelet does; `command[0]` is
    looked up in `bin_dir` (default: the directory of `sys.executable`, i.e. the venv's console
    scripts), then on PATH.
  - env: the host environment, overlaid with the container's `env` (`value`, and `valueFrom.fieldRef`
    for metadata.name/namespace/uid); `FINETUNE_TERMINATION_LOG` points at `pods/<name>/termination-log`.
    Secrets (`secretKeyRef` env, `secret` volumes) are read through `secrets` when given (the test
    kubelet reads the emulator's); without it (the local runner) they are skipped, along with env
    values pointing into a secret volume, so the user's own HF_TOKEN, AWS_* and DOCKER_CONFIG pass.
  - volumes: `persistentVolumeClaim` -> `root/pvcs/<claimName>/` (created, kept across pods, which is
    what makes resume-from-checkpoint work); `emptyDir` and any other kind -> a fresh directory under
    `pods/<name>/volumes/`. Every arg, env value and workingDir equal to or under a `mountPath`
    (also as the value of `--flag=PATH`) is rewritten to the local directory (`subPath` honoured).
    `readOnly` is not enforced: the processes run as this user.
  - a multi-node gang's rendezvous (PET_RDZV_ENDPOINT, the rank-0 pod's DNS name) -> 127.0.0.1 and
    one free port per rendezvous id, so the members of an attempt find each other on this machine.
  - stdout+stderr -> `pods/<name>/log`; status is a Kubernetes PodStatus dict.
  - `resources.limits.memory` is enforced like the kernel's cgroup OOM killer: a pod whose process
    tree's RSS goes over the limit is SIGKILLed and reported as `OOMKilled`, exit code 137.
  - delete = SIGTERM to the main process, wait up to the grace period, then SIGKILL the whole group,
    as a container runtime does.

Pure Python and POSIX only: no kopf, no torch, no API client.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal as _signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .podlocal import (
    SecretReader,
    env_value,
    expand_vars,
    killpg,
    local_rendezvous,
    parse_memory_quantity,
    resolve_executable,
    rewrite_path,
    tree_rss,
    unmounted_secret_paths,
    volume_mounts,
)

TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"  # read by finetune_worker.summary
TERMINATION_MESSAGE_MAX_BYTES = 4096  # what the kubelet keeps of /dev/termination-log
FALLBACK_LOG_LINES = 80  # FallbackToLogsOnError: the last 80 lines ...
FALLBACK_LOG_BYTES = 2048  # ... or 2 KiB, whichever is smaller (kubelet's limits)
EXIT_START_ERROR = 128  # what a runtime reports when the executable cannot be started
MEMORY_POLL_SECONDS = 0.2
DEFAULT_COMMAND = ("finetune-worker",)  # the worker image's ENTRYPOINT (DESIGN.md: one image, one script)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Pod:
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


def read_log_bytes(path: Path, offset: int = 0, tail_lines: int | None = None) -> tuple[bytes, int]:
    """A log file from byte `offset` on (only its last `tail_lines` lines when given), and the offset
    to read on from next time. A missing file is an empty log."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        data = b""
    end = offset + len(data)
    if tail_lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail_lines:]) if tail_lines > 0 else b""
    return data, end


class LocalPodExecutor:
    """Runs Pod manifests (dicts) as local processes under `root` (see the module docstring).

    Args:
        root: holds `pvcs/<claimName>/` and `pods/<name>/`.
        bin_dir: where `command[0]` is looked up first (default: the directory of `sys.executable`).
        on_exit: called with the pod name from a background thread when a pod's process ends.
        enforce_memory_limits: SIGKILL pods over `resources.limits.memory` and report OOMKilled.
        default_command: the image ENTRYPOINT for containers without `command` (the worker image's).
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
        self._secrets = secrets
        self.root = Path(root).resolve()  # workers run in their pod directory: relative paths would land there
        self.default_command = list(default_command)
        self.bin_dir = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self._on_exit = on_exit
        self._enforce_memory = enforce_memory_limits
        self._pods: dict[str, _Pod] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._monitor: threading.Thread | None = None
        self._rdzv_ports: dict[str, int] = {}  # a gang's rendezvous id -> its port on 127.0.0.1
        (self.root / "pvcs").mkdir(parents=True, exist_ok=True)
        (self.root / "pods").mkdir(parents=True, exist_ok=True)

    # -- paths -----------------------------------------------------------------------------------

    def pvc_dir(self, claim: str) -> Path:
        """The local directory that stands for PersistentVolumeClaim `claim` (created)."""
        path = self.root / "pvcs" / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pod_dir(self, name: str) -> Path:
        return self.root / "pods" / name

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, pod: dict[str, Any]) -> None:
        """Start the pod's first container as a local process; a no-op if `metadata.name` is known.

        Raises:
            ValueError: the manifest has no name or no containers.
        """
        meta = pod.get("metadata") or {}
        name = meta.get("name")
        containers = (pod.get("spec") or {}).get("containers") or []
        if not name or not containers:
            raise ValueError("a pod needs metadata.name and at least one container")
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("executor is closed")
            if name in self._pods:
                return
            pod_dir = self.pod_dir(name)
            if pod_dir.exists():  # a previous pod of the same name, deleted: start clean
                shutil.rmtree(pod_dir, ignore_errors=True)
            pod_dir.mkdir(parents=True)
            container = containers[0]
            record = _Pod(name=name, dir=pod_dir, container=container.get("name", "main"), started_at=_now())
            record.fallback_to_logs = container.get("terminationMessagePolicy") != "File"
            limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
            if limit is not None and self._enforce_memory:
                record.memory_limit = parse_memory_quantity(limit)
            self._pods[name] = record
            self._spawn(record, pod, container)
            if record.memory_limit is not None and self._monitor is None:
                self._monitor = threading.Thread(
                    target=self._watch_memory, name="pod-oom-killer", daemon=True
                )
                self._monitor.start()
        if record.start_error is not None:
            self._notify(name)

    def _notify(self, name: str) -> None:
        if self._on_exit is not None:
            with contextlib.suppress(Exception):  # a callback must not kill the reaper
                self._on_exit(name)

    def _spawn(self, record: _Pod, pod: dict[str, Any], container: dict[str, Any]) -> None:
        mounts = volume_mounts(pod, container, record.dir, self.pvc_dir, self._secrets)
        unmounted = unmounted_secret_paths(pod, container) if self._secrets is None else []
        env = dict(os.environ)
        env.pop(TERMINATION_LOG_ENV, None)
        container_env: dict[str, str] = {}
        for item in container.get("env") or []:
            value = env_value(item, pod, self._secrets)
            if value is not None and not any(value == m or value.startswith(m + "/") for m in unmounted):
                container_env[item["name"]] = rewrite_path(expand_vars(value, container_env), mounts)
        container_env = local_rendezvous(container_env, self._rdzv_ports)
        env.update(container_env)
        command = container.get("command") or self.default_command
        argv = [
            rewrite_path(expand_vars(str(a), container_env), mounts)
            for a in [*command, *(container.get("args") or [])]
        ]
        env[TERMINATION_LOG_ENV] = str(record.dir / "termination-log")
        env.setdefault("PYTHONUNBUFFERED", "1")
        (record.dir / "termination-log").touch()
        cwd = (
            Path(rewrite_path(container["workingDir"], mounts)) if container.get("workingDir") else record.dir
        )
        log = open(record.dir / "log", "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            if not argv:
                raise FileNotFoundError("container has no command and the executor no default_command")
            argv[0] = resolve_executable(argv[0], self.bin_dir)
            cwd.mkdir(parents=True, exist_ok=True)
            record.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            msg = f"failed to start container {record.container!r}: {e}"
            log.write(msg.encode() + b"\n")
            record.start_error, record.reason = msg, "StartError"
            record.exit_code, record.finished_at = EXIT_START_ERROR, _now()
            record.done.set()
        finally:
            log.close()
        if record.proc is not None:
            threading.Thread(
                target=self._reap, args=(record,), name=f"pod-{record.name}", daemon=True
            ).start()

    def _reap(self, record: _Pod) -> None:
        assert record.proc is not None
        code = record.proc.wait()
        record.exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N
        record.finished_at = _now()
        record.done.set()
        self._notify(record.name)

    def _watch_memory(self) -> None:
        while not self._closed.wait(MEMORY_POLL_SECONDS):
            with self._lock:
                running = [
                    p for p in self._pods.values() if p.memory_limit is not None and not p.done.is_set()
                ]
            for record in running:
                if record.proc is not None and tree_rss(record.proc.pid) > (record.memory_limit or 0):
                    record.reason = "OOMKilled"
                    killpg(record.proc.pid, _signal.SIGKILL)

    # -- observation -----------------------------------------------------------------------------

    def status(self, name: str) -> dict[str, Any] | None:
        """The pod's Kubernetes PodStatus dict, or None if no such pod was started (or it was deleted)."""
        record = self._pods.get(name)
        if record is None:
            return None
        cstatus: dict[str, Any] = {"name": record.container, "restartCount": 0, "ready": False}
        if not record.done.is_set():
            cstatus["ready"] = True
            cstatus["state"] = {"running": {"startedAt": record.started_at}}
            return {"phase": "Running", "startTime": record.started_at, "containerStatuses": [cstatus]}
        code = record.exit_code if record.exit_code is not None else 1
        reason = record.reason or ("Completed" if code == 0 else "Error")
        terminated = {
            "exitCode": code,
            "reason": reason,
            "startedAt": record.started_at,
            "finishedAt": record.finished_at,
        }
        message = self._termination_message(record, code)
        if message:
            terminated["message"] = message
        cstatus["state"] = {"terminated": terminated}
        return {
            "phase": "Succeeded" if code == 0 else "Failed",
            "startTime": record.started_at,
            "containerStatuses": [cstatus],
        }

    def _termination_message(self, record: _Pod, code: int) -> str:
        try:
            raw = (record.dir / "termination-log").read_bytes()[:TERMINATION_MESSAGE_MAX_BYTES]
        except OSError:
            raw = b""
        message = raw.decode("utf-8", "replace")
        if not message.strip() and code != 0 and record.fallback_to_logs:
            tail = "\n".join(self._read_log(record).splitlines()[-FALLBACK_LOG_LINES:])
            message = tail.encode()[-FALLBACK_LOG_BYTES:].decode("utf-8", "ignore")
        return message

    def logs(self, name: str, tail_lines: int | None = None) -> str:
        """The pod's combined stdout+stderr, or its last `tail_lines` lines.

        Raises:
            KeyError: no such pod.
        """
        record = self._pods.get(name)
        if record is None:
            raise KeyError(name)
        text = self._read_log(record)
        if tail_lines is None:
            return text
        if tail_lines <= 0:
            return ""
        lines = text.splitlines(keepends=True)
        return "".join(lines[-tail_lines:])

    def log_bytes(self, name: str, offset: int = 0, tail_lines: int | None = None) -> tuple[bytes, int, bool]:
        """What a follow stream (`kubectl logs -f`) sends: see `read_log_bytes`, plus whether the
        pod's process had ended before the read (then the bytes are all there will be).

        Raises:
            KeyError: no such pod.
        """
        record = self._pods.get(name)
        if record is None:
            raise KeyError(name)
        ended = record.done.is_set()
        return (*read_log_bytes(record.dir / "log", offset, tail_lines), ended)

    @staticmethod
    def _read_log(record: _Pod) -> str:
        try:
            return (record.dir / "log").read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._pods)

    def wait(self, name: str, timeout: float | None = None) -> bool:
        """Block until the pod's process has ended; False on timeout or for an unknown pod."""
        record = self._pods.get(name)
        return record is not None and record.done.wait(timeout)

    # -- actions ---------------------------------------------------------------------------------

    def signal(self, name: str, sig: int) -> None:
        """Deliver `sig` to the pod's main process (SIGKILL: to its whole process group).

        Raises:
            KeyError: no such pod.
        """
        record = self._pods[name]
        if record.proc is None or record.done.is_set():
            return
        if sig == _signal.SIGKILL:
            killpg(record.proc.pid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.proc.pid, sig)

    def oom_kill(self, name: str) -> None:
        """Kill the pod as the kernel OOM killer would: SIGKILL, reported as reason OOMKilled."""
        record = self._pods[name]
        if record.proc is not None and not record.done.is_set():
            record.reason = "OOMKilled"
            killpg(record.proc.pid, _signal.SIGKILL)

    def delete(self, name: str, grace_seconds: float = 30) -> None:
        """SIGTERM, wait up to `grace_seconds` for the process to exit, then SIGKILL; forget the pod."""
        record = self._pods.get(name)
        if record is None:
            return
        self._stop(record, grace_seconds)
        with self._lock:
            if self._pods.get(name) is record:
                del self._pods[name]
        shutil.rmtree(record.dir / "volumes", ignore_errors=True)

    def _stop(self, record: _Pod, grace_seconds: float) -> None:
        if record.proc is None:
            return
        if not record.done.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.proc.pid, _signal.SIGTERM)
            if not record.done.wait(max(0.0, grace_seconds)):
                killpg(record.proc.pid, _signal.SIGKILL)
                record.done.wait(10)
        killpg(record.proc.pid, _signal.SIGKILL)  # leftovers in the group (a container's cgroup dies whole)

    def terminate(self, name: str, *, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL) a running pod without waiting or forgetting it, so its ending can still
        be observed (the local runner's Ctrl-C)."""
        record = self._pods.get(name)
        if record is None or record.proc is None or record.done.is_set():
            return
        if kill:
            killpg(record.proc.pid, _signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.proc.pid, _signal.SIGTERM)

    def close(self) -> None:
        """Kill every pod still running and wait for them to be reaped."""
        with self._lock:
            self._closed.set()
            records = list(self._pods.values())
        for record in records:
            self._stop(record, 0)
        if self._monitor is not None:
            self._monitor.join(timeout=5)

    def __enter__(self) -> LocalPodExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
