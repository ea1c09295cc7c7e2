"""FineTuneJobs under a real Kueue (the Kueue tier's harness, tests/realapi/kueue_harness.py).

One control plane (tier 3b's kube-apiserver, etcd and kube-controller-manager from
KUBEBUILDER_ASSETS), Kueue from KUEUE_ASSETS with the pod integration, the test kubelet running
the fake worker (tests/operator/fake_worker.py: the worker's contract, a progress line per step,
checkpoint and exit 75 on SIGTERM) and `finetune-operator run` with its production defaults. Each
scenario gets its own namespace, ClusterQueue (cpu 1; jobs ask 600m, so one fits) and LocalQueue.

  (a) steps lost to a Kueue preemption: `low` (WorkloadPriorityClass 100) trains; `high` (1000)
      arrives a quarter of the way in; Kueue preempts low (SIGTERM). Lost = the last step the
      preempted attempt printed minus the step its successor resumed from (goal 0). Beside it, what
      a worker that saves only every `checkpoint.everySteps` would have lost at that step.
  (b) time from quota freed to the next job's training pod Running: `x` trains, `y` (same priority)
      waits gated; from x's training pod ending (its Workload finishes, Kueue frees the quota) to
      y's training pod Running, on one watch of the namespace's pods. Kueue ungates, the scheduler
      (here the test kubelet) binds, the kubelet starts; the operator is not on this path (y's pod
      exists, queued). Also (a)'s readmission: high's last pod ended -> low's next pod Running.
  (c) a preempted job's total time over an uninterrupted one's: low's creation -> Succeeded with
      the preemption, over the same job alone. Gross (it includes the time high held the quota) and
      net of that time (what the preemption itself cost: stop, checkpoint, requeue, resume).

    KUBEBUILDER_ASSETS=/path/to/bin KUEUE_ASSETS=/path/to/kueue python bench/bench_kueue.py [--steps 60]
        [--step-seconds 0.1] [--repeat 3]

Without the assets it says why and exits 0 (nothing to measure). Figures, no goals asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "realapi"))
sys.path.insert(0, str(REPO / "tests"))

from controlplane import ApiClient, assets_dir, wait_for  # noqa: E402
from kubelet import RealApiKubelet  # noqa: E402
from kueue_harness import KueueControlPlane, PodRecorder, ended, kueue_assets, running, ungated  # noqa: E402
from operator_proc import OperatorProcess  # noqa: E402

from fakeworker import fake_worker_bin  # noqa: E402
from finetune_api import contract  # noqa: E402

EVERY = 10  # checkpoint.everySteps


def job(name: str, steps: int, priority: str | None = None) -> dict[str, Any]:
    return {"apiVersion": contract.API_VERSION, "kind": contract.KIND,
            "metadata": {"name": name, "labels": {"kueue.x-k8s.io/priority-class": priority} if priority else {}},
            "spec": {"model": {"base": "builtin:all-MiniLM-L6-v2"}, "dataset": {"inline": [{"question": "q", "answer": "a"}]},
                     "training": {"maxSteps": steps, "checkpoint": {"everySteps": EVERY}},
                     "resources": {"gpus": 0, "cpu": "600m", "memory": "1Gi"}, "queueName": "lq", "backoffLimit": 0}}  # fmt: skip


class Scenario:
    """A namespace with its own ClusterQueue (cpu 1) and LocalQueue `lq`, and a pod recorder."""

    def __init__(self, kq: KueueControlPlane, kubelet: RealApiKubelet, ns: str) -> None:
        self.kq, self.kubelet, self.ns = kq, kubelet, ns
        self.api: ApiClient = kq.cp.client(user_agent="bench-kueue")
        kq.cp.create_namespace(ns)
        kq.cluster_queue(f"cq-{ns}", "1")
        kq.local_queue(ns, "lq", f"cq-{ns}")
        kq.wait_queue_active(f"cq-{ns}")
        self.rec: PodRecorder | None = None

    def record(self) -> PodRecorder:
        self.rec = PodRecorder(self.api, self.ns)
        return self.rec

    def configure(self, name: str, steps: int, step_seconds: float) -> None:
        ws = self.kubelet.workspace(self.ns, f"{name}-workspace")
        ws.mkdir(parents=True, exist_ok=True)
        (ws / "fake-worker.json").write_text(json.dumps({"steps": steps, "stepSeconds": step_seconds}))

    def create(self, name: str, steps: int, priority: str | None = None) -> float:
        self.api.create(job(name, steps, priority), self.ns, plural=contract.PLURAL)
        return time.monotonic()

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.api.get(contract.API_VERSION, contract.PLURAL, self.ns, name) or {}).get("status") or {})

    def wait(self, name: str, phase: str, timeout: float = 300) -> float:
        wait_for(lambda: self.status(name).get("phase") == phase, timeout, 0.05, what=f"{name} {phase}")
        return time.monotonic()

    def steps(self, pod: str) -> list[int]:
        try:
            text = self.kubelet.logs(self.ns, pod)
        except KeyError:
            return []
        return [int(json.loads(ln)["step"]) for ln in text.splitlines() if ln.startswith("{") and '"progress"' in ln]

    def close(self) -> None:
        if self.rec is not None:
            self.rec.close()


def uninterrupted(s: Scenario, steps: int, step_seconds: float) -> float:
    s.configure("solo", steps, step_seconds)
    t0 = s.create("solo", steps, "low")
    return s.wait("solo", "Succeeded") - t0


def preempted(s: Scenario, steps: int, step_seconds: float) -> dict[str, Any]:
    rec = s.record()
    s.configure("low", steps, step_seconds)
    s.configure("high", steps // 3, step_seconds)
    t0 = s.create("low", steps, "low")
    wait_for(lambda: s.kubelet.started(s.ns, "low-train-1") and len(s.steps("low-train-1")) >= steps // 4, 300, 0.05,
             what="low at 1/4")  # its log, not its status (written every FINETUNE_RESYNC_SECONDS)
    s.create("high", steps // 3, "high")
    s.wait("high", "Succeeded")
    done = s.wait("low", "Succeeded")
    st = s.status("low")
    trains = [a for a in st["attempts"] if a["role"] == "train"]
    first_steps = s.steps(trains[0]["pod"])
    resumed = int(str(trains[1]["resumedFrom"]).split("-")[1])
    at_sigterm = first_steps[-1]
    highs = [n for n in rec.names() if n.startswith("high-")]
    starts = [t for t, _ in filter(None, (rec.first(n, ungated) for n in highs))]
    ends = [t for t, _ in filter(None, (rec.first(n, ended) for n in highs))]
    last_high = max(ends)
    next_low = min((t for t, _ in filter(None, (rec.first(n, running) for n in rec.names()
                                                  if n.startswith("low-train-") and n != trains[0]["pod"]))
                    if t > last_high), default=float("nan"))  # fmt: skip
    held = last_high - min(starts)
    all_steps = sorted(x for a in trains for x in s.steps(a["pod"]))
    return {"lost": at_sigterm - resumed, "periodic_lost": at_sigterm % EVERY, "at_sigterm": at_sigterm,
            "total": done - t0, "held": held, "readmit": next_low - last_high,
            "preemptions": st["preemptions"], "failures": st["failures"],
            "every_step_once": all_steps == list(range(1, steps + 1)),
            "attempts": [(a["pod"], a["result"]) for a in st["attempts"]]}  # fmt: skip


def handoff(s: Scenario, steps: int, step_seconds: float) -> float:
    rec = s.record()
    s.configure("x", steps // 3, step_seconds)
    s.configure("y", 5, step_seconds)
    s.create("x", steps // 3)
    s.wait("x", "Training")
    s.create("y", 5)
    wait_for(lambda: s.status("y").get("reason") == "Queued", 60, 0.05, what="y queued")
    s.wait("y", "Training")
    freed = wait_for(lambda: rec.first("x-train-1", ended), 30, 0.05, what="x's pod ended")[0]
    started = wait_for(lambda: rec.first("y-train-1", running), 30, 0.05, what="y's pod Running")[0]
    s.wait("y", "Succeeded")
    return started - freed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--step-seconds", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    k8s, why = assets_dir()
    kueue, why_kueue = kueue_assets()
    if k8s is None or kueue is None:
        print(f"bench_kueue: nothing to measure: {why or why_kueue}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-kueue-") as tmp:
        root = Path(tmp)
        kq = KueueControlPlane(k8s, kueue, root / "kueue").start()
        kubelet = RealApiKubelet(kq.cp.client(user_agent="realapi-kubelet"), root / "kubelet", kq.cp.root / "pki",
                                 bin_dir=fake_worker_bin(root / "bin")).start()  # fmt: skip
        kq.priority_class("low", 100)
        kq.priority_class("high", 1000)
        names = [f"{kind}-{i}" for i in range(args.repeat) for kind in ("solo", "pre", "hand")]
        scenarios = {n: Scenario(kq, kubelet, n) for n in names}
        op = OperatorProcess(kq.cp, names, {}, log=root / "operator.log").start()
        try:
            solo, pre, hand = [], [], []
            for i in range(args.repeat):
                solo.append(uninterrupted(scenarios[f"solo-{i}"], args.steps, args.step_seconds))
                pre.append(preempted(scenarios[f"pre-{i}"], args.steps, args.step_seconds))
                hand.append(handoff(scenarios[f"hand-{i}"], args.steps, args.step_seconds))
                print(f"run {i + 1}: uninterrupted {solo[-1]:.2f}s; preempted {pre[-1]['total']:.2f}s (high held the "
                      f"quota {pre[-1]['held']:.2f}s), SIGTERM at step {pre[-1]['at_sigterm']}, lost "
                      f"{pre[-1]['lost']} (every-{EVERY}-steps only: {pre[-1]['periodic_lost']}), readmitted in "
                      f"{pre[-1]['readmit']:.2f}s; hand-off {hand[-1]:.2f}s; attempts {pre[-1]['attempts']}")  # fmt: skip
        finally:
            op.stop()
            for sc in scenarios.values():
                sc.close()
            kubelet.close()
            kq.stop()
    med = statistics.median
    gross = [p["total"] / u for p, u in zip(pre, solo, strict=True)]
    net = [(p["total"] - p["held"]) / u for p, u in zip(pre, solo, strict=True)]
    print(f"\nKubernetes {kq.cp.version}, Kueue {kq.version}; {args.repeat} runs, {args.steps} steps of "
          f"{args.step_seconds}s, checkpoint every {EVERY}")  # fmt: skip
    print(f"(a) steps lost to a Kueue preemption: {[p['lost'] for p in pre]} (goal 0); a worker saving only every "
          f"{EVERY} steps would have lost {[p['periodic_lost'] for p in pre]}; every step trained once: "
          f"{all(p['every_step_once'] for p in pre)}; failures {[p['failures'] for p in pre]}, "
          f"preemptions counted {[p['preemptions'] for p in pre]}")  # fmt: skip
    print(f"(b) quota freed -> next job's training pod Running: median {med(hand):.2f}s "
          f"({', '.join(f'{h:.2f}' for h in hand)}); preemptor's last pod ended -> preempted job's pod Running: "
          f"median {med([p['readmit'] for p in pre]):.2f}s")  # fmt: skip
    print(f"(c) preempted ÷ uninterrupted total time: gross median {med(gross):.2f} ({', '.join(f'{g:.2f}' for g in gross)}), "
          f"net of the time the preemptor held the quota median {med(net):.2f} ({', '.join(f'{n:.2f}' for n in net)}); "
          f"uninterrupted median {med(solo):.2f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
