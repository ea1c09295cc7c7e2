"""`finetune-operator local FILE.yaml`: the embedded default, no cluster needed.

It drives the same `reconcile` as the in-cluster operator, with a LocalPodExecutor in place of
the API server and kubelet: the pods reconcile plans are run as local processes, the workspace
claim is a local directory (`<workdir>/pvcs/<claim>/`), the job's status lives in memory and in
`<workdir>/status.json`. It prints the status transitions as `kubectl get ftj -w` would and ends
with the path of the exported model; exit 0 on Succeeded, 1 on Failed, 130 on Ctrl-C (after
stopping the worker gracefully, so a rerun with the same --workdir resumes from its checkpoint).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import yaml

from .builders import claim_name
from .contract import API_VERSION, EXPORT_DIR, KIND
from .executor import LocalPodExecutor
from .observe import LOG_TAIL_LINES, Observed, observe_pod
from .reconcile import Plan, Settings, reconcile
from .spec import SpecError, parse_spec
from .status import PHASE_FAILED, PHASE_SUCCEEDED

LOCAL_SETTINGS = Settings(worker_image="local", grace_seconds=60, backoff_base=2.0, backoff_max=30.0,
                          progress_interval=1.0, pending_interval=1.0)  # fmt: skip
COLUMNS = ("NAME", "PHASE", "PROGRESS", "CHECKPOINT", "RESTARTS", "AGE")


def load_job(path: Path) -> dict[str, Any]:
    """A FineTuneJob object from a YAML/JSON file (a whole object, or just its spec).

    Raises:
        SpecError: not a FineTuneJob.
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(str(path), f"cannot read: {e}") from None
    if not isinstance(doc, dict):
        raise SpecError(str(path), "must hold a FineTuneJob (an object)")
    if "spec" not in doc and "kind" not in doc:
        doc = {"spec": doc}
    if doc.get("kind", KIND) != KIND:
        raise SpecError("kind", f"expected {KIND}, got {doc.get('kind')!r}")
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("name", path.stem.replace("_", "-").lower())
    meta["namespace"] = meta.get("namespace") or "default"
    meta.update(uid=str(uuid.uuid4()), generation=1)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": doc.get("spec") or {},
        "status": {},
    }


def age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s < 600 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60}m"


class LocalRunner:
    """Runs one FineTuneJob to the end with local processes (see the module docstring)."""

    def __init__(self, job: dict[str, Any], workdir: Path, *, out: TextIO = sys.stdout,
                 settings: Settings = LOCAL_SETTINGS, bin_dir: Path | None = None) -> None:  # fmt: skip
        self.job = job
        self.workdir = Path(workdir)
        self.out = out
        self.settings = settings
        self.wake = threading.Event()
        self.executor = LocalPodExecutor(self.workdir, bin_dir=bin_dir, on_exit=lambda _name: self.wake.set())
        self.manifests: dict[str, dict[str, Any]] = {}
        self.claims: set[str] = set()
        self.started = time.monotonic()
        self._last_row: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return str(self.job["metadata"]["name"])

    def observe(self) -> Observed:
        pods = []
        for name, manifest in self.manifests.items():
            status = self.executor.status(name)
            if status is None:  # deleted
                continue
            tail = self.executor.logs(name, LOG_TAIL_LINES) if status.get("phase") == "Running" else None
            pods.append(observe_pod({"metadata": manifest["metadata"], "status": status}, tail))
        try:
            spec = parse_spec(self.job.get("spec"))
            claim = claim_name(self.name, spec)
            if spec.storage.claim_name:  # a named claim is just a directory here
                self.executor.pvc_dir(claim)
            exists = claim in self.claims or (self.workdir / "pvcs" / claim).is_dir()
        except SpecError:
            exists = False
        return Observed(pods=tuple(pods), claim_exists=exists)

    def apply(self, plan: Plan) -> None:
        for obj in plan.create:
            if obj["kind"] == "PersistentVolumeClaim":
                self.executor.pvc_dir(obj["metadata"]["name"])
                self.claims.add(obj["metadata"]["name"])
            elif obj["kind"] == "Pod":
                self.manifests[obj["metadata"]["name"]] = copy.deepcopy(obj)
                self.executor.start(obj)
        for d in plan.delete:
            self.executor.delete(d.name, d.grace_seconds if d.grace_seconds is not None else 30)
        for key, value in (plan.status or {}).items():
            if value is None:
                self.job["status"].pop(key, None)
            else:
                self.job["status"][key] = value
        for ev in plan.events:  # what `kubectl describe` would show: why a row changed
            if ev["type"] == "Warning" or ev["reason"] in ("Resumed", "AttemptPreempted", "AttemptEvicted"):
                self.out.write(f"  {ev['type']} {ev['reason']}: {ev['message']}\n")
        if plan.status:
            (self.workdir / "status.json").write_text(json.dumps(self.job["status"], indent=2))
        self.print_row()

    def print_row(self) -> None:
        st = self.job["status"]
        pct = (st.get("progress") or {}).get("percent")
        row = (self.name, str(st.get("phase") or ""), f"{pct:.0f}%" if isinstance(pct, (int, float)) else "",
               str((st.get("checkpoint") or {}).get("name") or ""), str(st.get("restarts", 0)))  # fmt: skip
        if row != self._last_row:
            if self._last_row is None:
                self.out.write(_format(COLUMNS))
            self.out.write(_format((*row, age(time.monotonic() - self.started))))
            self.out.flush()
            self._last_row = row

    def run(self, timeout: float | None = None) -> int:
        """Reconcile until the job finishes; the exit code of `finetune-operator local`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                now = dt.datetime.now(dt.timezone.utc)
                plan = reconcile(self.job, self.observe(), now, self.settings)
                self.apply(plan)
                phase = self.job["status"].get("phase")
                if phase in (PHASE_SUCCEEDED, PHASE_FAILED) and not any(
                    self.executor.status(n) and self.executor.status(n).get("phase") == "Running"  # type: ignore[union-attr]
                    for n in self.manifests
                ):
                    return self.report(str(phase))
                if deadline is not None and time.monotonic() > deadline:
                    self.out.write(f"timed out after {timeout:.0f}s; stopping the worker\n")
                    self.stop()
                    return 1
                self.wake.wait(
                    min(
                        plan.requeue_after or self.settings.progress_interval, self.settings.progress_interval
                    )
                )
                self.wake.clear()
        except KeyboardInterrupt:
            self.out.write("interrupted: stopping the worker (it checkpoints first); rerun to resume\n")
            self.stop()
            return 130
        finally:
            self.executor.close()

    def stop(self) -> None:
        for name in list(self.manifests):
            self.executor.delete(name, self.settings.grace_seconds)

    def report(self, phase: str) -> int:
        st = self.job["status"]
        if phase == PHASE_FAILED:
            self.out.write(f"{self.name} failed ({st.get('reason')}): {st.get('message')}\n")
            last = [a for a in st.get("attempts") or [] if a.get("pod")][-1:]
            if last:
                self.out.write(f"worker log: {self.executor.pod_dir(last[0]['pod']) / 'log'}\n")
            return 1
        path = (st.get("export") or {}).get("path")
        claim = claim_name(self.name, parse_spec(self.job["spec"]))
        local = Path(path) if path and Path(path).is_absolute() and Path(path).exists() else (
            self.workdir / "pvcs" / claim / EXPORT_DIR)  # fmt: skip
        self.out.write(f"{self.name} succeeded; exported model: {local}\n")
        for fmt in (st.get("export") or {}).get("formats") or []:
            if (local / fmt).is_dir():
                self.out.write(f"  {fmt}: {local / fmt}\n")
        self.out.flush()
        return 0


def stage_inputs(job: dict[str, Any], source_dirs: list[Path], workspace: Path) -> list[str]:
    """Copy files the spec names by workspace-relative path (dataset.path, dataset.eval.path,
    model.base) from next to the YAML file (or the current directory) into the workspace, as a
    user would copy them onto the PVC. Returns the paths copied; existing workspace files win."""
    spec = job.get("spec") or {}
    dataset = spec.get("dataset") or {}
    wanted = [
        dataset.get("path"),
        (dataset.get("eval") or {}).get("path"),
        (spec.get("model") or {}).get("base"),
    ]
    copied = []
    for rel in wanted:
        if (
            not isinstance(rel, str)
            or not rel
            or Path(rel).is_absolute()
            or ":" in rel
            or ".." in Path(rel).parts
        ):
            continue
        dst = workspace / rel
        src = next((d / rel for d in source_dirs if (d / rel).exists()), None)
        if src is None or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        copied.append(rel)
    return copied


def _format(cols: tuple[str, ...]) -> str:
    widths = (24, 11, 9, 18, 9, 6)
    return "".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)).rstrip() + "\n"


def main(
    file: str, workdir: str | None = None, timeout: float | None = None, out: TextIO = sys.stdout
) -> int:
    """`finetune-operator local FILE [--workdir DIR]`."""
    try:
        job = load_job(Path(file))
    except SpecError as e:
        out.write(f"finetune-operator local: {e}\n")
        return 2
    root = Path(workdir) if workdir else Path.cwd() / ".finetune" / job["metadata"]["name"]
    root.mkdir(parents=True, exist_ok=True)
    runner = LocalRunner(job, root, out=out)
    try:
        workspace = runner.executor.pvc_dir(claim_name(runner.name, parse_spec(job["spec"])))
        out.write(f"workspace: {workspace}\n")
        for rel in stage_inputs(job, [Path(file).resolve().parent, Path.cwd()], workspace):
            out.write(f"copied {rel} into the workspace\n")
    except SpecError:
        pass  # reconcile reports it as the job's Failed condition
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops gracefully, like Ctrl-C
    try:
        return runner.run(timeout)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
