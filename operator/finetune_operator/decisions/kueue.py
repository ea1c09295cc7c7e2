"""What Kueue says about a job's pods, in Kueue's own words. Pure.

A FineTuneJob meets Kueue through Kueue's pod integration (README "Kueue"): each attempt's pod (or
multi-node gang, one pod group) carries `kueue.x-k8s.io/queue-name`; Kueue gates it
(`kueue.x-k8s.io/admission`), makes a Workload for it, removes the gate when the Workload is
admitted by quota, and on preemption marks the pod with a `TerminationTarget` condition and deletes
it (SIGTERM: the worker checkpoints and exits 75). The operator writes nothing of Kueue's; it reads:

- the pod's scheduling gate: the pod waits for Kueue (observe.held_by);
- the pod's Workload (from a watch, cluster/handlers.py), reduced to `workload_view`: why it waits
  (`QuotaReserved=False`: "couldn't assign flavors to pod set main: insufficient unused quota for
  cpu in flavor default-flavor, 200m more needed", or `Inadmissible`: "LocalQueue lq doesn't exist");
- the pod's `TerminationTarget` condition: who ended it and why ("Preempted to accommodate a
  workload ... due to prioritization in the ClusterQueue"), recorded in the attempt's message.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.decisions.builders import QUEUE_LABEL

ADMISSION_GATE = "kueue.x-k8s.io/admission"
WORKLOAD_GROUP = "kueue.x-k8s.io"
WORKLOAD_VERSION = "v1beta1"
WORKLOAD_PLURAL = "workloads"
# Kueue's own pod condition on a pod it stops (pkg/controller/jobs/pod: ConditionTypeTerminationTarget);
# the core DisruptionTarget is the kubelet's and the eviction API's.
TERMINATION_TARGET = "TerminationTarget"
WORKLOAD_CONDITIONS = ("QuotaReserved", "Admitted", "Evicted", "Preempted", "Requeued", "Finished")
REASON_QUEUED = "Queued"  # waiting in its LocalQueue (quota, priority, order): the queue working
REASON_INADMISSIBLE = "Inadmissible"  # Kueue cannot admit it as things are (no such LocalQueue, ...)
MESSAGE_MAX = 512


def workload_pods(workload: dict[str, Any]) -> list[str]:
    """The pods a Workload stands for: its Pod owners (one, or every member of a pod group)."""
    refs = (workload.get("metadata") or {}).get("ownerReferences") or []
    return [str(r["name"]) for r in refs if r.get("kind") == "Pod" and r.get("apiVersion") == "v1" and r.get("name")]


def workload_view(workload: dict[str, Any]) -> dict[str, Any]:
    """The little of a Workload the operator keeps (its cache holds this, not the Workload)."""
    spec, status = workload.get("spec") or {}, workload.get("status") or {}
    conditions = {
        str(c["type"]): {"status": str(c.get("status")), "reason": str(c.get("reason") or ""),
                         "message": str(c.get("message") or "")[:MESSAGE_MAX]}
        for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("type") in WORKLOAD_CONDITIONS
    }  # fmt: skip
    return {
        "name": str((workload.get("metadata") or {}).get("name") or ""),
        "queue": spec.get("queueName"),
        "priorityClass": spec.get("priorityClassName"),
        "priority": spec.get("priority"),
        "clusterQueue": (status.get("admission") or {}).get("clusterQueue"),
        "conditions": conditions,
    }


def gated_by_kueue(pod: dict[str, Any]) -> bool:
    return any(isinstance(g, dict) and g.get("name") == ADMISSION_GATE
               for g in (pod.get("spec") or {}).get("schedulingGates") or [])  # fmt: skip


def queue_of(pod: dict[str, Any]) -> str | None:
    queue = ((pod.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
    return str(queue) if queue else None


def admitted(workload: dict[str, Any] | None) -> bool:
    """Kueue admitted the Workload: its gate is about to go, nothing holds the pod any more."""
    admission = ((workload or {}).get("conditions") or {}).get("Admitted") or {}
    return bool(admission.get("status") == "True")


def admission_hold(workload: dict[str, Any] | None) -> tuple[str, str] | None:
    """(reason, message) of a pod behind Kueue's admission gate, in its Workload's words; None
    while Kueue has said nothing yet (no Workload: a pod group until all its pods exist, or no
    verdict on it yet), when the gate itself is all there is to say, and once it is admitted."""
    conds = (workload or {}).get("conditions") or {}
    reserved, admission = conds.get("QuotaReserved") or {}, conds.get("Admitted") or {}
    if workload is None or not reserved or admitted(workload):
        return None
    if reserved.get("status") == "True":
        detail = f": {admission['message']}" if admission.get("message") else ""
        return REASON_QUEUED, f"quota reserved in ClusterQueue {workload.get('clusterQueue')}, waiting for admission checks{detail}"
    if reserved.get("reason") == REASON_INADMISSIBLE:
        return REASON_INADMISSIBLE, reserved.get("message") or "Kueue cannot admit it"
    return REASON_QUEUED, reserved.get("message") or f"Workload {workload.get('name')} is pending"


def termination_target(status: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of Kueue's TerminationTarget condition on a pod, e.g.
    ("WorkloadEvictedDueToPreempted", "Preempted to accommodate a workload (UID: ..., JobUID: ...)
    due to prioritization in the ClusterQueue"); None when Kueue did not stop the pod."""
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == TERMINATION_TARGET and cond.get("status") == "True":
            return str(cond.get("reason") or ""), str(cond.get("message") or "")[:MESSAGE_MAX]
    return None
