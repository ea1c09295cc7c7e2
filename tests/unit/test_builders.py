"""Pod, PVC and Event builders: what the cluster will be asked to run."""

from __future__ import annotations

import json
from typing import Any

from finetune_api.spec import parse_spec
from finetune_operator.decisions.builders import (
    build_event,
    build_pod,
    build_pvc,
    config_too_large,
    worker_config,
)

JOB: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "faq", "namespace": "ml", "uid": "u-1", "generation": 3, "labels": {"team": "x"}},
    "spec": {
        "dataset": {"inline": [{"question": "q", "answer": "a"}]},
        "resources": {"gpus": 2, "gpuResource": "amd.com/gpu", "cpu": "8", "memory": "32Gi"},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "low", "queueName": "team-a",
    },
}  # fmt: skip


def test_training_pod_is_secure_resumable_and_owned() -> None:
    spec = parse_spec(JOB["spec"])
    pod = build_pod(JOB, spec, "train", 2, image="worker:1", grace_seconds=300)
    meta, ps = pod["metadata"], pod["spec"]
    c = ps["containers"][0]
    assert meta["name"] == "faq-train-2" and meta["namespace"] == "ml"
    assert meta["labels"]["finetune.dev/job"] == "faq" and meta["labels"]["finetune.dev/role"] == "train"
    assert (
        meta["labels"]["finetune.dev/attempt"] == "2"
        and meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    )
    assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "faq",
                                        "uid": "u-1", "controller": True, "blockOwnerDeletion": True}]  # fmt: skip
    assert c["image"] == "worker:1" and c["command"] == [
        "finetune-worker",
        "train",
        "--workspace",
        "/workspace",
    ]
    assert c["resources"]["limits"]["amd.com/gpu"] == 2 and c["resources"]["requests"]["cpu"] == "8"
    assert c["resources"]["limits"]["memory"] == "32Gi"
    assert ps["restartPolicy"] == "Never" and ps["automountServiceAccountToken"] is False
    assert ps["terminationGracePeriodSeconds"] == 300 and ps["priorityClassName"] == "low"
    assert ps["nodeSelector"] == {"pool": "gpu"} and ps["tolerations"][0]["key"] == "gpu"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 1000 and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert ps["volumes"] == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "faq-workspace"}}]
    env = {e["name"]: e["value"] for e in c["env"]}
    cfg = json.loads(env["FINETUNE_CONFIG"])
    assert cfg["metadata"] == {"name": "faq", "namespace": "ml", "uid": "u-1"} and cfg["spec"] == JOB["spec"]


def test_user_fragments_are_copied_not_shared() -> None:
    spec = parse_spec(JOB["spec"])
    pod = build_pod(JOB, spec, "export", 1)
    pod["spec"]["tolerations"][0]["key"] = "changed"
    pod["spec"]["nodeSelector"]["pool"] = "changed"
    assert JOB["spec"]["tolerations"][0]["key"] == "gpu" and JOB["spec"]["nodeSelector"]["pool"] == "gpu"
    assert (
        pod["metadata"]["name"] == "faq-export-1" and pod["spec"]["containers"][0]["command"][1] == "export"
    )


def test_cpu_only_pod_asks_for_no_gpu_and_spec_image_wins() -> None:
    spec = parse_spec({**JOB["spec"], "resources": {"gpus": 0}, "image": "mine:2"})
    c = build_pod(JOB, spec, "train", 1, image="worker:1")["spec"]["containers"][0]
    assert c["image"] == "mine:2" and not any("gpu" in k for k in c["resources"]["limits"])


def test_claim_is_owned_only_when_reclaim_policy_is_delete() -> None:
    keep = build_pvc(JOB, parse_spec({**JOB["spec"], "storage": {"size": "5Gi", "storageClassName": "fast"}}))
    assert (
        "ownerReferences" not in keep["metadata"]
        and keep["spec"]["resources"]["requests"]["storage"] == "5Gi"
    )
    assert keep["spec"]["storageClassName"] == "fast" and keep["metadata"]["name"] == "faq-workspace"
    gone = build_pvc(JOB, parse_spec({**JOB["spec"], "storage": {"reclaimPolicy": "Delete"}}))
    assert gone["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_event_and_config_size() -> None:
    import datetime as dt

    ev = build_event(
        JOB,
        "Warning",
        "BackoffLimitExceeded",
        "failed 4 times",
        dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    )
    assert (
        ev["involvedObject"]["name"] == "faq"
        and ev["type"] == "Warning"
        and ev["lastTimestamp"] == "2026-01-01T00:00:00Z"
    )
    assert config_too_large(JOB) is None and len(worker_config(JOB)) < 1000
