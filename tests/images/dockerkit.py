"""The Docker CLI for the container tests (tests/images): run a container, wait for it, read its
log and exit code, remove it. Only the `docker` command is used (DOCKER_HOST picks the engine), so
the tests see the images exactly as a user's `docker run` does.

Every container started through `container()` is removed afterwards; when the block fails, its
log is printed first (pytest shows it under "Captured stdout").
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

IMG_OPERATOR = os.environ.get("IMG_OPERATOR") or "finetune-operator:dev"
IMG_WORKER = os.environ.get("IMG_WORKER") or "finetune-worker:dev"
# What a pod's securityContext asks of both (manifests/manager/deployment.yaml, builders.build_pod):
# read-only root, every capability dropped, no privilege escalation (Docker's default seccomp applies).
LOCKED_DOWN = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
T = TypeVar("T")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`docker ARGS...`; raises AssertionError with its output when it fails and `check` is set."""
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def inspect(image_or_container: str, template: str) -> str:
    return docker("inspect", "-f", template, image_or_container).stdout.strip()


class Container:
    """A container started with `docker run -d`, by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        res = docker("logs", self.name, check=False)
        return res.stdout + res.stderr

    def lines(self) -> list[dict[str, Any]]:
        """The worker's JSON lines on stdout ({"event": ...}), in order; other lines are skipped."""
        out = []
        for line in docker("logs", self.name, check=False).stdout.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def running(self) -> bool:
        return inspect(self.name, "{{.State.Running}}") == "true"

    def wait(self, timeout: float) -> int:
        """Its exit code, once it has exited (AssertionError after `timeout` seconds)."""
        res = docker("wait", self.name, timeout=timeout)
        return int(res.stdout.strip().splitlines()[-1])

    def stop(self, grace: int) -> int:
        """`docker stop`: SIGTERM, SIGKILL after `grace` seconds; returns the exit code."""
        docker("stop", "-t", str(grace), self.name, timeout=grace + 60)
        return int(inspect(self.name, "{{.State.ExitCode}}"))


@contextlib.contextmanager
def container(image: str, *args: str, flags: list[str] | None = None, prefix: str = "finetune-test") -> Iterator[Container]:
    """`docker run -d [flags] IMAGE ARGS...`; its log is printed if the block fails; removed after."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, *(flags or []), image, *args)
    c = Container(name)
    try:
        yield c
    except BaseException:
        print(f"---- docker logs {name} (exit code {inspect(name, '{{.State.ExitCode}}')})\n{c.logs()[-12000:]}")
        raise
    finally:
        docker("rm", "-f", name, check=False)


def run(image: str, *args: str, flags: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`docker run --rm [flags] IMAGE ARGS...` to the end (not checked: read returncode)."""
    return docker("run", "--rm", *(flags or []), image, *args, timeout=timeout, check=False)


def wait_for(probe: Callable[[], T], timeout: float, what: str, box: Container | None = None, every: float = 0.5) -> T:
    """Poll `probe` until it returns something truthy; fails after `timeout` seconds, sooner if
    the container `box` has exited meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if box is not None and not box.running():
            raise AssertionError(f"{box.name} exited (code {inspect(box.name, '{{.State.ExitCode}}')}) "
                                 f"before {what}")  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
