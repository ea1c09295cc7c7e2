"""The scenarios' view of a cluster: a kubeconfig and a context, driven through kubectl.

Whatever made the cluster (the tier-4 harness, nodecluster.py; kind, tests/e2e/run-kind.sh; any
other), the scenarios only see a `Cluster`: kubectl with `--kubeconfig/--context`, where the
volumes' files are on this host (`host_dir`), and, for the harness's own node, the `node`
handle that can restart its kubelet and containerd. Diagnostics (`dump`) are what a user would
look at: the job's status, pods, logs, Events and the operator's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "manifests" / "samples" / "finetune_v1alpha1_finetunejob_lora.yaml"
OPERATOR_NS = "finetune-system"
IMAGES = ("finetune-operator:dev", "finetune-worker:dev")  # what manifests/kind runs
T = TypeVar("T")


def kubectl_bin() -> str:
    venv = Path(sys.executable).parent / "kubectl"
    return str(venv) if venv.is_file() else "kubectl"


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 2) -> T:
    """Poll `predicate` until it returns something truthy; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Cluster:
    """A cluster reached through `kubeconfig` and `context`.

    `volume_map` maps a PersistentVolume's path on the node to this host ({} where the host cannot
    see it); `node` is the tier-4 harness (None for kind and other clusters)."""

    kubeconfig: Path
    context: str
    name: str
    volume_map: dict[str, Path] = field(default_factory=dict)
    node: Any = None
    versions: dict[str, str] = field(default_factory=dict)

    # -- kubectl ------------------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        argv = [kubectl_bin(), f"--kubeconfig={self.kubeconfig}", f"--context={self.context}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def get(self, *args: str) -> dict[str, Any] | None:
        """`kubectl get ... -o json`, None when it is not found."""
        proc = self.kubectl("get", *args, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(f"kubectl get {' '.join(args)}: {proc.stderr.strip()}")
        return dict(json.loads(proc.stdout))

    def items(self, *args: str) -> list[dict[str, Any]]:
        return list((self.get(*args) or {}).get("items") or [])

    def apply(self, doc: dict[str, Any], namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", "--server-side", *ns, "-f", "-", input=yaml.safe_dump(doc))

    # -- the operator and its jobs -----------------------------------------------------------------

    def install(self) -> None:
        """As README "Quickstart on kind" says: `kubectl apply --server-side -k manifests/kind`."""
        self.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "kind"), timeout=180)
        self.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=60s")
        self.kubectl("-n", OPERATOR_NS, "rollout", "status", "deploy/finetune-operator", "--timeout=300s",
                     timeout=320)  # fmt: skip

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get("-n", namespace, "finetunejob", name) or {}

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.job(namespace, name).get("status") or {})

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self.items("-n", namespace, "pods", "-l", selector)

    def operator_pods(self) -> list[dict[str, Any]]:
        return self.pods(OPERATOR_NS, "app.kubernetes.io/name=finetune-operator")

    def volume_dir(self, namespace: str, claim: str) -> Path | None:
        """Where the files of claim `claim` are on this host, or None where the host cannot see them."""
        pvc = self.get("-n", namespace, "pvc", claim) or {}
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        pv = self.get("pv", pv_name) if pv_name else None
        spec = (pv or {}).get("spec") or {}
        path = (spec.get("local") or spec.get("hostPath") or {}).get("path")
        if not path:
            return None
        for node_prefix, host_dir in self.volume_map.items():
            if path == node_prefix or path.startswith(node_prefix.rstrip("/") + "/"):
                return host_dir / os.path.relpath(path, node_prefix)
        return None

    # -- diagnostics -------------------------------------------------------------------------------

    def dump(self, namespace: str) -> str:
        """Status, pods, logs and Events of a namespace, and the operator's log: what a user reads."""
        out: list[str] = []

        def section(title: str, *args: str) -> None:
            proc = self.kubectl(*args, check=False, timeout=60)
            out.append(f"---- {title}\n{proc.stdout}{proc.stderr}")

        section("jobs", "-n", namespace, "get", "finetunejobs", "-o", "yaml")
        section("describe jobs", "-n", namespace, "describe", "finetunejobs")
        section("pods, claims", "-n", namespace, "get", "pods,pvc", "-o", "wide")
        for pod in self.items("-n", namespace, "pods"):
            name = pod["metadata"]["name"]
            section(f"logs {name}", "-n", namespace, "logs", name, "--tail=60", "--all-containers")
            section(f"describe {name}", "-n", namespace, "describe", "pod", name)
        section("events", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp")
        section("operator pods", "-n", OPERATOR_NS, "get", "pods", "-o", "wide")
        for pod in self.operator_pods():
            name = pod["metadata"]["name"]
            section(f"operator log {name}", "-n", OPERATOR_NS, "logs", name, "--tail=150")
            section(
                f"operator previous log {name}", "-n", OPERATOR_NS, "logs", name, "--previous", "--tail=60"
            )
        section("operator events", "-n", OPERATOR_NS, "get", "events", "--sort-by=.lastTimestamp")
        section("nodes", "describe", "nodes")
        return "\n".join(out)


class PodWatch:
    """`kubectl get pod NAME -w -o json` in a thread: every version of one pod, until it is gone."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.versions: list[dict[str, Any]] = []
        argv = [kubectl_bin(), f"--kubeconfig={cluster.kubeconfig}", f"--context={cluster.context}", "-n",
                namespace, "get", "pod", name, "-w", "-o", "json", "--output-watch-events"]  # fmt: skip
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        decoder, buf = json.JSONDecoder(), ""
        for line in self._proc.stdout:
            buf += line
            while buf.strip():
                try:
                    event, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                self.versions.append({**event.get("object", {}), "_type": event.get("type")})

    def terminated(self, container: str | None = None) -> dict[str, Any] | None:
        """The last seen `state.terminated` of the pod's (first or named) container."""
        for pod in reversed(self.versions):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                if container in (None, cs.get("name")) and (cs.get("state") or {}).get("terminated"):
                    return dict(cs["state"]["terminated"])
        return None

    def first(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        return next((p for p in self.versions if predicate(p)), None)

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._thread.join(5)


def sample_job(max_steps: int) -> dict[str, Any]:
    """The LoRA sample, with spec.training.maxSteps raised so a run lasts long enough to interrupt
    (as tests/e2e/run-kind.sh does with sed)."""
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["spec"]["training"]["maxSteps"] = max_steps
    return dict(doc)


def parse_time(stamp: str) -> float:
    """An RFC 3339 timestamp of the API (second resolution) as epoch seconds."""
    import datetime as dt

    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
