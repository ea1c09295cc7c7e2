"""The Kueue tier: FineTuneJobs behind a real Kueue manager (kueue_harness.py) on a real API server.

Needs KUBEBUILDER_ASSETS (tier 3b) and KUEUE_ASSETS (bin/kueue, crds/, config/webhook-manifests.yaml
of a Kueue release; v0.13.1 tested); skipped with the reason without them. The control plane is
the module's own (Kueue's pod webhooks, `failurePolicy: Fail`, would otherwise sit on every tier-3b
pod create), with the test kubelet (kubelet.py) running the fake worker and the real operator as a
process with the RBAC of manifests/rbac. Each test gets a namespace, a ClusterQueue of its own that
fits one job (cpu 1 for jobs of 600m), and a LocalQueue `lq`; the WorkloadPriorityClasses `low`
(100) and `high` (1000) are shared.

"No progress lost" with the fake worker: it prints a progress line per step and, on SIGTERM,
checkpoints the step it finished and exits 75 (the real worker's contract, whose exact resume to
the same weights is tier 2's to prove). Here the steps every training attempt printed are read
from the kubelet's logs: steps lost to a preemption = the last step the preempted attempt printed
minus the step its successor resumed from (0), and over all attempts every step 1..N was trained
exactly once, as in an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from controlplane import wait_for
from kubelet import RealApiKubelet
from kueue_harness import (
    KUEUE_API,
    KueueControlPlane,
    PodRecorder,
    ended,
    kueue_assets,
    running,
    ungated,
)
from operator_proc import OperatorProcess
from realenv import Env

from fakeworker import fake_worker_bin
from finetune_api import contract

KUEUE, KUEUE_SKIP = kueue_assets()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(KUEUE is None, reason=KUEUE_SKIP)]
# As tier 3b's operator (conftest.FAST_ENV), with a grace period that is not Kueue's 30 s default,
# to see whose grace a Kueue preemption uses
GRACE = 45
OPERATOR_ENV = {"FINETUNE_RESYNC_SECONDS": "1", "FINETUNE_BACKOFF_SECONDS": "1", "FINETUNE_BACKOFF_MAX_SECONDS": "2",
                "FINETUNE_GRACE_SECONDS": str(GRACE)}  # fmt: skip
JOB_CPU = "600m"  # two jobs do not fit a ClusterQueue of cpu 1
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def kueue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KueueControlPlane]:
    from controlplane import assets_dir

    k8s, reason = assets_dir()
    if k8s is None or KUEUE is None:
        pytest.skip(reason or KUEUE_SKIP)
    started = time.monotonic()
    kq = KueueControlPlane(k8s, KUEUE, tmp_path_factory.mktemp("kueue")).start()
    TIMINGS["tier start"] = time.monotonic() - started
    try:
        kq.priority_class("low", 100)
        kq.priority_class("high", 1000)
        yield kq
    finally:
        kq.stop()
        print(f"\nKueue tier: Kubernetes {kq.cp.version}, Kueue {kq.version}; "
              + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))  # fmt: skip


@pytest.fixture(scope="module")
def kueue_kubelet(kueue: KueueControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApiKubelet]:
    bin_dir = fake_worker_bin(tmp_path_factory.mktemp("kueue-bin"))
    k = RealApiKubelet(kueue.cp.client(user_agent="realapi-kubelet"), tmp_path_factory.mktemp("kueue-kubelet"),
                       kueue.cp.root / "pki", bin_dir=bin_dir).start()  # fmt: skip
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def kenv(kueue: KueueControlPlane, kueue_kubelet: RealApiKubelet, request: pytest.FixtureRequest) -> Iterator[Env]:
    ns = f"k-{request.node.name.removeprefix('test_')[:40].replace('_', '-').rstrip('-')}"
    kueue.cp.create_namespace(ns)
    kueue.cluster_queue(f"cq-{ns}", "1")
    kueue.local_queue(ns, "lq", f"cq-{ns}")
    kueue.wait_queue_active(f"cq-{ns}")
    started = time.monotonic()
    yield Env(kueue.cp, kueue_kubelet, ns)
    TIMINGS[request.node.name] = time.monotonic() - started


@pytest.fixture
def operator(kueue: KueueControlPlane, kenv: Env) -> Iterator[Callable[..., OperatorProcess]]:
    procs: list[OperatorProcess] = []

    def start(**env: str) -> OperatorProcess:
        proc = OperatorProcess(kueue.cp, [kenv.ns], {**OPERATOR_ENV, **env})
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.kill()


# -- helpers -------------------------------------------------------------------------------------


def spec(steps: int, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"base": "builtin:all-MiniLM-L6-v2"},
        "dataset": {"inline": [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]},
        "training": {"maxSteps": steps, "checkpoint": {"everySteps": 10}},
        "resources": {"gpus": 0, "cpu": JOB_CPU, "memory": "1Gi"},
        "queueName": "lq",
        "backoffLimit": 0,  # a preemption that counted as a failure would fail the job
    }
    base.update(over)
    return base


def create_job(env: Env, name: str, body: dict[str, Any], priority: str | None = None) -> None:
    labels = {"kueue.x-k8s.io/priority-class": priority} if priority else {}
    obj = {"apiVersion": contract.API_VERSION, "kind": contract.KIND,
           "metadata": {"name": name, "labels": labels}, "spec": body}  # fmt: skip
    env.api.create(obj, env.ns, plural=contract.PLURAL)


def job_pods(env: Env, job: str, role: str = "train") -> list[dict[str, Any]]:
    return env.pods(f"finetune.dev/job={job},finetune.dev/role={role}")


def workloads(kueue: KueueControlPlane, env: Env) -> list[dict[str, Any]]:
    return kueue.workloads(env.ns)


def trained_steps(env: Env, pod: str) -> list[int]:
    """The steps a training pod printed progress for (its log, as the kubelet kept it)."""
    try:
        text = env.kubelet.logs(env.ns, pod)
    except KeyError:  # never started (preempted while queued)
        return []
    out = []
    for line in text.splitlines():
        if line.startswith("{") and '"progress"' in line:
            out.append(int(json.loads(line)["step"]))
    return out


def show(env: Env, *args: str) -> str:
    """kubectl's output, printed too (pytest -s shows what a user would see at that moment)."""
    text = str(env.kubectl(*args).stdout)
    print(f"\n$ kubectl {' '.join(args)}\n{text}")
    return text


def wait_reason(env: Env, job: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        st = env.status(job)
        return st if st.get("reason") == reason else None

    try:
        return wait_for(reached, timeout, 0.1, what=f"{job} reason {reason}")
    except TimeoutError as e:
        st = env.status(job)
        raise TimeoutError(f"{e}; now {st.get('phase')}: {st.get('reason')} {st.get('message')}") from None


# -- the scenarios -------------------------------------------------------------------------------


def test_priority_preemption_checkpoints_requeues_and_resumes_losing_no_step(
    kueue: KueueControlPlane, kenv: Env, operator: Callable[..., OperatorProcess]
) -> None:
    """low (priority 100) trains alone; high (1000) arrives: Kueue preempts low (TerminationTarget,
    delete: SIGTERM, checkpoint, exit 75), low counts a preemption and queues again with Kueue's
    message while high trains and exports, then resumes from its checkpoint and ends having trained
    every step once. low never starts while high holds the quota, and high is never preempted."""
    env, rec = kenv, PodRecorder(kenv.api, kenv.ns)
    operator()
    env.configure("low-workspace", steps=100, stepSeconds=0.1)
    env.configure("high-workspace", steps=20, stepSeconds=0.1)
    create_job(env, "low", spec(100), "low")
    env.wait_phase("low", "Training", 60)
    env.wait_for(lambda: (env.status("low").get("progress") or {}).get("step", 0) >= 15, 60, "low at step 15")
    create_job(env, "high", spec(20), "high")

    # Kueue stops low's pod in its own words, with the pod's own grace period
    stopped = wait_for(lambda: rec.first("low-train-1", lambda p: any(
        c.get("type") == "TerminationTarget" for c in (p.get("status") or {}).get("conditions") or [])), 60, 0.1,
        what="TerminationTarget on low-train-1")  # fmt: skip
    deleting = wait_for(lambda: rec.first("low-train-1", lambda p: bool(p["metadata"].get("deletionTimestamp"))),
                        30, 0.1, what="low-train-1 deleted")  # fmt: skip
    target = next(c for c in stopped[1]["status"]["conditions"] if c["type"] == "TerminationTarget")
    assert target["reason"] == "WorkloadEvictedDueToPreempted" and "Preempted to accommodate" in target["message"]
    assert deleting[1]["metadata"]["deletionGracePeriodSeconds"] == GRACE == deleting[1]["spec"][
        "terminationGracePeriodSeconds"]  # Kueue deletes with the pod's grace, not 30 s

    # low: one preemption, no failure, back in the queue with Kueue's message, no pod running
    st = wait_reason(env, "low", "Queued", 60)
    first = st["attempts"][0]
    assert (first["result"], first["exitCode"]) == ("preempted", 75), first
    assert "Kueue WorkloadEvictedDueToPreempted: Preempted to accommodate a workload" in first["message"]
    assert (st["preemptions"], st["failures"]) == (1, 0) and st["phase"] == "Pending"
    # the message follows the Workload's (a watch): first the gate ("held by scheduling gate"), then Kueue's
    st = env.wait_for(lambda: "couldn't assign" in (s := env.status("low")).get("message", "") and s, 30,
                      "Kueue's message in low's status")  # fmt: skip
    assert st["message"].startswith("training pod low-train-2 is queued in LocalQueue lq: couldn't assign flavors")
    assert "insufficient unused quota for cpu" in st["message"]
    (queued,) = [p for p in job_pods(env, "low") if not p["metadata"].get("deletionTimestamp")]
    assert queued["metadata"]["name"] == "low-train-2" and not ungated(queued) and not queued["spec"].get("nodeName")
    show(env, "get", "ftj", "-o", "wide")
    described = show(env, "describe", "ftj", "low")
    assert "Queued" in described and "AttemptPreempted" in described

    env.wait_phase("high", "Succeeded", 120)
    st = env.wait_phase("low", "Succeeded", 180)
    high = env.status("high")
    assert high["preemptions"] == 0 and [a["result"] for a in high["attempts"]] == ["completed", "completed"]

    # no step lost: the preempted attempt's last step is where its successor resumed, and every step
    # 1..100 was trained once over all attempts (attempts preempted while still queued trained none)
    trains = [a for a in st["attempts"] if a["role"] == "train"]
    steps = {a["pod"]: trained_steps(env, a["pod"]) for a in trains}
    resumed = int(trains[1]["resumedFrom"].split("-")[1])
    lost = steps["low-train-1"][-1] - resumed
    assert lost == 0, (steps["low-train-1"][-3:], trains[1])
    assert sorted(s for run in steps.values() for s in run) == list(range(1, 101)), {k: v[:2] + v[-2:] for k, v in steps.items()}
    print(f"\nlow's attempts: {[(a['pod'], a['result'], a.get('resumedFrom'), a.get('message')) for a in st['attempts']]}; "
          f"steps lost to the preemption: {lost}")  # fmt: skip
    assert st["failures"] == 0 and st["preemptions"] == sum(a["result"] in ("preempted", "evicted") for a in st["attempts"])

    # never a loop: no low pod started while a high pod held the quota (admitted, not ended)
    rec.close()
    high_pods = [n for n in rec.names() if n.startswith("high-")]
    windows = []
    for name in high_pods:
        start = rec.first(name, ungated)
        end = rec.first(name, ended)
        if start is not None:
            windows.append((start[0], end[0] if end else time.monotonic()))
    for name in (n for n in rec.names() if n.startswith("low-") and n != "low-train-1"):
        began = rec.first(name, running)
        assert began is None or not any(a < began[0] < b for a, b in windows), (name, windows)


def test_a_gang_is_admitted_whole_or_not_at_all(
    kueue: KueueControlPlane, kenv: Env, operator: Callable[..., OperatorProcess]
) -> None:
    """nodes: 2 of 600m on a ClusterQueue of cpu 1 (room for one member): one Workload for the pod
    group, neither member ungated or running, the job queued with Kueue's message; with quota for
    both, both start together."""
    env = kenv
    operator()
    env.configure("gang-workspace", steps=20, stepSeconds=0.05)
    create_job(env, "gang", spec(20, distributed={"nodes": 2}))
    st = wait_reason(env, "gang", "Queued", 60)
    env.wait_for(lambda: "insufficient quota" in env.status("gang").get("message", ""), 30, "Kueue's message")
    st = env.status("gang")
    assert st["message"].startswith("training pod gang-train-1 is queued in LocalQueue lq: member gang-train-1-")
    assert st["message"].endswith("insufficient quota for cpu in flavor default-flavor, request > maximum capacity "
                                  "(1200m > 1)")  # fmt: skip
    (wl,) = workloads(kueue, env)
    assert wl["metadata"]["name"] == "gang-train-1" and [s["count"] for s in wl["spec"]["podSets"]] == [2]
    time.sleep(3)  # long enough for Kueue to have admitted a part, if it ever did
    members = job_pods(env, "gang")
    assert len(members) == 2 and not any(ungated(p) or p["spec"].get("nodeName") for p in members)
    assert all(p["metadata"]["annotations"]["kueue.x-k8s.io/retriable-in-group"] == "false" for p in members)
    show(env, "get", "ftj", "-o", "wide")

    kueue.set_cpu_quota(f"cq-{env.ns}", "2")
    env.wait_for(lambda: all(ungated(p) for p in job_pods(env, "gang")), 30, "both members admitted")
    st = env.wait_phase("gang", "Succeeded", 120)
    assert st["preemptions"] == 0 and st["failures"] == 0 and st["attempts"][0]["pods"] == [
        "gang-train-1-0", "gang-train-1-1"]


def test_suspend_and_kueue_do_not_fight(
    kueue: KueueControlPlane, kenv: Env, operator: Callable[..., OperatorProcess]
) -> None:
    """a (admitted, training) and b (queued behind it, same priority). Suspending b removes its gated
    pod and its Workload; suspending a checkpoints it and frees the quota; b, resumed, is admitted;
    a, resumed, queues behind b (no preemption at equal priority) and resumes from its checkpoint."""
    env = kenv
    operator()
    env.configure("a-workspace", steps=200, stepSeconds=0.05)
    env.configure("b-workspace", steps=20, stepSeconds=0.05)
    create_job(env, "a", spec(200))
    env.wait_phase("a", "Training", 60)
    create_job(env, "b", spec(20))
    wait_reason(env, "b", "Queued", 60)
    env.patch_job("b", {"spec": {"suspend": True}})
    env.wait_phase("b", "Suspended", 30)
    env.wait_for(lambda: not job_pods(env, "b"), 30, "b's gated pod removed")
    env.wait_for(lambda: not [w for w in workloads(kueue, env) if w["metadata"]["name"].startswith("pod-b-")],
                 30, "b's Workload gone")  # fmt: skip
    assert env.status("a")["phase"] == "Training" and env.status("a")["preemptions"] == 0

    env.wait_for(lambda: (env.status("a").get("checkpoint") or {}).get("step", 0) >= 10, 60, "a checkpointed")
    env.patch_job("a", {"spec": {"suspend": True}})
    st = env.wait_for(lambda: (s := env.status("a")).get("phase") == "Suspended"
                      and s["attempts"][0].get("result") and s, 60, "a suspended")  # fmt: skip
    stopped_at = st["checkpoint"]["name"]
    assert st["attempts"][0]["result"] == "preempted" and st["preemptions"] == 0
    env.wait_for(lambda: not job_pods(env, "a"), 30, "a's pod gone")
    time.sleep(2)
    assert not job_pods(env, "a") and not job_pods(env, "b")  # nobody makes pods for suspended jobs

    env.patch_job("b", {"spec": {"suspend": False}})
    env.wait_phase("b", "Training", 60)
    env.patch_job("a", {"spec": {"suspend": False}})
    wait_reason(env, "a", "Queued", 60)
    env.wait_for(lambda: "insufficient unused quota" in env.status("a")["message"], 30, "a queued behind b")
    assert env.status("b")["phase"] == "Training"  # equal priority: a does not preempt b
    env.wait_phase("b", "Succeeded", 90)
    st = env.wait_phase("a", "Succeeded", 120)
    resumed = [a for a in st["attempts"] if a["role"] == "train"][1]["resumedFrom"]
    assert resumed == stopped_at and st["preemptions"] == 0 and st["failures"] == 0
    assert env.status("b")["preemptions"] == 0


def test_deleting_queued_and_admitted_jobs_leaves_no_workload_pod_or_finalizer(
    kueue: KueueControlPlane, kenv: Env, operator: Callable[..., OperatorProcess]
) -> None:
    """The garbage collector deletes a deleted job's pods (Kueue takes its finalizer off: the gated
    one at once, the running one once it ended), then their Workloads: nothing is left, and the
    ClusterQueue holds nothing for them."""
    if not kueue.cp.has_gc:
        pytest.skip("needs kube-controller-manager among the assets (garbage collection)")
    env = kenv
    operator()
    env.configure("run-workspace", steps=400, stepSeconds=0.05)
    env.configure("wait-workspace", steps=20, stepSeconds=0.05)
    create_job(env, "run", spec(400, storage={"reclaimPolicy": "Delete"}))
    env.wait_phase("run", "Training", 60)
    create_job(env, "wait", spec(20, storage={"reclaimPolicy": "Delete"}))
    wait_reason(env, "wait", "Queued", 60)
    assert len(workloads(kueue, env)) == 2
    assert all("kueue.x-k8s.io/managed" in p["metadata"].get("finalizers", []) for p in env.pods("finetune.dev/job"))
    deleted = time.monotonic()
    env.kubectl("delete", "ftj", "run", "wait", "--wait=true", "--timeout=60s", timeout=70)
    env.wait_for(lambda: not env.pods(), 60, "every pod gone")
    env.wait_for(lambda: not workloads(kueue, env), 60, "every Workload gone")
    TIMINGS["deletion to nothing left"] = time.monotonic() - deleted

    def usage() -> dict[str, Any]:
        return dict((kueue.cp.client().get(KUEUE_API, "clusterqueues", None, f"cq-{env.ns}") or {}).get("status") or {})

    env.wait_for(lambda: usage().get("reservingWorkloads", 0) == usage().get("pendingWorkloads", 0) == 0, 30,
                 "the ClusterQueue empty")  # fmt: skip


def test_a_queue_that_does_not_exist_is_said_as_a_warning(
    kueue: KueueControlPlane, kenv: Env, operator: Callable[..., OperatorProcess]
) -> None:
    """spec.queueName naming no LocalQueue: Kueue gates the pod and says so; status says it, as a Warning."""
    env = kenv
    operator()
    create_job(env, "lost", spec(20, queueName="nosuchq"))
    st = wait_reason(env, "lost", "Inadmissible", 60)
    assert st["message"] == "training pod lost-train-1 cannot be admitted in LocalQueue nosuchq: LocalQueue nosuchq doesn't exist"
    env.wait_for(lambda: "Inadmissible" in env.events("lost"), 20, "the Warning Event")
    (pod,) = job_pods(env, "lost")
    assert not ungated(pod) and not pod["spec"].get("nodeName")
