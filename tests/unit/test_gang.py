"""Multi-node attempts (gang.py): names, the gang's manifests, and the reconcile table of a gang's life."""

from __future__ import annotations

import re
from typing import Any

import pytest

from finetune_api.spec import parse_spec
from finetune_operator.decisions.builders import build_pvc
from finetune_operator.decisions.gang import (
    POD_GROUP_COUNT,
    POD_GROUP_LABEL,
    dns_label,
    member_name,
    service_name,
)
from finetune_operator.decisions.observe import PodObservation
from unit.test_reconcile import T0, job, kinds, step

LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
TWO = {"distributed": {"nodes": 2}}


def member(attempt: int, rank: int, phase: str = "Running", result: str | None = None, **kw: Any) -> PodObservation:
    return PodObservation(name=f"faq-train-{attempt}-{rank}", role="train", attempt=attempt, phase=phase,
                          result=result, rank=rank, **kw)


def env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("name", ["faq", "a" * 63, "9" + "b" * 62, "x-" * 31 + "y", "c" * 48, "d" * 49])
def test_names_are_dns_labels_for_any_valid_job_name(name: str) -> None:
    for n in (member_name(name, 12345, 63), service_name(name)):
        assert LABEL.match(n) and len(n) <= 63, n
    assert service_name(name)[0].isalpha()  # a Service name is a DNS-1035 label
    assert member_name(name, 1, 0) != member_name(name, 1, 1) != member_name(name[:-1] + "z", 1, 1)
    assert dns_label("short") == "short"
    members = [member_name(name, 7, r) for r in range(12)]
    assert sorted(members)[0] == members[0]  # c10d ranks nodes by sorted address: global rank 0 on member 0
    assert len({m.rsplit("-", 1)[0] for m in members}) == 1


def test_launch_creates_a_service_and_every_member_with_rendezvous_env_and_kueue_metadata() -> None:
    j, plan = step(job({**TWO, "queueName": "gpu"}), [], claim=False)
    assert kinds(plan) == [("PersistentVolumeClaim", "faq-workspace"), ("Service", "faq-rdzv"),
                           ("Pod", "faq-train-1-0"), ("Pod", "faq-train-1-1")]
    pvc, svc, *pods = plan.create
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    for rank, p in enumerate(pods):
        meta = p["metadata"]
        assert meta["labels"][POD_GROUP_LABEL] == "faq-train-1" and meta["annotations"][POD_GROUP_COUNT] == "2"
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu" and meta["labels"]["finetune.dev/rank"] == str(rank)
        assert p["spec"]["hostname"] == meta["name"] and p["spec"]["subdomain"] == "faq-rdzv"
        e = env(p)
        assert e["PET_NNODES"] == "2" and e["PET_RDZV_BACKEND"] == "c10d" and e["PET_RDZV_ID"] == "faq-train-1"
        assert e["PET_RDZV_ENDPOINT"] == "faq-train-1-0.faq-rdzv:29400"
        assert e["PET_RDZV_CONF"] == f"is_host={'true' if rank == 0 else 'false'}"
        assert int(e["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < p["spec"]["terminationGracePeriodSeconds"]
        assert p["spec"]["automountServiceAccountToken"] is False
    st = j["status"]
    assert st["worldSize"] == 2
    assert st["attempts"][0] == {**st["attempts"][0], "pod": "faq-train-1", "worldSize": 2,
                                 "pods": ["faq-train-1-0", "faq-train-1-1"]}


def test_one_member_evicted_ends_the_attempt_stops_the_rest_and_relaunches_the_whole_gang() -> None:
    j, _ = step(job(TWO), [], claim=False)
    j, plan = step(j, [member(1, 0), member(1, 1)])
    assert j["status"]["phase"] == "Training" and not plan.delete
    # member 1 evicted: its pod is gone; member 0 still runs -> it is stopped, the attempt waits for it
    j, plan = step(j, [member(1, 0)])
    assert [d.name for d in plan.delete] == ["faq-train-1-0"] and not plan.create
    assert not j["status"]["attempts"][0].get("result")
    # member 0 checkpointed and exited 75: the attempt ends as the eviction that started it
    stopped = member(1, 0, "Failed", "preempted", exit_code=75, finished_at="2026-01-01T12:00:05Z",
                     summary={"result": "preempted", "checkpoint": "checkpoint-7", "step": 7})
    j, plan = step(j, [stopped], now=T0)
    a = j["status"]["attempts"][0]
    assert a["result"] == "evicted" and a["endedFirst"]["pod"] == "faq-train-1-1"
    assert j["status"]["checkpoint"]["name"] == "checkpoint-7"
    assert j["status"]["preemptions"] == 1 and j["status"]["failures"] == 0  # backoffLimit untouched
    assert [n for k, n in kinds(plan) if k == "Pod"] == ["faq-train-2-0", "faq-train-2-1"]
    assert j["status"]["attempts"][1]["resumedFrom"] == "checkpoint-7"


def test_a_member_failure_counts_once_per_attempt() -> None:
    j, _ = step(job(TWO), [], claim=False)
    crashed = member(1, 1, "Failed", "failed", exit_code=1, finished_at="2026-01-01T12:00:01Z",
                     message="rank 2: RuntimeError")
    j, plan = step(j, [member(1, 0), crashed])
    assert [d.name for d in plan.delete] == ["faq-train-1-0"]
    also = member(1, 0, "Failed", "failed", exit_code=1, finished_at="2026-01-01T12:00:09Z")
    j, plan = step(j, [also, crashed])
    a = j["status"]["attempts"][0]
    assert a["result"] == "failed" and a["endedFirst"] == {"pod": "faq-train-1-1", "result": "failed",
                                                           "exitCode": 1, "reason": None,
                                                           "message": "rank 2: RuntimeError"}
    assert j["status"]["failures"] == 1


def test_every_member_completing_completes_the_attempt_and_starts_the_export() -> None:
    j, _ = step(job(TWO), [], claim=False)
    done = [member(1, r, "Succeeded", "completed", exit_code=0, summary={"result": "completed", "step": 12})
            for r in (0, 1)]
    j, plan = step(j, done)
    assert j["status"]["attempts"][0]["result"] == "completed"
    assert kinds(plan) == [("Pod", "faq-export-1")]


def test_an_operator_restart_adopts_a_running_gang_as_one_attempt() -> None:
    j, plan = step(job(TWO), [member(3, 0), member(3, 1)])  # status lost; the gang of attempt 3 runs
    assert not plan.create and not plan.delete
    assert [a["pod"] for a in j["status"]["attempts"]] == ["faq-train-3"]


def test_single_pod_distributed_gets_the_torchrun_shutdown_timeout_and_a_world_size() -> None:
    j, plan = step(job({"distributed": {"procsPerNode": 2}}), [], claim=False)
    pod = plan.create[-1]
    assert pod["metadata"]["name"] == "faq-train-1" and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in env(pod)
    assert j["status"]["worldSize"] == 2
    spec = parse_spec({"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}})
    assert build_pvc(job(), spec)["spec"]["accessModes"] == ["ReadWriteOnce"]
