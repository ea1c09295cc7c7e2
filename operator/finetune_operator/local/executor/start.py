"""Start: a pod manifest becomes a local process group. Its volumes become directories, its env and
args are expanded and their container paths rewritten to those directories, `command[0]` is found
in `bin_dir` or on PATH, and the process starts in its own session with stdout+stderr in the pod's
log. An executable that cannot be started fails the pod as a runtime does (StartError, exit 128)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.local.executor.podspec import (
    SecretReader,
    env_value,
    expand_vars,
    local_rendezvous,
    resolve_executable,
    rewrite_path,
    unmounted_secret_paths,
    volume_mounts,
)
from finetune_operator.local.executor.state import LocalPod, PodDirs, PodTable, utc_timestamp
from finetune_operator.local.executor.watch import PodWatch

TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"  # read by finetune_worker.summary
EXIT_START_ERROR = 128  # what a runtime reports when the executable cannot be started


@dataclass(frozen=True)
class Launch:
    """What a container runs as here: its argv (command[0] not yet looked up), env and working dir."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path


class PodLauncher:
    """Starts pods into `table`, each once by name, and hands their processes to `watch`."""

    def __init__(self, table: PodTable, watch: PodWatch, dirs: PodDirs, *, bin_dir: Path,
                 default_command: list[str], secrets: SecretReader | None,
                 enforce_memory: bool) -> None:  # fmt: skip
        self._pods, self._watch, self._dirs = table, watch, dirs
        self.bin_dir, self.default_command = bin_dir, default_command
        self._secrets = secrets
        self._enforce_memory = enforce_memory
        self._rdzv_ports: dict[str, int] = {}  # a gang's rendezvous id -> its port on 127.0.0.1

    def start(self, pod: dict[str, Any]) -> None:
        """Start the pod's first container as a local process; a no-op if `metadata.name` is known.

        Raises:
            ValueError: the manifest has no name or no containers.
            RuntimeError: the executor is closed.
        """
        name = (pod.get("metadata") or {}).get("name")
        containers = (pod.get("spec") or {}).get("containers") or []
        if not name or not containers:
            raise ValueError("a pod needs metadata.name and at least one container")
        with self._pods.lock:
            if self._pods.closed.is_set():
                raise RuntimeError("executor is closed")
            if name in self._pods:
                return
            container = containers[0]
            record = LocalPod.for_container(name, self._dirs.fresh_pod(name), container,
                                            enforce_memory=self._enforce_memory)  # fmt: skip
            self._pods.add(record)
            self._spawn(record, self._launch(record, pod, container))
            if record.proc is not None:
                self._watch.reap_when_done(record)
            if record.memory_limit is not None:
                self._watch.enforce_memory_limits()
        if record.start_error is not None:
            self._watch.notify(name)

    def _launch(self, record: LocalPod, pod: dict[str, Any], container: dict[str, Any]) -> Launch:
        mounts = volume_mounts(pod, container, record.dir, self._dirs.pvc, self._secrets)
        container_env = self._container_env(pod, container, mounts)
        command = container.get("command") or self.default_command
        argv = [
            rewrite_path(expand_vars(str(a), container_env), mounts)
            for a in [*command, *(container.get("args") or [])]
        ]
        env = dict(os.environ)
        env.pop(TERMINATION_LOG_ENV, None)
        env.update(container_env)
        env[TERMINATION_LOG_ENV] = str(record.dir / "termination-log")
        env.setdefault("PYTHONUNBUFFERED", "1")
        working_dir = container.get("workingDir")
        cwd = Path(rewrite_path(working_dir, mounts)) if working_dir else record.dir
        return Launch(argv=argv, env=env, cwd=cwd)

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any],
                       mounts: list[tuple[str, str]]) -> dict[str, str]:  # fmt: skip
        """The container's own env, expanded and mapped; without a secret reader, values pointing into
        a (then unmounted) secret volume are left out, so the host's variables pass."""
        unmounted = unmounted_secret_paths(pod, container) if self._secrets is None else []
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            value = env_value(item, pod, self._secrets)
            if value is not None and not any(value == m or value.startswith(m + "/") for m in unmounted):
                env[item["name"]] = rewrite_path(expand_vars(value, env), mounts)
        return local_rendezvous(env, self._rdzv_ports)

    def _spawn(self, record: LocalPod, launch: Launch) -> None:
        (record.dir / "termination-log").touch()
        log = open(record.dir / "log", "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            if not launch.argv:
                raise FileNotFoundError("container has no command and the executor no default_command")
            argv = [resolve_executable(launch.argv[0], self.bin_dir), *launch.argv[1:]]
            launch.cwd.mkdir(parents=True, exist_ok=True)
            record.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=launch.env,
                cwd=launch.cwd, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            msg = f"failed to start container {record.container!r}: {e}"
            log.write(msg.encode() + b"\n")
            record.start_error, record.reason = msg, "StartError"
            record.exit_code, record.finished_at = EXIT_START_ERROR, utc_timestamp()
            record.done.set()
        finally:
            log.close()
