"""A pod someone holds: status and Events say who holds it and why, in their words.

Seen on a real node (issue 22): a training pod the scheduler could not place stayed
`Pending / PodStarting: "training pod ... created, starting"` for minutes, with no reason,
condition or Event saying why. The scheduler's, a scheduling gate's and the kubelet's verdicts
are read from the Pod (observe.held_by) and carried into status.reason/message and one Event.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_reconcile import T0, job, reasons, started, step

from finetune_operator.decisions.observe import observe_pod

SCHEDULER_SAID = "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."


def pod_object(name: str, *, status: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    _, role, attempt = name.rsplit("-", 2)
    labels = {"finetune.dev/job": "faq", "finetune.dev/role": role, "finetune.dev/attempt": attempt}
    return {"metadata": {"name": name, "labels": labels}, "spec": spec or {"containers": [{"name": "worker"}]},
            "status": status}  # fmt: skip


UNSCHEDULABLE = {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHEDULER_SAID}]}  # fmt: skip
GATED = {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated", "message": "Scheduling is blocked due to non-empty scheduling gates"}]}  # fmt: skip
PULL_BACKOFF = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}], "containerStatuses": [
    {"name": "worker", "state": {"waiting": {"reason": "ImagePullBackOff",
                                             "message": 'Back-off pulling image "registry.example/worker:nope"'}}}]}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "spec", "held"),
    [
        (UNSCHEDULABLE, None, ("Unschedulable", SCHEDULER_SAID)),
        (GATED, {"schedulingGates": [{"name": "example.com/capacity-check"}]},
         ("SchedulingGated", "held by scheduling gate example.com/capacity-check")),
        (PULL_BACKOFF, None, ("ImagePullBackOff", 'Back-off pulling image "registry.example/worker:nope"')),
        ({"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}, None, None),
        ({"phase": "Running", "conditions": UNSCHEDULABLE["conditions"]}, None, None),
    ],
    ids=["unschedulable", "gated", "image-pull", "creating", "running"],
)
def test_observe_reads_who_holds_a_pod_that_has_not_started(
    status: dict[str, Any], spec: dict[str, Any] | None, held: tuple[str, str] | None
) -> None:
    assert observe_pod(pod_object("faq-train-1", status=status, spec=spec)).held == held


def _held_step(j: dict[str, Any], name: str, status: dict[str, Any], spec: dict[str, Any] | None = None) -> Any:
    return step(j, [observe_pod(pod_object(name, status=status, spec=spec))])


def test_an_unschedulable_training_pod_says_what_the_scheduler_said_once() -> None:
    j = started(job())
    j, plan = _held_step(j, "faq-train-1", UNSCHEDULABLE)
    st = j["status"]
    assert (st["phase"], st["reason"]) == ("Pending", "Unschedulable")
    assert st["message"] == f"training pod faq-train-1 cannot be scheduled: {SCHEDULER_SAID}"
    warnings = [e for e in plan.events if e["reason"] == "Unschedulable"]
    assert [e["type"] for e in warnings] == ["Warning"] and SCHEDULER_SAID in warnings[0]["message"]
    again, plan = _held_step(j, "faq-train-1", UNSCHEDULABLE)
    assert plan.status is None and reasons(plan) == []  # the same verdict: no write, no second Event
    # placed at last: the reason goes back to PodStarting, and the message stops naming the scheduler
    placed = copy.deepcopy(UNSCHEDULABLE)
    placed["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    j, plan = _held_step(again, "faq-train-1", placed)
    assert (j["status"]["reason"], j["status"]["message"]) == ("PodStarting", "training pod faq-train-1 is starting")


def test_a_gated_pod_says_it_waits_for_admission_without_a_warning() -> None:
    # (Kueue's own gate is said in Kueue's words: test_kueue.py)
    j, plan = _held_step(started(job()), "faq-train-1", GATED, {"schedulingGates": [{"name": "example.com/capacity-check"}]})
    assert (j["status"]["phase"], j["status"]["reason"]) == ("Pending", "SchedulingGated")
    assert "example.com/capacity-check" in j["status"]["message"]
    assert [(e["type"], e["reason"]) for e in plan.events] == [("Normal", "SchedulingGated")]


def test_an_image_that_cannot_be_pulled_is_named_in_status() -> None:
    j, plan = _held_step(started(job()), "faq-train-1", PULL_BACKOFF)
    assert (j["status"]["phase"], j["status"]["reason"]) == ("Pending", "ImagePullBackOff")
    assert j["status"]["message"] == 'training pod faq-train-1 cannot pull its image: Back-off pulling image "registry.example/worker:nope"'
    assert ("Warning", "ImagePullBackOff") in [(e["type"], e["reason"]) for e in plan.events]


def test_an_unschedulable_export_pod_keeps_the_exporting_phase_and_says_why() -> None:
    j = started(job())
    done = {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}
    j, _ = _held_step(j, "faq-train-1", done)
    assert j["status"]["phase"] == "Exporting"
    j, _ = step(j, [observe_pod(pod_object("faq-train-1", status=done)),
                    observe_pod(pod_object("faq-export-1", status=UNSCHEDULABLE))], T0)  # fmt: skip
    assert (j["status"]["phase"], j["status"]["reason"]) == ("Exporting", "Unschedulable")
    assert j["status"]["message"].startswith("export pod faq-export-1 cannot be scheduled: 0/1 nodes")


def test_a_gang_with_one_unschedulable_member_is_held_and_names_the_member() -> None:
    from test_gang import TWO, member

    j, _ = step(job(TWO), [], claim=False)
    held = ("Unschedulable", SCHEDULER_SAID)
    j, plan = step(j, [member(1, 0), member(1, 1, phase="Pending", held=held)])
    st = j["status"]
    assert (st["phase"], st["reason"]) == ("Pending", "Unschedulable")
    assert st["message"] == f"training pod faq-train-1 cannot be scheduled: member faq-train-1-1: {SCHEDULER_SAID}"
    assert ("Warning", "Unschedulable") in [(e["type"], e["reason"]) for e in plan.events]
