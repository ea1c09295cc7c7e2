"""Tier-3 scenarios against a real kube-apiserver: the real operator process, the real RBAC of
manifests/rbac, the test kubelet (kubelet.py) binding and running pods with tests/operator/fake_worker.py
(the worker contract without torch) and, when kube-controller-manager is among the assets, the
real garbage collector.

The last tests are the findings of issue 12 (deletion with the operator down, a pod-log outage
while suspend is asked, progress after a resume): the timer-based operator failed them; the
watch-driven one passes them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from controlplane import ApiError, ControlPlane, free_port
from operator_proc import OperatorProcess
from realenv import Env

from finetune_api import contract

pytestmark = pytest.mark.slow


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"base": "builtin:all-MiniLM-L6-v2"},
        "dataset": {"inline": [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]},
        "training": {"maxSteps": 20, "checkpoint": {"everySteps": 5}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "backoffLimit": 2,
    }
    base.update(over)
    return base


def cond(st: dict[str, Any], type_: str) -> str:
    return next(c["status"] for c in st["conditions"] if c["type"] == type_)


def train_pods(env: Env, job: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in env.pods(f"finetune.dev/job={job},finetune.dev/role=train"))


def checkpoint_step(env: Env, job: str) -> int:
    return int((env.status(job).get("checkpoint") or {}).get("step") or 0)


def test_lifecycle_pod_deletion_resumes_and_kubectl_wait(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    """Create -> Training -> `kubectl delete pod` (a preemption: SIGTERM, checkpoint, exit 75) ->
    attempt 2 resumes from the checkpoint -> export -> `kubectl wait --for=condition=Succeeded`."""
    operator()
    env.configure("life-workspace", steps=40, stepSeconds=0.1)
    env.create_job("life", spec(training={"maxSteps": 40, "checkpoint": {"everySteps": 5}}))
    env.wait_phase("life", "Training", 60)
    pod = env.pod("life-train-1")
    assert pod is not None and pod["spec"]["nodeName"] == "realapi-node"
    assert pod["metadata"]["ownerReferences"][0]["name"] == "life" and pod["spec"]["securityContext"]["runAsNonRoot"]
    assert env.claim("life-workspace") is not None
    env.wait_for(lambda: checkpoint_step(env, "life") >= 10, 60, "checkpoint-10")
    env.kubectl("delete", "pod", "life-train-1", "--wait=true", "--timeout=60s")
    env.wait_for(lambda: env.pod("life-train-2"), 60, "the second training pod")
    waited = env.kubectl("wait", "--for=condition=Succeeded", "ftj/life", "--timeout=120s", timeout=130)
    assert "condition met" in waited.stdout
    st = env.status("life")
    first, second = st["attempts"][0], st["attempts"][1]
    assert (first["result"], first["exitCode"]) == ("preempted", 75), first
    assert second["resumedFrom"] == first.get("checkpoint", second["resumedFrom"]) and second["result"] == "completed"
    assert second["resumedFrom"].startswith("checkpoint-") and int(second["resumedFrom"].split("-")[1]) >= 10
    assert st["preemptions"] == 1 and st.get("failures", 0) == 0 and st["progress"]["percent"] == 100.0
    assert cond(st, "Succeeded") == "True" and st["observedGeneration"] == 1
    row = env.kubectl("get", "ftj", "life", "--no-headers").stdout.split()
    assert row[1:3] == ["Succeeded", "100"], row
    wanted = {"Started", "Resumed", "ExportStarted", "Succeeded"}
    env.wait_for(lambda: wanted <= set(env.events("life")), 20, f"events {wanted}")


def test_killed_training_pod_is_a_failure_and_resumes(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    operator()
    env.configure("crash-workspace", steps=30, stepSeconds=0.1)
    env.create_job("crash", spec(training={"maxSteps": 30, "checkpoint": {"everySteps": 5}}))
    env.wait_for(lambda: checkpoint_step(env, "crash") >= 5, 60, "a checkpoint")
    env.kubelet.kill(env.ns, "crash-train-1", signal.SIGKILL)
    st = env.wait_phase("crash", "Succeeded", 90)
    assert (st["attempts"][0]["result"], st["attempts"][0]["exitCode"]) == ("failed", 137)
    assert st["attempts"][1]["resumedFrom"] and st["failures"] == 1 and st["restarts"] == 1


def test_suspend_and_resume(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    operator()
    env.configure("sus-workspace", steps=100, stepSeconds=0.05)
    env.create_job("sus", spec())
    env.wait_phase("sus", "Training", 60)
    env.wait_for(lambda: env.status("sus").get("checkpoint"), 60, "a checkpoint")
    env.patch_job("sus", {"spec": {"suspend": True}})
    # Suspended comes first (the pod is terminating: SIGTERM, checkpoint, exit 75); the attempt's result
    # once the pod has ended
    st = env.wait_for(lambda: (s := env.status("sus")).get("phase") == "Suspended"
                      and (s.get("attempts") or [{}])[0].get("result") and s, 60, "suspended, attempt ended")  # fmt: skip
    assert cond(st, "Suspended") == "True"
    assert st["attempts"][0]["result"] == "preempted" and st["attempts"][0]["exitCode"] == 75
    env.wait_for(lambda: env.pod("sus-train-1") is None, 30, "the suspended pod removed")
    assert st.get("preemptions", 0) == 0
    stopped_at = st["checkpoint"]["name"]
    env.patch_job("sus", {"spec": {"suspend": False}})
    st = env.wait_phase("sus", "Succeeded", 90)
    assert st["attempts"][1]["resumedFrom"] == stopped_at and cond(st, "Suspended") == "False"


def test_operator_killed_mid_training_no_duplicates(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    op = operator()
    env.configure("rs-workspace", steps=60, stepSeconds=0.1)
    env.create_job("rs", spec())
    env.wait_phase("rs", "Training", 60)
    op.kill()  # SIGKILL: no cleanup, as a lost node
    op.start()
    st = env.wait_phase("rs", "Succeeded", 120)
    assert train_pods(env, "rs") == ["rs-train-1"] and st.get("restarts", 0) == 0
    assert [a["role"] for a in st["attempts"]] == ["train", "export"]


def test_backoff_exhaustion_fails_with_reason(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    operator()
    env.configure("bad-workspace", train="fail")
    env.create_job("bad", spec(backoffLimit=1))
    st = env.wait_phase("bad", "Failed", 90)
    assert st["reason"] == "BackoffLimitExceeded" and "injected failure" in st["message"]
    assert [a["result"] for a in st["attempts"]] == ["failed", "failed"] and cond(st, "Failed") == "True"
    env.wait_for(lambda: "BackoffLimitExceeded" in env.events("bad"), 20, "the BackoffLimitExceeded event")


def test_invalid_objects_beside_a_valid_one(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    """One file, three jobs: the server refuses one (schema), the worker refuses one (exit 2: no
    retry), the third succeeds; none holds the others up."""
    operator()
    env.configure("good-workspace", steps=5)
    env.configure("nodata-workspace", train="invalid")
    docs = []
    for name, sp in (("refused", spec(training={"learningRate": -1.0})), ("nodata", spec()), ("good", spec())):
        docs.append({"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": name}, "spec": sp})
    import yaml

    out = env.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert out.returncode != 0 and "spec.training.learningRate" in out.stderr, out.stderr
    assert env.job("refused") is None
    st = env.wait_phase("nodata", "Failed", 60)
    assert [a["result"] for a in st["attempts"]] == ["invalid"] and "column 'answer'" in st["message"]
    env.wait_phase("good", "Succeeded", 90)


def test_job_deletion_collects_pods_and_honours_reclaim_policy(
    env: Env, control_plane: ControlPlane, operator: Callable[..., OperatorProcess]
) -> None:
    if not control_plane.has_gc:
        pytest.skip("needs kube-controller-manager among the assets (garbage collection)")
    operator()
    env.configure("keep-workspace", steps=400, stepSeconds=0.1)
    env.configure("drop-workspace", steps=400, stepSeconds=0.1)
    env.create_job("keep", spec(training={"maxSteps": 400}))
    env.create_job("drop", spec(training={"maxSteps": 400}, storage={"reclaimPolicy": "Delete"}))
    for name in ("keep", "drop"):
        env.wait_phase(name, "Training", 60)
    env.kubectl("delete", "ftj", "keep", "drop", "--wait=true", "--timeout=60s", timeout=70)
    env.wait_for(lambda: env.pods("finetune.dev/job") == [], 60, "the jobs' pods garbage-collected")
    env.wait_for(lambda: env.claim("drop-workspace") is None, 60, "the Delete claim collected")
    assert env.claim("keep-workspace") is not None  # Retain
    assert not env.kubelet.started(env.ns, "keep-train-2")


def test_100_jobs_at_once_each_get_one_training_pod(
    env: Env, operator: Callable[..., OperatorProcess]
) -> None:
    """No room in the cluster (nothing schedules these pods): the control plane alone is measured."""
    env.kubelet.unscheduled_namespaces.add(env.ns)
    operator(FINETUNE_RESYNC_SECONDS="5")
    n = 100
    small = {"dataset": {"inline": [{"question": "q", "answer": "a"}]}, "resources": {"gpus": 1}}
    for i in range(n):
        env.create_job(f"job-{i:03d}", small)
    env.wait_for(lambda: len(env.pods()) >= n, 120, "100 training pods")

    def all_pending() -> bool:
        jobs = env.api.list(contract.API_VERSION, contract.PLURAL, env.ns)
        return len(jobs) == n and all((j.get("status") or {}).get("attempts") for j in jobs)

    env.wait_for(all_pending, 120, "100 statuses with their first attempt")
    names = sorted(p["metadata"]["name"] for p in env.pods())
    assert names == [f"job-{i:03d}-train-1" for i in range(n)]
    assert len(env.api.list("v1", "persistentvolumeclaims", env.ns)) == n
    jobs = env.api.list(contract.API_VERSION, contract.PLURAL, env.ns)
    assert {j["status"]["phase"] for j in jobs} == {"Pending"}


# -- the findings of issue 12 ----------------------------------------------------------------------


def test_deleting_a_job_with_the_operator_stopped_completes_at_once(
    env: Env, control_plane: ControlPlane, operator: Callable[..., OperatorProcess]
) -> None:
    op = operator()
    env.configure("orphan-workspace", steps=400, stepSeconds=0.1)
    env.create_job("orphan", spec(training={"maxSteps": 400}))
    env.wait_phase("orphan", "Training", 60)
    op.stop()
    finalizers = (env.job("orphan") or {}).get("metadata", {}).get("finalizers") or []
    out = env.kubectl("delete", "ftj", "orphan", "--wait=true", "--timeout=15s", check=False, timeout=30)
    gone = env.job("orphan") is None
    if not gone:  # leave nothing hanging for the next tests
        env.patch_job("orphan", {"metadata": {"finalizers": None}})
    assert gone, f"deletion hung on finalizers {finalizers}: {out.stderr.strip()}"
    if control_plane.has_gc:
        env.wait_for(lambda: env.pods("finetune.dev/job=orphan") == [], 60, "the orphan's pod collected")


def test_pod_log_of_an_unreachable_kubelet_is_a_server_error(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    """What the real server answers for `pods/log` when the node's kubelet cannot serve it (the
    outage the next test makes): a 5xx, not a 404 or an empty log."""
    operator()
    env.configure("peek-workspace", steps=400, stepSeconds=0.1)
    env.create_job("peek", spec(training={"maxSteps": 400}))
    env.wait_phase("peek", "Training", 60)
    path = f"/api/v1/namespaces/{env.ns}/pods/peek-train-1/log"
    # the worker's JSON lines, served by the test kubelet through the server
    env.wait_for(lambda: '"event"' in env.api.request("GET", path, params={"tailLines": "5"}, raw=True), 30,
                 "the worker's first lines through pods/log")  # fmt: skip
    env.kubelet.logs_available = False
    with pytest.raises(ApiError) as err:
        env.api.request("GET", path, params={"tailLines": "5"})
    assert err.value.status >= 500, err.value
    env.kubelet.logs_available = True
    env.patch_job("peek", {"spec": {"suspend": True}})
    env.wait_phase("peek", "Suspended", 60)


def test_pod_log_on_a_node_without_a_kubelet_is_a_server_error(env: Env) -> None:
    """A Running pod on a node whose kubelet port answers nothing (a NotReady node): `pods/log`
    is a 5xx from the API server, whatever the client asked for."""
    node = f"ghost-{env.ns}"
    env.api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    port = free_port()  # nothing listens there
    env.api.patch("v1", "nodes", None, node, {"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}}, subresource="status")  # fmt: skip
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ghost"},
           "spec": {"nodeName": node, "containers": [{"name": "worker", "image": "busybox"}]}}  # fmt: skip
    env.api.create(pod, env.ns)
    env.api.patch("v1", "pods", env.ns, "ghost", {"status": {"phase": "Running"}}, subresource="status")
    with pytest.raises(ApiError) as err:
        env.api.request("GET", f"/api/v1/namespaces/{env.ns}/pods/ghost/log", params={"tailLines": "5"})
    assert err.value.status >= 500 and "connection refused" in err.value.message, err.value
    env.api.delete("v1", "pods", env.ns, "ghost", grace_seconds=0)
    env.api.delete("v1", "nodes", None, node)


def test_suspend_is_acted_on_during_a_pod_log_outage(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    operator()
    env.configure("outage-workspace", steps=600, stepSeconds=0.1)
    env.create_job("outage", spec(training={"maxSteps": 600}))
    env.wait_phase("outage", "Training", 60)
    env.wait_for(lambda: env.status("outage").get("progress"), 30, "progress")
    env.kubelet.logs_available = False  # cuts the operator's log stream; opening it again fails
    try:
        st = env.wait_for(lambda: (s := env.status("outage")).get("progress", {}).get("stale") and s, 30,
                          "progress marked stale")  # fmt: skip
        assert st["phase"] == "Training" and "progress stale" in st["message"], st
        env.patch_job("outage", {"spec": {"suspend": True}})
        # Suspended (reason Suspending) comes as the pod is deleted; the attempt's result once it has ended
        st = env.wait_for(lambda: (s := env.status("outage")).get("phase") == "Suspended"
                          and s["attempts"][0].get("result") and s, 30, "suspended despite the log outage")  # fmt: skip
        assert st["attempts"][0]["result"] == "preempted"
    finally:
        env.kubelet.logs_available = True


def test_progress_of_a_training_job_comes_from_one_log_stream(env: Env, operator: Callable[..., OperatorProcess]) -> None:
    """Through the real server's pods/log proxy: one follow stream for the pod, no tail read per
    interval, and status progress still moves."""
    operator()
    env.configure("stream-workspace", steps=400, stepSeconds=0.05)
    env.create_job("stream", spec(training={"maxSteps": 400}))
    before = env.wait_for(lambda: (env.status("stream").get("progress") or {}).get("step"), 60, "progress")
    reads = env.kubelet.log_requests  # every containerLogs request, of every test's pods
    time.sleep(3)  # 3 progress intervals at FINETUNE_RESYNC_SECONDS=1
    after = (env.status("stream").get("progress") or {}).get("step")
    assert after > before and env.status("stream")["phase"] == "Training", (before, after)
    assert env.kubelet.log_requests == reads, f"{env.kubelet.log_requests - reads} log requests while training"
    assert env.kubelet.log_streams[(env.ns, "stream-train-1")] == 1
    env.patch_job("stream", {"spec": {"suspend": True}})
    env.wait_phase("stream", "Suspended", 60)


def test_progress_after_a_resume_starts_at_the_resume_point(
    env: Env, operator: Callable[..., OperatorProcess]
) -> None:
    """SIGKILL between checkpoints: attempt 2 resumes from checkpoint-N while the last progress seen
    was step P > N. Until attempt 2 logs its own progress (slow here: 4 s a step), status must not
    claim step P, nor must the Resumed event."""
    operator()
    env.configure("prog-workspace", steps=200, stepSeconds=0.4)
    env.create_job("prog", spec(training={"maxSteps": 200, "checkpoint": {"everySteps": 5}}))
    env.wait_phase("prog", "Training", 60)

    def between_checkpoints() -> int:
        st = env.status("prog")
        step, ckpt = int((st.get("progress") or {}).get("step") or 0), checkpoint_step(env, "prog")
        return step if ckpt and step > ckpt + 1 else 0

    seen = env.wait_for(between_checkpoints, 60, "progress past a checkpoint")
    env.configure("prog-workspace", steps=200, stepSeconds=4)  # attempt 2 logs its first step after 4 s
    env.kubelet.kill(env.ns, "prog-train-1", signal.SIGKILL)
    env.wait_for(lambda: len(env.status("prog").get("attempts") or []) >= 2
                 and (env.pod("prog-train-2") or {}).get("status", {}).get("phase") == "Running", 60,
                 "attempt 2 running")  # fmt: skip
    time.sleep(1.5)  # the operator has read the new pod at least once (FINETUNE_RESYNC_SECONDS=1)
    st = env.status("prog")
    resumed = st["attempts"][1]["resumedFrom"]
    resume_step = int(resumed.split("-")[1])
    assert resume_step < seen, f"precondition: resumed from {resumed}, last progress seen {seen}"
    step = (st.get("progress") or {}).get("step")
    assert step is None or step <= resume_step, f"progress says step {step} while resuming from {resumed}"
    items = env.api.list("v1", "events", env.ns, fieldSelector="involvedObject.name=prog")
    resumed_events = [e["message"] for e in items if e["reason"] == "Resumed"]
    assert resumed_events and all(f"step {seen}/" not in m for m in resumed_events), resumed_events
