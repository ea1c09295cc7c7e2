"""The local world: what stands for the cluster when `finetune-operator local` runs. The jobs and
their statuses (in memory and in status files under the workdir), the pods reconcile created (run by
a LocalPodExecutor), the claims (directories under `<workdir>/pvcs/`). It observes a job as the
operator reads the API and applies reconcile's plans to itself; it says nothing on the screen."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune_api.spec import SpecError, parse_spec
from finetune_operator.decisions.builders import claim_name
from finetune_operator.decisions.observe import LOG_TAIL_LINES, Observed, observe_pod
from finetune_operator.decisions.reconcile import Plan
from finetune_operator.decisions.status import PHASE_FAILED, PHASE_SUCCEEDED, merge_patch
from finetune_operator.local.executor import LocalPodExecutor

RunningPodSeen = Callable[[str, str], None]  # (job name, pod name): a pod observed Running


class LocalWorld:
    """Jobs (one object or several, uniquely named) and the local pods and claims they own.
    `wake` is set whenever a pod's process ends (and by whoever else needs the runner awake)."""

    def __init__(self, jobs: dict[str, Any] | Sequence[dict[str, Any]], workdir: Path, *,
                 bin_dir: Path | None = None) -> None:  # fmt: skip
        self.jobs: dict[str, dict[str, Any]] = {}
        for job in [jobs] if isinstance(jobs, dict) else jobs:
            if job["metadata"]["name"] in self.jobs:
                raise ValueError(f"two jobs are named {job['metadata']['name']}")
            self.jobs[str(job["metadata"]["name"])] = job
        if not self.jobs:
            raise ValueError("no job to run")
        self.workdir = Path(workdir).resolve()
        self.wake = threading.Event()
        self.executor = LocalPodExecutor(self.workdir, bin_dir=bin_dir, on_exit=lambda _name: self.wake.set())
        self.manifests: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in self.jobs}
        self.claims: set[str] = set()

    @property
    def single(self) -> bool:
        return len(self.jobs) == 1

    def status_file(self, name: str) -> Path:
        return self.workdir / "status.json" if self.single else self.workdir / "status" / f"{name}.json"

    def claim_dir(self, name: str) -> Path:
        """The directory standing for the job's workspace claim.

        Raises:
            SpecError: the job's spec is invalid (so it has no claim).
        """
        return self.workdir / "pvcs" / claim_name(name, parse_spec(self.jobs[name].get("spec")))

    def workspace(self, name: str) -> Path | None:
        try:
            return self.claim_dir(name)
        except SpecError:
            return None

    def observe(self, name: str, on_running: RunningPodSeen | None = None) -> Observed:
        """The job's pods and claim as the operator would read them from the API."""
        job = self.jobs[name]
        pods = []
        for pod, manifest in self.manifests[name].items():
            status = self.executor.status(pod)
            if status is None:  # deleted
                continue
            tail = self.executor.logs(pod, LOG_TAIL_LINES) if status.get("phase") == "Running" else None
            if tail is not None and on_running is not None:
                on_running(name, pod)
            pods.append(observe_pod({"metadata": manifest["metadata"], "status": status}, tail))
        try:
            spec = parse_spec(job.get("spec"))
        except SpecError:
            return Observed(pods=tuple(pods), claim_exists=False)
        claim = claim_name(name, spec)
        if spec.storage.claim_name:  # a named claim is just a directory here
            self.executor.pvc_dir(claim)
        exists = claim in self.claims or (self.workdir / "pvcs" / claim).is_dir()
        src = spec.model.from_job  # what the operator reads from the API: the other job as it is now
        source = copy.deepcopy(self.jobs[src]) if src and src != name and src in self.jobs else None
        return Observed(pods=tuple(pods), claim_exists=exists, source_job=source)

    def apply(self, plan: Plan, name: str) -> None:
        """Create and delete what the plan says and merge its status patch (saved by `save_status`)."""
        for obj in plan.create:
            if obj["kind"] == "PersistentVolumeClaim":
                self.executor.pvc_dir(obj["metadata"]["name"])
                self.claims.add(obj["metadata"]["name"])
            elif obj["kind"] == "Pod":
                self.manifests[name][obj["metadata"]["name"]] = copy.deepcopy(obj)
                self.executor.start(obj)
        for d in plan.delete:
            self.executor.delete(d.name, d.grace_seconds if d.grace_seconds is not None else 30)
        self.jobs[name]["status"] = merge_patch(self.jobs[name]["status"], plan.status or {})

    def save_status(self, name: str) -> None:
        path = self.status_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.jobs[name]["status"], indent=2))
        tmp.replace(path)  # a Ctrl-C mid-write never leaves half a status.json

    def finished(self, name: str) -> bool:
        return self.jobs[name]["status"].get("phase") in (PHASE_SUCCEEDED, PHASE_FAILED)

    def live_pods(self) -> list[tuple[str, str]]:
        """(job name, pod name) of every pod still Running."""
        return [(name, pod) for name, pods in self.manifests.items() for pod in pods
                if (self.executor.status(pod) or {}).get("phase") == "Running"]  # fmt: skip

    def all_done(self) -> bool:
        """Every job Succeeded or Failed, and no pod of theirs still running."""
        return all(self.finished(name) for name in self.jobs) and not self.live_pods()

    def delete_pods(self, grace_seconds: float) -> None:
        for pods in self.manifests.values():
            for pod in list(pods):
                self.executor.delete(pod, grace_seconds)
