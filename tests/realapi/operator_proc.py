"""The real operator, `finetune-operator run`, as its own process against the tier-3b API server.

It logs in with a kubeconfig whose user is the operator's service account name, so the RBAC of
manifests/rbac is what it gets. Readiness is read from the API server's audit log: the operator
is ready once it has opened its watch on FineTuneJobs. `kill()` is a SIGKILL (a lost pod), `stop()`
a SIGTERM (a rollout); the process's CPU time and RSS are there for the benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from controlplane import OPERATOR_USER, ControlPlane, cpu_seconds, wait_for


def audit_events(path: Path, offset: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset after the line, event) for each audit event from byte `offset` on."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return  # a line still being written
            offset += len(line)
            if line.strip():
                yield offset, json.loads(line)


def audit_offset(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class OperatorProcess:
    """`finetune-operator run -n NAMESPACE...` with the operator's kubeconfig (its token; or
    `kubeconfig`) and `env` overrides."""

    def __init__(self, cp: ControlPlane, namespaces: list[str], env: dict[str, str] | None = None,
                 log: Path | None = None, verbose: bool = False, kubeconfig: Path | None = None) -> None:  # fmt: skip
        self.cp = cp
        self.kubeconfig = kubeconfig or cp.kubeconfig_path("operator")
        self.namespaces = namespaces
        self.env = env or {}
        self.log = log or cp.root / f"operator-{'-'.join(namespaces)[:60]}.log"
        self.verbose = verbose
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60) -> OperatorProcess:
        if self.alive:
            raise RuntimeError("the operator is already running")
        env = {k: v for k, v in os.environ.items() if k not in ("FINETUNE_KUBE_SERVER", "KUBERNETES_SERVICE_HOST")}
        env.update(self.env, KUBECONFIG=str(self.kubeconfig))
        argv = [sys.executable, "-m", "finetune_operator.cli", "run", "--liveness-port", "0", "--metrics-port", "0"]
        for ns in self.namespaces:
            argv += ["-n", ns]
        if self.verbose:
            argv.append("-v")
        offset = audit_offset(self.cp.audit_log)
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} {time.strftime('%H:%M:%S')}\n".encode())
            self.popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # fmt: skip
        self.starts += 1
        self.wait_watching(offset, timeout)
        return self

    def wait_watching(self, offset: int, timeout: float) -> None:
        """Wait until the operator has opened its FineTuneJob watch (seen in the audit log)."""

        def watching() -> bool:
            if self.popen is None or self.popen.poll() is not None:
                raise RuntimeError(f"the operator exited ({self.popen and self.popen.returncode}):\n{self.tail()}")
            for _, ev in audit_events(self.cp.audit_log, offset):
                ref = ev.get("objectRef") or {}
                if (ev.get("user", {}).get("username") == OPERATOR_USER and ev.get("verb") == "watch"
                        and ref.get("resource") == "finetunejobs"):  # fmt: skip
                    return True
            return False

        wait_for(watching, timeout, 0.2, what="the operator to watch FineTuneJobs")

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM and wait (kopf exits cleanly); SIGKILL after `timeout`."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.popen = None

    def kill(self) -> None:
        """SIGKILL, as a node lost with the operator's pod."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self.popen = None

    def restart(self, timeout: float = 60) -> OperatorProcess:
        self.stop()
        return self.start(timeout)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> int:
        try:
            return sum(1 for _ in self.log.open("rb"))
        except OSError:
            return 0

    def cpu_seconds(self) -> float:
        assert self.popen is not None
        return cpu_seconds(self.popen.pid)

    def rss(self) -> int:
        assert self.popen is not None
        return int(psutil.Process(self.popen.pid).memory_info().rss)

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
