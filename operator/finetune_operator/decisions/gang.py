"""Multi-node training (`spec.distributed.nodes > 1`): each attempt is a gang of pods. Pure.

- Names: member `<job>-train-<attempt>-<rank>` (also its hostname), the headless Service
  `<job>-rdzv`; every name is a valid DNS label for any valid job name (long ones are cut and
  end in a hash, so two jobs never share one).
- Rendezvous: torchrun's c10d backend, configured from its own environment on every member
  (PET_NNODES, PET_RDZV_BACKEND, PET_RDZV_ENDPOINT = the rank-0 member's stable DNS name through
  the Service, PET_RDZV_ID = one id per attempt, PET_RDZV_CONF is_host on rank 0).
- Kueue: every member carries the pod-group label and total-count annotation, so the gang is
  admitted as one group (a partial gang never holds GPUs), and `retriable-in-group: "false"`, so
  an ended gang's group finishes and frees its quota (a new attempt is a new group).
- The gang lives and ends as one: `collapse` folds the members into one observation per attempt
  (named after the gang), which reconcile treats like a single training pod. The attempt ends
  when its first member ends (its result is the attempt's: evicted/preempted do not consume
  backoffLimit, a failure counts once); the other members are deleted (SIGTERM: checkpoint, exit
  75) and the next attempt starts once every member is gone. A member that vanished while the
  others live was evicted.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from typing import Any

from finetune_api.contract import RESULT_COMPLETED, RESULT_EVICTED
from finetune_operator.decisions.builders import LABEL_RANK, ROLE_TRAIN, child_labels, owner_reference
from finetune_operator.decisions.observe import PodObservation
from finetune_operator.decisions.plan import Delete

POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
# "false": once every member has ended the group is finished and Kueue releases its quota; the
# default (retriable) has Kueue wait for replacement pods, holding the quota, and the operator never
# replaces a member: the next attempt is a new gang, a new group
RETRIABLE_IN_GROUP = "kueue.x-k8s.io/retriable-in-group"
RDZV_PORT = 29400
MAX_LABEL = 63
VANISHED = "the pod disappeared before the gang finished (evicted, deleted, or its node was lost)"


def dns_label(name: str, max_len: int = MAX_LABEL) -> str:
    """`name` if it fits a DNS label, else cut and suffixed with a hash of the whole (stable, unique)."""
    if len(name) <= max_len:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: max_len - 9].rstrip('-')}-{digest}"


def gang_name(job: str, attempt: int) -> str:
    """The attempt's name in status (and Kueue's pod group): `<job>-train-<attempt>`."""
    return dns_label(f"{job}-{ROLE_TRAIN}-{attempt}")


def member_name(job: str, attempt: int, rank: int) -> str:
    """`<gang name>-<rank>`: members share one prefix (also when cut and hashed), so their DNS names
    sort member 0 first, and torchrun's c10d rendezvous, which ranks nodes by sorted address, puts
    global rank 0 (the one that reports progress and the summary) on member 0."""
    return f"{dns_label(f'{job}-{ROLE_TRAIN}-{attempt}', MAX_LABEL - 3)}-{rank}"  # room for ranks 0-63, any rank


def service_name(job: str) -> str:
    """The headless Service; a Service name must start with a letter (DNS-1035)."""
    base = f"{job}-rdzv"
    return dns_label(base if base[0].isalpha() else f"r{base}")


def rdzv_endpoint(job: str, attempt: int) -> str:
    return f"{member_name(job, attempt, 0)}.{service_name(job)}:{RDZV_PORT}"


def build_service(job: dict[str, Any]) -> dict[str, Any]:
    """Headless, publishing not-ready addresses: members find rank 0 before any of them is Ready."""
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "namespace": job["metadata"].get("namespace"),
                     "labels": child_labels(name, ROLE_TRAIN), "ownerReferences": [owner_reference(job)]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": child_labels(name, ROLE_TRAIN),
                 "ports": [{"name": "c10d", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }  # fmt: skip


def gang_members(pod: dict[str, Any], job: str, attempt: int, nodes: int) -> list[dict[str, Any]]:
    """The gang's pods, from the single training pod `build_pod` made for this attempt."""
    out = []
    for rank in range(nodes):
        m = copy.deepcopy(pod)
        name = member_name(job, attempt, rank)
        meta = m["metadata"]
        meta["name"] = name
        meta["labels"][LABEL_RANK] = str(rank)
        meta["labels"][POD_GROUP_LABEL] = gang_name(job, attempt)
        meta.setdefault("annotations", {})[POD_GROUP_COUNT] = str(nodes)
        meta["annotations"][RETRIABLE_IN_GROUP] = "false"
        m["spec"]["hostname"] = name
        m["spec"]["subdomain"] = service_name(job)
        c = m["spec"]["containers"][0]
        c["env"] += [
            {"name": "PET_NNODES", "value": str(nodes)},
            {"name": "PET_NODE_RANK", "value": str(rank)},
            {"name": "PET_RDZV_BACKEND", "value": "c10d"},
            {"name": "PET_RDZV_ENDPOINT", "value": rdzv_endpoint(job, attempt)},
            {"name": "PET_RDZV_ID", "value": gang_name(job, attempt)},
            {"name": "PET_RDZV_CONF", "value": f"is_host={'true' if rank == 0 else 'false'}"},
        ]
        c.setdefault("ports", []).append({"name": "c10d", "containerPort": RDZV_PORT})
        out.append(m)
    return out


def _rank(pod: PodObservation) -> int:
    return pod.rank or 0


def _describe(p: PodObservation) -> dict[str, Any]:
    return {"pod": p.name, "result": p.result, "exitCode": p.exit_code, "reason": p.reason, "message": p.message[:256]}


def collapse(pods: tuple[PodObservation, ...], job: str, nodes: int, known: dict[str, list[str]],
             first: dict[str, dict[str, Any]]) -> tuple[tuple[PodObservation, ...], list[Delete], dict[str, dict[str, Any]]]:
    """Fold each gang's members into one observation named after the gang.

    Args:
        pods: every observed child pod of the job.
        job: the job's name.
        nodes: members per gang.
        known: gang name -> member names, from status (so a member that vanished is noticed).
        first: gang name -> the member that ended first, as recorded in status (it may be gone since).

    Returns:
        (observations for reconcile, deletes of the live members of gangs that are ending,
         gang name -> its first-ended member for gangs that are ending now, to record in status).
    """
    by_gang: dict[str, list[PodObservation]] = {}
    out: list[PodObservation] = []
    for pod in pods:
        if pod.role == ROLE_TRAIN and pod.rank is not None:
            by_gang.setdefault(gang_name(job, pod.attempt), []).append(pod)
        else:
            out.append(pod)
    deletes: list[Delete] = []
    ending: dict[str, dict[str, Any]] = {}
    for name, group in sorted(by_gang.items()):
        group.sort(key=_rank)
        expected = known.get(name) or [member_name(job, group[0].attempt, r) for r in range(nodes)]
        seen = {p.name for p in group}
        vanished = [n for n in expected if n not in seen]
        ended = sorted((p for p in group if p.ended), key=lambda p: (p.finished_at or "", _rank(p)))
        live = [p for p in group if not p.ended]
        rank0 = group[0]
        desc = first.get(name)
        if desc is None:
            failed = next((p for p in ended if p.result != RESULT_COMPLETED), None)
            if failed is not None:
                desc = _describe(failed)
            elif vanished:
                desc = {"pod": vanished[0], "result": RESULT_EVICTED, "exitCode": None, "reason": None, "message": VANISHED}
        if desc is None:
            if live:  # running (some members may have completed; the rest are finishing)
                holder = next((p for p in live if p.held), None)  # one held member holds the gang
                held = None if holder is None or holder.held is None else (
                    holder.held[0], f"member {holder.name}: {holder.held[1]}")
                out.append(replace(rank0, name=name, result=None, held=held,
                                   deleting=any(p.deleting for p in live)))
            else:  # every member completed
                out.append(replace(rank0, name=name, summary={**rank0.summary, "endedFirst": None}))
            continue
        if live:  # the attempt is over; stop the rest (SIGTERM: they checkpoint and exit 75)
            deletes += [Delete("Pod", p.name) for p in live if not p.deleting]
            ending[name] = desc
            out.append(replace(rank0, name=name, result=None, deleting=True))
            continue
        out.append(_ended(rank0, name, ended, desc))
    return tuple(out), deletes, ending


def _ended(rank0: PodObservation, name: str, ended: list[PodObservation], desc: dict[str, Any]) -> PodObservation:
    """A gang whose every member has ended, after `desc` (the member that ended first) ended it:
    one observation with that member's result and the newest checkpoint any member reported."""
    summary: dict[str, Any] = {"endedFirst": desc}
    for p in ended:
        step = p.summary.get("step")
        if isinstance(p.summary.get("checkpoint"), str) and isinstance(step, int) and step >= summary.get("step", -1):
            summary.update(checkpoint=p.summary["checkpoint"], step=step)
    return replace(rank0, name=name, result=desc["result"], exit_code=desc.get("exitCode"),
                   reason=desc.get("reason"), summary=summary, phase="Failed",
                   finished_at=max((p.finished_at or "" for p in ended), default="") or None,
                   message=f"{desc['pod']} ended first ({desc['result']}): {desc.get('message') or ''}".rstrip(": "))  # fmt: skip


def expand(deletes: list[Delete], members: dict[str, list[str]], live: set[str]) -> list[Delete]:
    """Reconcile's delete of a gang -> a delete of each of its members still there."""
    out: list[Delete] = []
    for d in deletes:
        if d.kind == "Pod" and d.name in members:
            out += [Delete("Pod", n, d.grace_seconds) for n in members[d.name] if n in live]
        else:
            out.append(d)
    return out
