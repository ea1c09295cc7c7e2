"""`finetune-operator local FILE.yaml [FILE.yaml ...]`: the embedded default, no cluster needed.

It drives the same `reconcile` as the in-cluster operator, with a LocalPodExecutor in place of
the API server and kubelet: the pods reconcile plans are run as local processes, the workspace
claim is a local directory (`<workdir>/pvcs/<claim>/`), the job's status lives in memory and in
`<workdir>/status.json`. It prints the status transitions as `kubectl get ftj -w` would and ends
with the path of the exported model; exit 0 on Succeeded, 1 on Failed, 130 on Ctrl-C.

The story carries across runs (story.py): status.json is reloaded by a rerun with the same
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

import datetime as dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from finetune_api.spec import SpecError, parse_spec
from finetune_operator.decisions.builders import claim_name
from finetune_operator.decisions.reconcile import Plan, Settings, reconcile
from finetune_operator.local.display import StatusDisplay
from finetune_operator.local.executor import LocalPodExecutor
from finetune_operator.local.interrupt import Interruption, signals_handled_by
from finetune_operator.local.jobfiles import gpu_warnings, load_jobs, stage_inputs, world_problem
from finetune_operator.local.progress import LiveScreen
from finetune_operator.local.story import carry_on
from finetune_operator.local.world import LocalWorld

LOCAL_SETTINGS = Settings(worker_image="local", grace_seconds=60, backoff_base=2.0, backoff_max=30.0,
                          progress_interval=1.0, pending_interval=1.0)  # fmt: skip


class LocalRunner:
    """Runs FineTuneJobs to the end with local processes, in one local world (see the module
    docstring). `jobs` is one job object or several; `job` and `name` are the first's.

    It drives reconcile over the world (world.py) and applies each plan; the screen (display.py)
    tells what happens, and a Ctrl-C is handed to interrupt.py."""

    def __init__(self, jobs: dict[str, Any] | Sequence[dict[str, Any]], workdir: Path, *,
                 out: TextIO = sys.stdout, settings: Settings = LOCAL_SETTINGS,
                 bin_dir: Path | None = None) -> None:  # fmt: skip
        self.world = LocalWorld(jobs, workdir, bin_dir=bin_dir)
        self.settings = settings
        self.screen = LiveScreen(out)  # a live progress line on a terminal, plain periodic lines elsewhere
        self.display = StatusDisplay(self.world, self.screen)
        self.interruption = Interruption(self.world, self.display, settings)

    @property
    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.world.jobs

    @property
    def job(self) -> dict[str, Any]:
        return next(iter(self.world.jobs.values()))

    @property
    def name(self) -> str:
        return next(iter(self.world.jobs))

    @property
    def single(self) -> bool:
        return self.world.single

    @property
    def workdir(self) -> Path:
        return self.world.workdir

    @property
    def executor(self) -> LocalPodExecutor:
        return self.world.executor

    def run(self, timeout: float | None = None) -> int:
        """Reconcile until every job finishes; the exit code of `finetune-operator local`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if self.interruption.count:
                    return self.interruption.stop()
                wait = self.reconcile_all()
                if self.world.all_done():
                    self.screen.end()
                    return self.display.report()
                self.display.show_progress()
                if deadline is not None and time.monotonic() > deadline:
                    self.screen.write(f"timed out after {timeout:.0f}s; stopping the worker\n")
                    self.world.delete_pods(self.settings.grace_seconds)
                    return 1
                self.world.wake.wait(wait)
                self.world.wake.clear()
        except KeyboardInterrupt:  # an in-process caller without our SIGINT handler
            self.interrupt()
            return self.interruption.stop()
        finally:
            self.screen.end()
            self.executor.close()

    def reconcile_all(self) -> float:
        """One reconcile pass over every job, each plan applied; how long to wait before the next."""
        wait = self.settings.progress_interval
        for name, job in self.world.jobs.items():
            now = dt.datetime.now(dt.timezone.utc)
            observed = self.world.observe(name, on_running=self.display.tell_resume)
            plan = reconcile(job, observed, now, self.settings)
            self.apply(plan, name)
            wait = min(wait, plan.requeue_after or wait)
        return wait

    def apply(self, plan: Plan, name: str | None = None) -> None:
        name = name or self.name
        self.world.apply(plan, name)
        self.display.tell_events(name, plan.events)
        if plan.status:
            self.world.save_status(name)
        self.display.print_row(name)

    def interrupt(self, *_: object) -> None:
        """The SIGINT/SIGTERM handler: the first asks the workers to checkpoint and stop, the second
        stops them now."""
        self.interruption.handle()

    def report(self) -> int:
        """Say how each job ended; 0 when all Succeeded."""
        return self.display.report()


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
    if carry_on(runner.world, out):
        return runner.report()
    stage_workspaces(runner.world, loaded, out)
    with signals_handled_by(runner.interrupt):  # Ctrl-C and SIGTERM stop gracefully; a second one now
        return runner.run(timeout)


def stage_workspaces(world: LocalWorld, loaded: list[tuple[Path, dict[str, Any]]], out: TextIO) -> None:
    """Create each job's workspace and copy into it the inputs found next to its file (or here)."""
    for path, job in loaded:
        name = job["metadata"]["name"]
        try:
            workspace = world.executor.pvc_dir(claim_name(name, parse_spec(job["spec"])))
        except SpecError:
            continue  # reconcile reports it as the job's Failed condition
        whose = "the" if world.single else f"{name}'s"
        out.write(f"workspace: {workspace}\n" if world.single else f"workspace of {name}: {workspace}\n")
        for rel in stage_inputs(job, [path.resolve().parent, Path.cwd()], workspace):
            out.write(f"copied {rel} into {whose} workspace\n")
