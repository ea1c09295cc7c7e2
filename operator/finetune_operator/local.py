"""`finetune-operator local FILE.yaml [FILE.yaml ...]`: the embedded default, no cluster needed.

It drives the same `reconcile` as the in-cluster operator, with a LocalPodExecutor in place of
the API server and kubelet: the pods reconcile plans are run as local processes, the workspace
claim is a local directory (`<workdir>/pvcs/<claim>/`), the job's status lives in memory and in
`<workdir>/status.json`. It prints the status transitions as `kubectl get ftj -w` would and ends
with the path of the exported model; exit 0 on Succeeded, 1 on Failed, 130 on Ctrl-C.

The story carries across runs (localstory.py): status.json is reloaded by a rerun with the same
--workdir, so every attempt is kept and restarts are counted; the training pod that picks up says
"resuming from checkpoint-N (step N of M)"; a rerun of a finished job says "already complete" and
redoes nothing. Ctrl-C once: the worker checkpoints and stops (its attempt is `preempted`); Ctrl-C
twice: stop now. Either way status.json is left consistent (no attempt open, phase Pending with
reason Interrupted) and there is no traceback.

Several jobs (several files, or `---`-separated documents) run in one local world, like one
namespace: one workdir, every claim under `<workdir>/pvcs/`, each status in
`<workdir>/status/<name>.json`. So `spec.model.fromJob` resolves as in a cluster: the
continuation waits until its source has Succeeded, and its pods get the source's claim
(a local directory) mounted at the same path. A fromJob naming a job that is not among the files
is refused up front (nothing would ever create it). Exit 0 when every job Succeeded.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from .builders import claim_name
from .contract import API_VERSION, EXPORT_DIR, KIND
from .executor import LocalPodExecutor
from .localprogress import LiveScreen, progress_text
from .localstory import carry_on, close_interrupted, newest_checkpoint, resume_line
from .observe import LOG_TAIL_LINES, Observed, observe_pod
from .reconcile import Plan, Settings, reconcile
from .spec import SpecError, parse_spec, yaml_load, yaml_load_all
from .status import PHASE_FAILED, PHASE_SUCCEEDED, merge_patch

LOCAL_SETTINGS = Settings(worker_image="local", grace_seconds=60, backoff_base=2.0, backoff_max=30.0,
                          progress_interval=1.0, pending_interval=1.0)  # fmt: skip
COLUMNS = ("NAME", "PHASE", "PROGRESS", "CHECKPOINT", "RESTARTS", "AGE")
SHOWN_EVENTS = ("Resumed", "AttemptPreempted", "AttemptEvicted", "WaitingForSourceJob")  # besides Warnings


def load_job(path: Path) -> dict[str, Any]:
    """A FineTuneJob object from a YAML/JSON file (a whole object, or just its spec).

    Raises:
        SpecError: not a FineTuneJob.
    """
    try:
        doc = yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(str(path), f"cannot read: {_named(e, path)}") from None
    return _job_from(doc, str(path), path.stem.replace("_", "-").lower())


def _named(e: Exception, path: Path) -> str:
    """A YAML error naming the file instead of PyYAML's "<unicode string>"."""
    return str(e).replace('"<unicode string>"', str(path)).replace("<unicode string>", str(path))


def load_jobs(path: Path) -> list[dict[str, Any]]:
    """Every FineTuneJob in a YAML/JSON file: one as `load_job` reads it, or several
    `---`-separated documents, each a whole FineTuneJob with its metadata.name.

    Raises:
        SpecError: a document is not a FineTuneJob.
    """
    try:
        docs = [d for d in yaml_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(str(path), f"cannot read: {_named(e, path)}") from None
    if len(docs) <= 1:  # as load_job reads it, without reading the file again
        return [_job_from(docs[0] if docs else None, str(path), path.stem.replace("_", "-").lower())]
    jobs = []
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict) or not (doc.get("metadata") or {}).get("name"):
            raise SpecError(f"{path} document {i}", "each of several jobs in one file needs metadata.name")
        jobs.append(_job_from(doc, f"{path} document {i}", ""))
    return jobs


def _job_from(doc: Any, where: str, default_name: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise SpecError(where, "must hold a FineTuneJob (an object)")
    if "spec" not in doc and "kind" not in doc:
        doc = {"spec": doc}
    if doc.get("kind", KIND) != KIND:
        raise SpecError("kind", f"expected {KIND}, got {doc.get('kind')!r}")
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("name", default_name)
    meta["namespace"] = meta.get("namespace") or "default"
    meta.update(uid=str(uuid.uuid4()), generation=1)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": doc.get("spec") or {},
        "status": {},
    }


def world_problem(jobs: list[dict[str, Any]]) -> str | None:
    """Why these jobs cannot run together (a duplicate name, a fromJob naming a job that is not
    among them, a fromJob cycle), or None."""
    names = [str(j["metadata"]["name"]) for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return f"two jobs are named {dupes[0]}"
    source: dict[str, str] = {}
    for j in jobs:
        src = ((j.get("spec") or {}).get("model") or {}).get("fromJob")
        if isinstance(src, str) and src != j["metadata"]["name"]:  # itself: reconcile says InvalidSpec
            source[str(j["metadata"]["name"])] = src
    for name, src in source.items():
        if src not in names:
            return (f"{name}: spec.model.fromJob names FineTuneJob {src}, which is not among the files given; "
                    f"pass its file too (finetune-operator local {src}.yaml {name}.yaml)")  # fmt: skip
        chain = [name]
        while chain[-1] in source:
            chain.append(source[chain[-1]])
            if chain[-1] in chain[:-1]:
                return f"spec.model.fromJob cycle: {' -> '.join(chain)}"
    return None


def gpu_warnings(jobs: list[dict[str, Any]], device: str = "/dev/nvidia0") -> list[str]:
    """A warning for each job that asks for GPUs on a machine that has none (its pods run on CPU)."""
    if Path(device).exists():
        return []
    out = []
    for j in jobs:
        gpus = ((j.get("spec") or {}).get("resources") or {}).get("gpus", 1)
        if isinstance(gpus, int) and gpus > 0:
            out.append(f"{j['metadata']['name']} asks for {gpus} GPU{'s' if gpus > 1 else ''} (spec.resources.gpus) but "
                       "this machine has none: it trains on CPU, much more slowly")  # fmt: skip
    return out


def age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s < 600 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60}m"


class LocalRunner:
    """Runs FineTuneJobs to the end with local processes, in one local world (see the module
    docstring). `jobs` is one job object or several; `job` and `name` are the first's."""

    def __init__(self, jobs: dict[str, Any] | Sequence[dict[str, Any]], workdir: Path, *,
                 out: TextIO = sys.stdout, settings: Settings = LOCAL_SETTINGS,
                 bin_dir: Path | None = None) -> None:  # fmt: skip
        self.jobs: dict[str, dict[str, Any]] = {}
        for job in [jobs] if isinstance(jobs, dict) else jobs:
            if job["metadata"]["name"] in self.jobs:
                raise ValueError(f"two jobs are named {job['metadata']['name']}")
            self.jobs[str(job["metadata"]["name"])] = job
        if not self.jobs:
            raise ValueError("no job to run")
        self.workdir = Path(workdir).resolve()
        self.screen = LiveScreen(out)  # a live progress line on a terminal, plain periodic lines elsewhere
        self.out: TextIO | LiveScreen = self.screen
        self.settings = settings
        self.wake = threading.Event()
        self.executor = LocalPodExecutor(self.workdir, bin_dir=bin_dir, on_exit=lambda _name: self.wake.set())
        self.manifests: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in self.jobs}
        self.claims: set[str] = set()
        self.started = time.monotonic()
        self._last_rows: dict[str, tuple[str, ...]] = {}
        self.interrupts = 0
        self._told_resume: set[str] = set()

    @property
    def job(self) -> dict[str, Any]:
        return next(iter(self.jobs.values()))

    @property
    def name(self) -> str:
        return next(iter(self.jobs))

    @property
    def single(self) -> bool:
        return len(self.jobs) == 1

    def observe(self, name: str | None = None) -> Observed:
        name = name or self.name
        job = self.jobs[name]
        pods = []
        for pod, manifest in self.manifests[name].items():
            status = self.executor.status(pod)
            if status is None:  # deleted
                continue
            tail = self.executor.logs(pod, LOG_TAIL_LINES) if status.get("phase") == "Running" else None
            if tail is not None and pod not in self._told_resume and "-train-" in pod:
                self._tell_resume(name, pod)
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

    def _tell_resume(self, name: str, pod: str) -> None:
        """Say once where a training pod picks up, as soon as its worker has said it."""
        log = self.executor.logs(pod)
        line = resume_line(log)
        if line is not None or '"event": "start"' in log or '"event":"start"' in log:
            self._told_resume.add(pod)
        if line is not None:
            self.out.write(f"  {'' if self.single else name + ': '}{pod}: {line}\n")
            self.out.flush()

    def workspace(self, name: str) -> Path | None:
        try:
            return self.workdir / "pvcs" / claim_name(name, parse_spec(self.jobs[name].get("spec")))
        except SpecError:
            return None

    def apply(self, plan: Plan, name: str | None = None) -> None:
        name = name or self.name
        job = self.jobs[name]
        for obj in plan.create:
            if obj["kind"] == "PersistentVolumeClaim":
                self.executor.pvc_dir(obj["metadata"]["name"])
                self.claims.add(obj["metadata"]["name"])
            elif obj["kind"] == "Pod":
                self.manifests[name][obj["metadata"]["name"]] = copy.deepcopy(obj)
                self.executor.start(obj)
        for d in plan.delete:
            self.executor.delete(d.name, d.grace_seconds if d.grace_seconds is not None else 30)
        job["status"] = merge_patch(job["status"], plan.status or {})
        who = "" if self.single else f"{name}: "
        for ev in plan.events:  # what `kubectl describe` would show: why a row changed
            if ev["type"] == "Warning" or ev["reason"] in SHOWN_EVENTS:
                self.out.write(f"  {who}{ev['type']} {ev['reason']}: {ev['message']}\n")
        if plan.status:
            self.save_status(name)
        self.print_row(name)

    def save_status(self, name: str) -> None:
        path = self.status_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.jobs[name]["status"], indent=2))
        tmp.replace(path)  # a Ctrl-C mid-write never leaves half a status.json

    def status_file(self, name: str) -> Path:
        return self.workdir / "status.json" if self.single else self.workdir / "status" / f"{name}.json"

    def print_row(self, name: str | None = None) -> None:
        name = name or self.name
        st = self.jobs[name]["status"]
        pct = (st.get("progress") or {}).get("percent")
        checkpoint = (st.get("checkpoint") or {}).get("name")
        if not checkpoint and st.get("phase") not in (PHASE_SUCCEEDED, PHASE_FAILED):
            ws = self.workspace(name)  # nothing reported yet: what the workspace holds
            checkpoint = (newest_checkpoint(ws) or {}).get("name") if ws else None
        row = (name, str(st.get("phase") or ""), f"{pct:.0f}%" if isinstance(pct, (int, float)) else "",
               str(checkpoint or ""), str(st.get("restarts", 0)))  # fmt: skip
        if row != self._last_rows.get(name):
            if not self._last_rows:
                self.out.write(_format(COLUMNS))
            self.out.write(_format((*row, age(time.monotonic() - self.started))))
            self.out.flush()
            self._last_rows[name] = row

    def _running(self) -> bool:
        return any(
            (self.executor.status(pod) or {}).get("phase") == "Running"
            for pods in self.manifests.values()
            for pod in pods
        )

    def run(self, timeout: float | None = None) -> int:
        """Reconcile until every job finishes; the exit code of `finetune-operator local`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if self.interrupts:
                    return self.stop_interrupted()
                wait = self.settings.progress_interval
                for name, job in self.jobs.items():
                    now = dt.datetime.now(dt.timezone.utc)
                    plan = reconcile(job, self.observe(name), now, self.settings)
                    self.apply(plan, name)
                    wait = min(wait, plan.requeue_after or wait)
                phases = [job["status"].get("phase") for job in self.jobs.values()]
                if all(ph in (PHASE_SUCCEEDED, PHASE_FAILED) for ph in phases) and not self._running():
                    self.screen.end()
                    return self.report()
                self.show_progress()
                if deadline is not None and time.monotonic() > deadline:
                    self.out.write(f"timed out after {timeout:.0f}s; stopping the worker\n")
                    self.stop()
                    return 1
                self.wake.wait(wait)
                self.wake.clear()
        except KeyboardInterrupt:  # an in-process caller without our SIGINT handler
            self.interrupt()
            return self.stop_interrupted()
        finally:
            self.screen.end()
            self.executor.close()

    def show_progress(self) -> None:
        lines = {}
        for name, job in self.jobs.items():
            text = progress_text(job["status"])
            if text:
                lines[name] = text
        self.screen.show(lines)

    def interrupt(self, *_: object) -> None:
        """The SIGINT/SIGTERM handler: the first asks the workers to checkpoint and stop, the second
        stops them now."""
        self.interrupts += 1
        self.wake.set()

    def _live_pods(self) -> list[tuple[str, str]]:
        return [(name, pod) for name, pods in self.manifests.items() for pod in pods
                if (self.executor.status(pod) or {}).get("phase") == "Running"]  # fmt: skip

    def stop_interrupted(self) -> int:
        """Stop the workers after Ctrl-C, record how their attempts ended, exit 130."""
        self.screen.end()
        self.out.write("interrupted: the worker checkpoints and stops (Ctrl-C again to stop at once)\n")
        self.out.flush()
        for _, pod in self._live_pods():
            self.executor.terminate(pod)
        forced, deadline = False, time.monotonic() + self.settings.grace_seconds
        while self._live_pods():
            if (self.interrupts > 1 or time.monotonic() > deadline) and not forced:
                forced = True
                self.out.write("stopping now\n")
                self.out.flush()
                for _, pod in self._live_pods():
                    self.executor.terminate(pod, kill=True)
            self.wake.wait(0.2)
            self.wake.clear()
        now = dt.datetime.now(dt.timezone.utc)
        for name, job in self.jobs.items():
            if job["status"].get("phase") in (PHASE_SUCCEEDED, PHASE_FAILED):
                continue
            job["status"] = close_interrupted(job, self.observe(name), now, self.settings, forced=forced)
            self.save_status(name)
            self.print_row(name)
            cp = (job["status"].get("checkpoint") or {}).get("name")
            who = "" if self.single else f"{name}: "
            self.out.write(f"{who}stopped; rerun to resume{' from ' + cp if cp else ' (no checkpoint yet)'}: "
                           f"the same command again (status: {self.status_file(name)})\n")
        self.out.flush()
        return 130

    def stop(self) -> None:
        for pods in self.manifests.values():
            for pod in list(pods):
                self.executor.delete(pod, self.settings.grace_seconds)

    def report(self) -> int:
        """Say how each job ended; 0 when all Succeeded."""
        codes = [self._report(name) for name in self.jobs]
        self.out.flush()
        return max(codes)

    def _report(self, name: str) -> int:
        st = self.jobs[name]["status"]
        if st.get("phase") == PHASE_FAILED:
            self.out.write(f"{name} failed ({st.get('reason')}): {st.get('message')}\n")
            last = [a for a in st.get("attempts") or [] if a.get("pod")][-1:]
            if last:
                self.out.write(f"worker log: {self.executor.pod_dir(last[0]['pod']) / 'log'}\n")
            return 1
        path = (st.get("export") or {}).get("path")
        claim = claim_name(name, parse_spec(self.jobs[name]["spec"]))
        local = Path(path) if path and Path(path).is_absolute() and Path(path).exists() else (
            self.workdir / "pvcs" / claim / EXPORT_DIR)  # fmt: skip
        self.out.write(f"{name} succeeded; exported model: {local}\n")
        for fmt in (st.get("export") or {}).get("formats") or []:
            if (local / fmt).is_dir():
                self.out.write(f"  {fmt}: {local / fmt}\n")
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


def main(files: str | Sequence[str], workdir: str | None = None, timeout: float | None = None,
         out: TextIO = sys.stdout, err: TextIO | None = None) -> int:  # fmt: skip
    """`finetune-operator local FILE [FILE ...] [--workdir DIR]`. Errors go to `err` (stderr)."""
    err = err or sys.stderr
    paths = [Path(files)] if isinstance(files, str) else [Path(f) for f in files]
    try:
        loaded = [(path, job) for path in paths for job in load_jobs(path)]
    except SpecError as e:
        err.write(f"finetune-operator local: {e}\n")
        return 2
    problem = world_problem([job for _, job in loaded])
    if problem:
        err.write(f"finetune-operator local: {problem}\n")
        return 2
    for line in gpu_warnings([job for _, job in loaded]):
        err.write(f"finetune-operator local: warning: {line}\n")
    root = Path(workdir) if workdir else Path.cwd() / ".finetune" / loaded[0][1]["metadata"]["name"]
    root.mkdir(parents=True, exist_ok=True)
    runner = LocalRunner([job for _, job in loaded], root, out=out)
    if carry_on(runner, out):
        return runner.report()
    for path, job in loaded:
        name = job["metadata"]["name"]
        try:
            workspace = runner.executor.pvc_dir(claim_name(name, parse_spec(job["spec"])))
        except SpecError:
            continue  # reconcile reports it as the job's Failed condition
        whose = "the" if runner.single else f"{name}'s"
        out.write(f"workspace: {workspace}\n" if runner.single else f"workspace of {name}: {workspace}\n")
        for rel in stage_inputs(job, [path.resolve().parent, Path.cwd()], workspace):
            out.write(f"copied {rel} into {whose} workspace\n")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if main_thread:  # Ctrl-C (and SIGTERM, like Ctrl-C) stop gracefully; a second one stops now
        for sig in previous:
            signal.signal(sig, runner.interrupt)
    try:
        return runner.run(timeout)
    finally:
        if main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

