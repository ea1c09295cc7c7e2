"""Kueue (decisions/kueue.py): what a queued pod waits for and who stopped a preempted one, in
Kueue's own words, and how reconcile tells the user. The objects are shaped as Kueue v0.13 wrote
them on a real API server (tests/realapi/test_kueue_realapi.py runs the same story for real)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_gang import TWO, member
from test_reconcile import job, reasons, started, step

from finetune_api.spec import parse_spec
from finetune_operator.cluster.informer import Informer
from finetune_operator.decisions.builders import PRIORITY_LABEL, QUEUE_LABEL, build_pod
from finetune_operator.decisions.gang import RETRIABLE_IN_GROUP, gang_members
from finetune_operator.decisions.kueue import (
    ADMISSION_GATE,
    admission_hold,
    termination_target,
    workload_pods,
    workload_view,
)
from finetune_operator.decisions.observe import classify, observe_pod

QUOTA = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default-flavor, 200m more needed"
PREEMPTED = ("Preempted to accommodate a workload (UID: 18f475e1, JobUID: c090c5f1) due to prioritization in the "
             "ClusterQueue")  # fmt: skip
GATE = {"schedulingGates": [{"name": ADMISSION_GATE}], "containers": [{"name": "worker"}]}


def workload(name: str = "pod-faq-train-1-47816", owners: tuple[str, ...] = ("faq-train-1",),
             conditions: list[dict[str, Any]] | None = None, admission: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": name, "namespace": "ml", "labels": {"kueue.x-k8s.io/job-uid": "u"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": o, "uid": "u"} for o in owners]},
        "spec": {"queueName": "lq", "priorityClassName": "low", "priority": 100,
                 "podSets": [{"name": "main", "count": 1, "template": {"spec": {"containers": []}}}]},
        "status": {"conditions": conditions or [], **({"admission": admission} if admission else {}),
                   "resourceRequests": [{"name": "main", "resources": {"cpu": "600m"}}]},
    }  # fmt: skip


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T12:00:00Z", "observedGeneration": 1}  # fmt: skip


PENDING = workload(conditions=[cond("QuotaReserved", "False", "Pending", QUOTA)])


def gated_pod(name: str = "faq-train-1", queue: str = "lq") -> dict[str, Any]:
    _, role, attempt = name.rsplit("-", 2)
    labels = {"finetune.dev/job": "faq", "finetune.dev/role": role, "finetune.dev/attempt": attempt,
              QUEUE_LABEL: queue, "kueue.x-k8s.io/managed": "true"}  # fmt: skip
    return {"metadata": {"name": name, "labels": labels, "finalizers": ["kueue.x-k8s.io/managed"]}, "spec": GATE,
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                       "reason": "SchedulingGated", "message": "Scheduling is blocked due to non-empty scheduling gates"}]}}  # fmt: skip


def test_a_workload_is_kept_as_a_small_view_under_each_pod_it_stands_for() -> None:
    group = workload("faq-train-1", ("faq-train-1-0", "faq-train-1-1"),
                     [cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                      cond("Admitted", "True", "Admitted", "The workload is admitted"),
                      cond("PodsReady", "False", "PodsReady", "ignored")], {"clusterQueue": "cq"})  # fmt: skip
    assert workload_pods(group) == ["faq-train-1-0", "faq-train-1-1"]
    view = workload_view(group)
    assert view == {"name": "faq-train-1", "queue": "lq", "priorityClass": "low", "priority": 100, "clusterQueue": "cq",
                    "conditions": {"QuotaReserved": {"status": "True", "reason": "QuotaReserved",
                                                     "message": "Quota reserved in ClusterQueue cq"},
                                   "Admitted": {"status": "True", "reason": "Admitted",
                                                "message": "The workload is admitted"}}}  # fmt: skip
    other = workload(owners=())
    other["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "etl"}]
    assert workload_pods(other) == []  # a batch Job's Workload: nothing of ours


GENERIC = ("SchedulingGated", f"held by scheduling gate {ADMISSION_GATE}")  # before Kueue said anything


@pytest.mark.parametrize(
    ("wl", "hold", "held"),
    [
        (None, None, GENERIC),
        (workload(), None, GENERIC),  # made, no verdict yet
        (PENDING, ("Queued", QUOTA), ("Queued", QUOTA)),
        (workload(conditions=[cond("QuotaReserved", "False", "Inadmissible", "LocalQueue lq doesn't exist")]),
         ("Inadmissible", "LocalQueue lq doesn't exist"), ("Inadmissible", "LocalQueue lq doesn't exist")),
        (workload(conditions=[cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                              cond("Admitted", "False", "NoChecks", "waiting for provisioning")], admission={"clusterQueue": "cq"}),
         ("Queued", "quota reserved in ClusterQueue cq, waiting for admission checks: waiting for provisioning"),
         ("Queued", "quota reserved in ClusterQueue cq, waiting for admission checks: waiting for provisioning")),
        (workload(conditions=[cond("QuotaReserved", "True", "QuotaReserved"), cond("Admitted", "True", "Admitted")],
                  admission={"clusterQueue": "cq"}), None, None),  # admitted: Kueue is removing the gate
    ],
    ids=["no-workload-yet", "no-verdict-yet", "quota", "inadmissible", "admission-checks", "admitted"],
)
def test_a_pod_behind_kueues_gate_is_held_in_the_workloads_words(
    wl: dict[str, Any] | None, hold: tuple[str, str] | None, held: tuple[str, str] | None
) -> None:
    view = workload_view(wl) if wl is not None else None
    assert admission_hold(view) == hold
    obs = observe_pod(gated_pod(), workload=view)
    assert obs.held == held and obs.queue == "lq" and obs.result is None


def test_another_gate_still_holds_a_pod_kueue_admitted() -> None:
    pod = gated_pod()
    pod["spec"] = {**GATE, "schedulingGates": [{"name": ADMISSION_GATE}, {"name": "example.com/capacity-check"}]}
    admitted = workload_view(workload(conditions=[cond("Admitted", "True", "Admitted")]))
    assert observe_pod(pod, workload=admitted).held == ("SchedulingGated", "held by scheduling gate example.com/capacity-check")


def test_a_queued_job_says_its_queue_and_kueues_message_with_a_normal_event_once() -> None:
    j = started(job({"queueName": "lq"}))
    j, plan = step(j, [observe_pod(gated_pod(), workload=workload_view(PENDING))])
    st = j["status"]
    assert (st["phase"], st["reason"]) == ("Pending", "Queued")
    assert st["message"] == f"training pod faq-train-1 is queued in LocalQueue lq: {QUOTA}"
    assert [(e["type"], e["reason"]) for e in plan.events] == [("Normal", "Queued")]
    assert plan.create == [] and plan.delete == [] and plan.requeue_after is None  # the watches bring what changes
    more = workload_view(workload(conditions=[cond("QuotaReserved", "False", "Pending", QUOTA.replace("200m", "400m"))]))
    j, plan = step(j, [observe_pod(gated_pod(), workload=more)])
    assert "400m more needed" in j["status"]["message"] and reasons(plan) == []  # a new message, not a new Event
    _, plan = step(j, [observe_pod(gated_pod(), workload=more)])
    assert plan.status is None  # the same words: nothing written


def test_an_inadmissible_workload_is_a_warning() -> None:
    wl = workload_view(workload(conditions=[cond("QuotaReserved", "False", "Inadmissible", "LocalQueue nosuchq doesn't exist")]))
    j, plan = step(started(job({"queueName": "nosuchq"})), [observe_pod(gated_pod(queue="nosuchq"), workload=wl)])
    assert (j["status"]["reason"], j["status"]["message"]) == (
        "Inadmissible", "training pod faq-train-1 cannot be admitted in LocalQueue nosuchq: LocalQueue nosuchq doesn't exist")
    assert [(e["type"], e["reason"]) for e in plan.events] == [("Warning", "Inadmissible")]


def killed(code: int, conditions: list[dict[str, Any]], message: str = "") -> dict[str, Any]:
    term = {"exitCode": code, "reason": "Error", "message": message, "finishedAt": "2026-01-01T12:01:00Z"}
    return {"phase": "Failed", "conditions": conditions, "containerStatuses": [{"state": {"terminated": term}}]}


KUEUE_STOPPED = cond("TerminationTarget", "True", "WorkloadEvictedDueToPreempted", PREEMPTED)


@pytest.mark.parametrize(
    ("code", "result"),
    [(75, "preempted"), (143, "evicted"), (137, "evicted"), (1, "evicted")],
    ids=["checkpointed", "sigterm-default-handler", "killed-after-grace", "crashed-while-stopping"],
)
def test_kueues_termination_target_is_an_interruption_like_a_disruption_target(code: int, result: str) -> None:
    assert classify(killed(code, [KUEUE_STOPPED]))[0] == result
    assert classify(killed(code, [cond("DisruptionTarget", "True", "PreemptionByScheduler")]))[0] == result
    if code == 1:  # without either condition an exit 1 is the worker's failure
        assert classify(killed(code, []))[0] == "failed"


def test_a_kueue_preemption_is_counted_as_one_not_a_failure_and_the_job_queues_again_from_its_checkpoint() -> None:
    summary = ('{"result": "preempted", "step": 12, "checkpoint": "checkpoint-12", '
               '"message": "stopped on SIGTERM after checkpointing at step 12"}')  # fmt: skip
    pod = {"metadata": {"name": "faq-train-1", "deletionTimestamp": "2026-01-01T12:01:30Z",
                        "labels": {"finetune.dev/role": "train", "finetune.dev/attempt": "1", QUEUE_LABEL: "lq"}},
           "status": killed(75, [KUEUE_STOPPED], summary)}  # fmt: skip
    assert termination_target(pod["status"]) == ("WorkloadEvictedDueToPreempted", PREEMPTED)
    obs = observe_pod(pod)
    assert obs.message == f"stopped on SIGTERM after checkpointing at step 12; Kueue WorkloadEvictedDueToPreempted: {PREEMPTED}"
    j = started(job({"queueName": "lq", "backoffLimit": 0}))
    j, plan = step(j, [obs])
    st = j["status"]
    first = st["attempts"][0]
    assert (first["result"], first["exitCode"]) == ("preempted", 75) and PREEMPTED in first["message"]
    assert (st["preemptions"], st["failures"], st["restarts"]) == (1, 0, 1)  # backoffLimit 0 untouched
    assert st["checkpoint"]["name"] == "checkpoint-12"
    assert [o["metadata"]["name"] for o in plan.create] == ["faq-train-2"]  # at once: Kueue queues it
    assert plan.create[0]["metadata"]["labels"][QUEUE_LABEL] == "lq"
    assert "AttemptPreempted" in reasons(plan) and "Resumed" in reasons(plan)
    j, _ = step(j, [obs, observe_pod(gated_pod("faq-train-2"), workload=workload_view(PENDING))])
    assert (j["status"]["phase"], j["status"]["reason"]) == ("Pending", "Queued")
    assert j["status"]["attempts"][1]["resumedFrom"] == "checkpoint-12"


def test_a_pod_kueue_just_ungated_is_starting_not_still_gated() -> None:
    """The API server sets PodScheduled=False/SchedulingGated at creation and only a scheduler
    updates it: after Kueue removes its gate the condition is stale, and must not read as held."""
    pod = gated_pod()
    pod["spec"] = {"containers": [{"name": "worker"}]}
    assert observe_pod(pod).held is None
    j, plan = step(started(job({"queueName": "lq"})), [observe_pod(pod)])
    assert j["status"]["reason"] == "PodStarting" and "SchedulingGated" not in reasons(plan)


def test_kueue_preempting_a_job_again_and_again_never_backs_it_off() -> None:
    """An interruption in a row backs off (a node pool that keeps preempting is not hammered), but a
    pod Kueue stopped goes back to its queue at once: Kueue's order is the wait, and a job that sat
    out a backoff would not even be queued."""
    def stopped(n: int, code: int = 75) -> Any:
        p = {"metadata": {"name": f"faq-train-{n}", "labels": {"finetune.dev/role": "train",
                                                              "finetune.dev/attempt": str(n), QUEUE_LABEL: "lq"}},
             "status": killed(code, [KUEUE_STOPPED])}  # fmt: skip
        return observe_pod(p)

    j = started(job({"queueName": "lq"}))
    j, _ = step(j, [stopped(1)])
    j, plan = step(j, [stopped(1), stopped(2, 143)])
    assert [o["metadata"]["name"] for o in plan.create] == ["faq-train-3"] and j["status"]["preemptions"] == 2
    # the same ending without Kueue's condition backs off
    plain = started(job())
    plain, _ = step(plain, [observe_pod({**gated_pod("faq-train-1"), "status": killed(75, [])})])
    _, plan = step(plain, [observe_pod({**gated_pod("faq-train-1"), "status": killed(75, [])}),
                           observe_pod({**gated_pod("faq-train-2"), "status": killed(75, [])})])  # fmt: skip
    assert plan.create == []


def test_a_jobs_workload_priority_class_label_goes_to_its_queued_pods() -> None:
    j = job({"queueName": "lq"})
    j["metadata"]["labels"] = {PRIORITY_LABEL: "high"}
    pod = build_pod(j, parse_spec(j["spec"]), "train", 1)
    assert pod["metadata"]["labels"][PRIORITY_LABEL] == "high" and pod["metadata"]["labels"][QUEUE_LABEL] == "lq"
    unqueued = job()
    unqueued["metadata"]["labels"] = {PRIORITY_LABEL: "high"}
    assert PRIORITY_LABEL not in build_pod(unqueued, parse_spec(unqueued["spec"]), "train", 1)["metadata"]["labels"]


def test_gang_members_are_one_pod_group_that_kueue_never_waits_to_refill() -> None:
    j = job({**TWO, "queueName": "lq"})
    members = gang_members(build_pod(j, parse_spec(j["spec"]), "train", 1), "faq", 1, 2)
    assert [m["metadata"]["annotations"][RETRIABLE_IN_GROUP] for m in members] == ["false", "false"]


def test_a_queued_gang_names_the_member_and_kueues_message() -> None:
    j, _ = step(job({**TWO, "queueName": "lq"}), [], claim=False)
    held = ("Queued", QUOTA.replace("pod set main", "pod set 574fcde2"))
    j, _ = step(j, [member(1, 0, phase="Pending", held=held, queue="lq"),
                       member(1, 1, phase="Pending", held=held, queue="lq")])  # fmt: skip
    assert (j["status"]["phase"], j["status"]["reason"]) == ("Pending", "Queued")
    assert j["status"]["message"] == f"training pod faq-train-1 is queued in LocalQueue lq: member faq-train-1-0: {held[1]}"


def test_the_informer_finds_a_workloads_view_and_its_job_by_pod() -> None:
    pods = {("ml", "faq"): [{"metadata": {"name": "faq-train-2"}}],
            ("ml", "long"): [{"metadata": {"name": "long-train-1-0e3f2a9c-0"}}]}  # a cut and hashed gang name
    view = workload_view(PENDING)
    inf = Informer(pods=pods, workloads={("ml", "faq-train-2"): [view]})
    assert inf.workload("ml", "faq-train-2") == view and inf.workload("ml", "faq-train-1") is None
    assert inf.job_of_pod("ml", "faq-train-2") == "faq" and inf.job_of_pod("ml", "long-train-1-0e3f2a9c-0") == "long"
    assert inf.job_of_pod("ml", "someone-elses-pod") is None and inf.job_of_pod("other", "faq-train-2") is None


def test_the_workload_index_keys_each_pod_of_a_group() -> None:
    from finetune_operator.cluster.handlers import ftj_workloads

    group = workload("faq-train-1", ("faq-train-1-0", "faq-train-1-1"))
    index = asyncio.run(ftj_workloads(namespace="ml", body=group))
    assert set(index) == {("ml", "faq-train-1-0"), ("ml", "faq-train-1-1")}
    assert index[("ml", "faq-train-1-0")]["name"] == "faq-train-1"
