"""Operator chaos: the real kopf operator against the emulated API server while pods are preempted
(SIGTERM), killed (SIGKILL), OOM-killed, evicted and deleted, and the operator itself is restarted
or kept down for a while, at seeded random moments. Pods run tests/operator/fake_worker.py (the
worker contract in milliseconds) so a trial takes seconds; the real workers are the subject of
test_worker_chaos.py.

Checked, besides every job ending Succeeded (or Failed for a stated reason that the history
explains):
- never two live pods of one job (sampled through the API all along), and attempt numbers per
  role run 1, 2, 3... in creation order: no pod name is ever created twice;
- status not lost: status.attempts lists every pod the job ever had, in order, despite restarts;
- attempt history matches what happened: a pod we preempted reads `preempted` (exit 75), killed
  `failed` (137), OOM-killed `oomkilled`, evicted or deleted `evicted` (or `completed`, when the
  pod had already finished), and one we left alone `completed`; the counters agree with it.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any

import pytest

from conftest import TRIALS, Ledger, trial_rng

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from harness import Cluster, OperatorRunner, finetune_job

from fakeworker import fake_worker_bin
from finetune_api import contract

pytestmark = pytest.mark.operator
FAST_ENV = {"FINETUNE_RESYNC_SECONDS": "0.5", "FINETUNE_BACKOFF_SECONDS": "1", "FINETUNE_BACKOFF_MAX_SECONDS": "2",
            "FINETUNE_GRACE_SECONDS": "10"}  # fmt: skip
ACTIONS = ("sigterm", "sigterm", "sigkill", "oom", "evict", "delete", "restart-operator", "operator-down", "idle")
# What an attempt may read after each action: (result, exit code); None = any code. `completed`: the
# pod had finished first. A SIGTERM that lands before the worker installs its handler (interpreter
# start-up), or on an export (which has no graceful stop), ends the process: exit 143, `failed`.
ACCEPT: dict[str, set[tuple[str, int | None]]] = {
    "sigterm": {("preempted", 75), ("failed", 143), ("completed", 0)},
    "sigkill": {("failed", 137), ("completed", 0)},
    "oom": {("oomkilled", 137), ("completed", 0)},
    "evict": {("evicted", None), ("preempted", 75), ("completed", 0)},
    "delete": {("evicted", None), ("preempted", 75), ("completed", 0)},
}
JOBS = ("alpha", "beta")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    for k, v in FAST_ENV.items():
        monkeypatch.setenv(k, v)
    c = Cluster(tmp_path / "cluster", bin_dir=fake_worker_bin(tmp_path / "bin")).start()
    try:
        yield c
    finally:
        c.stop()


class Watcher:
    """Samples the job's pods through the API: every name seen, in creation order, and the most pods
    ever live at once per job."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.seen: dict[str, list[str]] = defaultdict(list)
        self.max_live: dict[str, int] = defaultdict(int)
        self.overlaps: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.cluster.pods(label_selector="finetune.dev/job")
            except Exception:
                return
            live: dict[str, list[str]] = defaultdict(list)
            for p in sorted(pods, key=lambda p: int(p["metadata"].get("resourceVersion") or 0)):
                job = p["metadata"]["labels"]["finetune.dev/job"]
                name = p["metadata"]["name"]
                if name not in self.seen[job]:
                    self.seen[job].append(name)
                if (p.get("status") or {}).get("phase", "Pending") in ("Pending", "Running"):
                    live[job].append(name)
            for job, names in live.items():
                self.max_live[job] = max(self.max_live[job], len(names))
                if len(names) > 1:
                    self.overlaps.append(f"{job}: {names}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def running_pods(cluster: Cluster) -> list[str]:
    return [p["metadata"]["name"] for p in cluster.pods(label_selector="finetune.dev/job")
            if (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]  # fmt: skip


def act(action: str, cluster: Cluster, op: OperatorRunner, rng: Random, done: dict[str, str]) -> str | None:
    """Do one chaos action; returns the pod it hit (recorded in `done`) or None."""
    if action == "restart-operator":
        op.restart()
        return None
    if action == "operator-down":
        op.stop()
        time.sleep(rng.uniform(0.3, 2.0))  # pods go on (and may end) while nobody watches
        op.start()
        return None
    if action == "idle":
        return None
    candidates = [p for p in running_pods(cluster) if p not in done]
    if not candidates:
        return None
    pod = rng.choice(candidates)
    kubelet = cluster.kubelet
    assert kubelet is not None
    try:
        if action == "sigterm":
            kubelet.kill(pod, signal.SIGTERM)
        elif action == "sigkill":
            kubelet.kill(pod, signal.SIGKILL)
        elif action == "oom":
            kubelet.oom_kill(pod)
        elif action == "evict":
            kubelet.evict(pod, grace_seconds=rng.choice([0, 5]))
        elif action == "delete":
            cluster.delete("v1", "pods", "default", pod, grace_period_seconds=rng.choice([0, 5]))
    except KeyError:  # the pod ended and was forgotten in between
        return None
    done[pod] = action
    return pod


@pytest.mark.parametrize("trial", range(TRIALS))
def test_operator_under_pod_and_operator_chaos(
    trial: int, cluster: Cluster, tmp_path: Path, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    rng = trial_rng(request.node.nodeid, trial)
    ledger.trials["operator"] += 1
    backoff = {job: rng.randint(1, 4) for job in JOBS}
    for job in JOBS:
        ws = cluster.kubelet.workspace(f"{job}-workspace")  # type: ignore[union-attr]
        ws.mkdir(parents=True, exist_ok=True)
        (ws / "fake-worker.json").write_text(f'{{"steps": {rng.randint(30, 60)}, "stepSeconds": 0.05}}')
    op = OperatorRunner(cluster.url, cluster=cluster).start()
    watcher = Watcher(cluster)
    done: dict[str, str] = {}
    story: list[str] = []
    try:
        for job in JOBS:
            cluster.create(finetune_job(job, {
                "dataset": {"inline": [{"question": "q", "answer": "a"}]},
                "training": {"maxSteps": 60, "checkpoint": {"everySteps": 5}},
                "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"}, "backoffLimit": backoff[job]}))  # fmt: skip
        deadline = time.monotonic() + rng.uniform(6, 10)
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 1.0))
            action = rng.choice(ACTIONS)
            pod = act(action, cluster, op, rng, done)
            if pod is not None or action in ("restart-operator", "operator-down"):
                ledger.point("operator", action)
                story.append(f"{action}({pod})" if pod else action)
        if not op.alive:
            op.start()
        finals = {}
        for job in JOBS:
            finals[job] = cluster.wait_for(
                lambda j=job: (s := (cluster.job(j) or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed") and s,
                90, what=f"{job} to finish after {story}")  # fmt: skip
        time.sleep(0.3)
    finally:
        watcher.stop()
        op.stop()

    assert not watcher.overlaps, f"two live pods of one job: {watcher.overlaps[:3]} after {story}"
    for job, st in finals.items():
        check_job(job, st, watcher.seen[job], done, backoff[job], story)


def check_job(job: str, st: dict[str, Any], seen: list[str], done: dict[str, str], backoff: int, story: list[str]) -> None:
    attempts = st["attempts"]
    names = [a["pod"] for a in attempts]
    where = f"{job} after {story}: attempts {[(a['pod'], a.get('result'), a.get('exitCode')) for a in attempts]}"
    assert len(names) == len(set(names)), f"an attempt recorded twice: {where}"
    assert set(seen) <= set(names), f"status lost attempts {sorted(set(seen) - set(names))}: {where}"
    for role in ("train", "export"):
        numbers = [a["attempt"] for a in attempts if a["role"] == role]
        assert numbers == list(range(1, len(numbers) + 1)), f"{role} attempt numbers {numbers}: {where}"
        assert [a["pod"] for a in attempts if a["role"] == role] == [f"{job}-{role}-{n}" for n in numbers], where
    for a in attempts:
        assert a.get("result"), f"attempt {a['pod']} never closed: {where}"
        action = done.get(a["pod"])
        if action is not None:
            ok = {(r, c) for r, c in ACCEPT[action] if c is None or c == a.get("exitCode")}
            assert a["result"] in {r for r, _ in ok}, \
                f"{a['pod']} was hit by {action} but reads {a['result']} (exit {a.get('exitCode')}): {where}"  # fmt: skip
        elif st["phase"] == "Succeeded":
            assert a["result"] == "completed", f"{a['pod']} was left alone but reads {a['result']}: {where}"
        if a["result"] == "preempted" and a.get("exitCode") is not None:
            assert a["exitCode"] == 75, where
        if a["result"] == "failed":
            assert a.get("exitCode") in (137, 143), where
    trains = [a for a in attempts if a["role"] == "train"]
    exports = [a for a in attempts if a["role"] == "export"]
    bad = lambda xs: sum(a["result"] in ("failed", "oomkilled") for a in xs)  # noqa: E731
    assert st["failures"] == bad(trains) and st["exportFailures"] == bad(exports), where
    assert st["preemptions"] == sum(a["result"] in ("preempted", "evicted") for a in attempts), where
    assert st["restarts"] == max(0, len(trains) - 1) + max(0, len(exports) - 1), where
    steps = [int(a["resumedFrom"].split("-")[1]) for a in trains if a.get("resumedFrom")]
    assert steps == sorted(steps), f"resumed from an older checkpoint than before: {where}"
    if st["phase"] == "Succeeded":
        assert trains[-1]["result"] == "completed" and exports[-1]["result"] == "completed", where
        assert next(c for c in st["conditions"] if c["type"] == "Succeeded")["status"] == "True"
    else:
        assert st["reason"] in ("BackoffLimitExceeded", "ExportBackoffLimitExceeded"), where
        counter = st["failures"] if st["reason"] == "BackoffLimitExceeded" else st["exportFailures"]
        assert counter == backoff + 1, f"Failed with {counter} failures for backoffLimit {backoff}: {where}"
        assert contract.RESULT_FAILED in st["message"] or contract.RESULT_OOMKILLED in st["message"], where
