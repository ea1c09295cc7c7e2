"""The real kopf operator against the emulated API, pods run as local processes by the test kubelet.

These tests use tests/operator/fake_worker.py as `finetune-worker` (the worker contract without
torch: progress lines, checkpoints, exit 75 on SIGTERM, summaries) to exercise the operator's
decisions in seconds; test_operator_real_worker.py runs the same lifecycle with real training.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from harness import Cluster, OperatorRunner, finetune_job

from finetune_api import contract

pytestmark = pytest.mark.operator


def spec(**over: Any) -> dict[str, Any]:
    base = {
        "model": {"base": "builtin:all-MiniLM-L6-v2"},
        "dataset": {"inline": [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]},
        "training": {"maxSteps": 20, "checkpoint": {"everySteps": 5}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "backoffLimit": 2,
    }
    base.update(over)
    return base


def configure(cluster: Cluster, claim: str, **cfg: Any) -> None:
    ws = cluster.kubelet.workspace(claim)
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "fake-worker.json").write_text(json.dumps(cfg))


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    job = cluster.job(name)
    return (job or {}).get("status") or {}


def wait_phase(cluster: Cluster, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    return cluster.wait_for(lambda: (s := status(cluster, name)).get("phase") == phase and s, timeout,
                            what=f"{name} phase {phase} (now {status(cluster, name).get('phase')}: "
                                 f"{status(cluster, name).get('message')})")  # fmt: skip


def cond(st: dict[str, Any], type_: str) -> str:
    return next(c["status"] for c in st["conditions"] if c["type"] == type_)


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [
        e["reason"]
        for e in cluster.events(involved_name=name)
        if e.get("source", {}).get("component") == "finetune-operator"
    ]


def test_kill_resume_export_succeed(cluster: Cluster, operator: OperatorRunner) -> None:
    configure(cluster, "job1-workspace", steps=40, stepSeconds=0.1)
    cluster.create(finetune_job("job1", spec(training={"maxSteps": 40, "checkpoint": {"everySteps": 5}})))
    st = wait_phase(cluster, "job1", "Training")
    pod = cluster.pod("job1-train-1")
    assert pod["metadata"]["ownerReferences"][0]["name"] == "job1"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert cluster.get("v1", "persistentvolumeclaims", "default", "job1-workspace") is not None
    cluster.wait_for(
        lambda: (status(cluster, "job1").get("checkpoint") or {}).get("step", 0) >= 10,
        30,
        what="checkpoint-10",
    )
    cluster.kubelet.kill("job1-train-1", signal.SIGKILL)
    cluster.wait_for(lambda: cluster.pod("job1-train-2"), 30, what="second training pod")
    st = wait_phase(cluster, "job1", "Succeeded", 60)
    first, second = st["attempts"][0], st["attempts"][1]
    assert (first["result"], first["exitCode"]) == ("failed", 137)
    assert (
        second["resumedFrom"]
        and second["resumedFrom"].startswith("checkpoint-")
        and second["result"] == "completed"
    )
    assert st["failures"] == 1 and st["restarts"] == 1 and st["progress"]["percent"] == 100.0
    assert st["export"]["path"].endswith("export") and cond(st, "Succeeded") == "True"
    assert st["observedGeneration"] == 1 and st["startTime"] and st["completionTime"]
    # the operator patches status before it posts the pass's Events: the last one may lag a moment
    wanted = ("Started", "Training", "AttemptFailed", "Resumed", "ExportStarted", "Succeeded")
    cluster.wait_for(lambda: set(wanted) <= set(reasons(cluster, "job1")), 10,
                     what=f"events {wanted} (seen {reasons(cluster, 'job1')})")  # fmt: skip


def test_backoff_exhaustion_fails_with_reason(cluster: Cluster, operator: OperatorRunner) -> None:
    configure(cluster, "bad-workspace", train="fail")
    cluster.create(finetune_job("bad", spec(backoffLimit=1)))
    st = wait_phase(cluster, "bad", "Failed", 60)
    assert st["reason"] == "BackoffLimitExceeded" and "injected failure" in st["message"]
    assert [a["result"] for a in st["attempts"]] == ["failed", "failed"] and cond(st, "Failed") == "True"
    # the pass posts its Events after its status patch: wait for the Event, don't race it
    cluster.wait_for(lambda: "BackoffLimitExceeded" in reasons(cluster, "bad"), 10, what="the BackoffLimitExceeded Event")


def test_suspend_and_resume(cluster: Cluster, operator: OperatorRunner) -> None:
    configure(cluster, "sus-workspace", steps=100, stepSeconds=0.05)
    cluster.create(finetune_job("sus", spec()))
    wait_phase(cluster, "sus", "Training")
    cluster.wait_for(lambda: status(cluster, "sus").get("checkpoint"), 30, what="a checkpoint")
    cluster.patch(contract.API_VERSION, contract.PLURAL, "default", "sus", {"spec": {"suspend": True}})
    st = cluster.wait_for(
        lambda: (s := status(cluster, "sus")).get("reason") == "Suspended" and s, 30, what="suspended"
    )
    assert st["phase"] == "Suspended" and cond(st, "Suspended") == "True"
    assert st["attempts"][0]["result"] == "preempted" and st["attempts"][0]["exitCode"] == 75
    assert cluster.pod("sus-train-1") is None and st["preemptions"] == 0
    stopped_at = st["checkpoint"]["name"]
    cluster.patch(contract.API_VERSION, contract.PLURAL, "default", "sus", {"spec": {"suspend": False}})
    st = wait_phase(cluster, "sus", "Succeeded", 60)
    assert st["attempts"][1]["resumedFrom"] == stopped_at and cond(st, "Suspended") == "False"


def test_operator_restart_mid_job_adopts_without_duplicates(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    configure(cluster, "rs-workspace", steps=60, stepSeconds=0.1)
    cluster.create(finetune_job("rs", spec()))
    wait_phase(cluster, "rs", "Training")
    operator.stop()
    operator.start()
    st = wait_phase(cluster, "rs", "Succeeded", 90)
    train_pods = [
        p["metadata"]["name"]
        for p in cluster.pods(label_selector="finetune.dev/job=rs,finetune.dev/role=train")
    ]
    assert train_pods == ["rs-train-1"] and len(st["attempts"]) == 2 and st["restarts"] == 0


def test_invalid_object_beside_a_valid_one(cluster: Cluster, operator: OperatorRunner) -> None:
    configure(cluster, "good-workspace", steps=5)
    cluster.create(finetune_job("broken", spec(training={"learningRate": -1.0})))
    cluster.create(finetune_job("good", spec()))
    st = wait_phase(cluster, "broken", "Failed", 30)
    assert st["reason"] == "InvalidSpec" and "spec.training.learningRate" in st["message"]
    assert cond(st, "Failed") == "True" and cluster.pods(label_selector="finetune.dev/job=broken") == []
    wait_phase(cluster, "good", "Succeeded", 60)
    # the user fixes the spec: the job runs
    cluster.patch(
        contract.API_VERSION,
        contract.PLURAL,
        "default",
        "broken",
        {"spec": {"training": {"learningRate": 1e-4}}},
    )
    configure(cluster, "broken-workspace", steps=5)
    wait_phase(cluster, "broken", "Succeeded", 60)


def test_eviction_does_not_consume_backoff_limit(cluster: Cluster, operator: OperatorRunner) -> None:
    configure(cluster, "ev-workspace", steps=40, stepSeconds=0.05)
    cluster.create(finetune_job("ev", spec(backoffLimit=0)))
    wait_phase(cluster, "ev", "Training")
    cluster.wait_for(lambda: status(cluster, "ev").get("checkpoint"), 30, what="a checkpoint")
    cluster.kubelet.evict("ev-train-1", grace_seconds=0)
    st = wait_phase(cluster, "ev", "Succeeded", 60)
    assert st["attempts"][0]["result"] == "evicted" and st["preemptions"] == 1 and st["failures"] == 0
    assert st["attempts"][1]["resumedFrom"]


def test_ttl_deletes_the_job_and_reclaim_policy_decides_the_claim(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    for name in ("keep", "drop"):
        configure(cluster, f"{name}-workspace", steps=3)
    cluster.create(finetune_job("keep", spec(ttlSecondsAfterFinished=1)))
    cluster.create(finetune_job("drop", spec(ttlSecondsAfterFinished=1, storage={"reclaimPolicy": "Delete"})))
    for name in ("keep", "drop"):
        cluster.wait_for(lambda n=name: cluster.job(n) is None, 60, what=f"{name} deleted by its TTL")
    cluster.wait_for(
        lambda: cluster.pods(label_selector="finetune.dev/job") == [], 30, what="children collected"
    )
    assert cluster.get("v1", "persistentvolumeclaims", "default", "keep-workspace") is not None  # Retain
    cluster.wait_for(lambda: cluster.get("v1", "persistentvolumeclaims", "default", "drop-workspace") is None, 30,
                     what="the Delete claim collected")  # fmt: skip


def test_pod_ending_while_the_operator_is_down_is_picked_up(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    configure(cluster, "down-workspace", steps=40, stepSeconds=0.05)
    cluster.create(finetune_job("down", spec()))
    cluster.wait_for(lambda: status(cluster, "down").get("checkpoint"), 30, what="a checkpoint")
    operator.stop()
    cluster.kubelet.kill("down-train-1", signal.SIGKILL)
    cluster.wait_for(lambda: (cluster.pod("down-train-1") or {}).get("status", {}).get("phase") == "Failed", 30,
                     what="the pod to fail")  # fmt: skip
    operator.start()
    st = wait_phase(cluster, "down", "Succeeded", 60)
    assert st["attempts"][0]["result"] == "failed" and st["attempts"][1]["resumedFrom"]
    assert [a["pod"] for a in st["attempts"] if a["role"] == "train"] == ["down-train-1", "down-train-2"]


def test_from_job_waits_for_its_source_then_trains_on_its_mounted_export(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """Both applied at once (as an Argo CD sync would): the continuation waits, without a pod, until
    the source Succeeded, then its pods mount the source's export read-only and find it (the fake
    worker exits 2 like the real one when the export is not where FINETUNE_SOURCE_EXPORT says)."""
    configure(cluster, "src-workspace", steps=30, stepSeconds=0.1)
    configure(cluster, "cont-workspace", steps=5)
    cluster.create(finetune_job("src", spec()))
    cluster.create(finetune_job("cont", spec(model={"fromJob": "src"})))
    wait_phase(cluster, "src", "Training")
    st = cluster.wait_for(lambda: (s := status(cluster, "cont")).get("reason") == "WaitingForSourceJob" and s, 30,
                          what="cont waiting for src")  # fmt: skip
    assert st["phase"] == "Pending" and "src" in st["message"]
    assert cluster.pods(label_selector="finetune.dev/job=cont") == []
    wait_phase(cluster, "src", "Succeeded", 60)
    st = wait_phase(cluster, "cont", "Succeeded", 60)
    assert [a["result"] for a in st["attempts"]] == ["completed", "completed"], st["attempts"]
    pod = cluster.pod("cont-train-1")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    src_volume = next(n for n, c in claims.items() if c == "src-workspace")
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == src_volume)
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert mount["readOnly"] is True and mount["mountPath"] == env["FINETUNE_SOURCE_EXPORT"]
    assert "WaitingForSourceJob" in reasons(cluster, "cont")


def test_from_job_of_a_failed_source_fails_with_the_reason(cluster: Cluster, operator: OperatorRunner) -> None:
    configure(cluster, "bad-src-workspace", train="invalid")
    cluster.create(finetune_job("bad-src", spec()))
    cluster.create(finetune_job("after-bad", spec(model={"fromJob": "bad-src"})))
    wait_phase(cluster, "bad-src", "Failed", 30)
    st = wait_phase(cluster, "after-bad", "Failed", 30)
    assert st["reason"] == "SourceJobFailed" and "bad-src" in st["message"]
    assert cluster.pods(label_selector="finetune.dev/job=after-bad") == []
