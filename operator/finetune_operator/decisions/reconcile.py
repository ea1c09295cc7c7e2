"""The one decision function: `reconcile(job, observed, now) -> Plan`.

Level-triggered and pure. Given the FineTuneJob object as stored (spec and the status written
so far), what exists now (child pods, the workspace claim) and the time, it returns what to do:
children to create or delete, the status merge patch, Events, when to look again, whether to
delete the job (TTL). The kopf handlers, the local runner and the unit tables all call this.

Lifecycle: Pending -> Training -> Exporting -> Succeeded, with Failed and Suspended beside.
  - A training pod ends `completed` -> the export pod starts; `preempted`/`evicted` -> a new attempt
    resumes from the latest checkpoint without consuming backoffLimit; `failed`/`oomkilled` -> a new
    attempt after exponential backoff, consuming backoffLimit; `invalid` -> Failed at once.
  - Export failures retry the export only (their own count against backoffLimit).
  - Never two workers on one workspace: no pod starts while another of the job's pods still runs
    or terminates.
  - `spec.model.fromJob` (fromjob.py): the source FineTuneJob (same namespace, read by the caller into
    `observed.source_job`) gates every launch of a pod that reads its export (training; export of a
    LoRA job, which merges onto it). Missing or not Succeeded yet -> wait (WaitingForSourceJob,
    looked at again every pending_interval: GitOps applies both jobs at once); Failed ->
    SourceJobFailed; Succeeded without a sentence-transformers export -> SourceExportMissing.
    A running pod is never stopped for what happens to the source later.
  - `spec.credentials`: every referenced Secret and key (read by the caller into
    `observed.secrets`, names and keys only) gates every launch: missing -> Pending (Exporting
    for the export pod) with reason SecretMissing naming the Secret, the key and the field, looked
    at again every pending_interval; a running pod is never stopped for it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from finetune_api.contract import RESULT_COMPLETED, RESULT_INVALID
from finetune_api.remote import missing_secrets
from finetune_api.spec import FineTuneSpec, SpecError, parse_spec
from finetune_operator.decisions import gang
from finetune_operator.decisions import status as S
from finetune_operator.decisions.attempts import record_endings, record_live_progress
from finetune_operator.decisions.builders import (
    ROLE_EXPORT,
    ROLE_TRAIN,
    SourceWorkspace,
    build_pod,
    build_pvc,
    config_too_large,
    needs_source,
)
from finetune_operator.decisions.fromjob import source_workspace
from finetune_operator.decisions.observe import Observed, PodObservation
from finetune_operator.decisions.plan import Delete, Pass, Plan, Settings, describe, parse_time
from finetune_operator.decisions.running import live_pod

__all__ = ["Delete", "Plan", "Settings", "reconcile"]


def reconcile(
    job: dict[str, Any], observed: Observed, now: dt.datetime, settings: Settings | None = None
) -> Plan:
    """Decide what to do for `job` given what exists. See the module docstring.

    Args:
        job: the FineTuneJob object (metadata, spec, status).
        observed: its child pods and whether its workspace claim exists.
        now: the current time (timezone-aware).
        settings: operator knobs.
    """
    p = Pass(job, now, settings or Settings())
    st = p.st
    live = [pod for pod in observed.pods if not pod.ended]

    if st.get("phase") in S.TERMINAL_PHASES:
        if not _fixed_invalid_spec(job, p.old):
            return _terminal(p, live)
        st.pop("completionTime", None)
    try:
        spec = parse_spec(job.get("spec"))
        too_large = config_too_large(job)
    except SpecError as e:
        return p.invalid(live, S.REASON_INVALID_SPEC, f"invalid spec: {e}")
    if too_large:
        return p.invalid(live, S.REASON_CONFIG_TOO_LARGE, too_large)

    members: dict[str, list[str]] = {}
    if spec.distributed.nodes > 1:  # a gang per attempt, seen as one pod (gang.py)
        pod_names = {pod.name for pod in live}
        gangs = [a for a in st["attempts"] if a.get("pods")]
        members = {str(a["pod"]): list(a["pods"]) for a in gangs}
        first = {str(a["pod"]): a["endedFirst"] for a in gangs if a.get("endedFirst")}
        pods, stops, ending = gang.collapse(observed.pods, str(job["metadata"]["name"]), spec.distributed.nodes,
                                            members, first)
        for a in gangs:  # remembered: the member that ended first may be gone by the time the gang is
            if str(a["pod"]) in ending:
                a["endedFirst"] = ending[str(a["pod"])]
        observed = replace(observed, pods=pods)
        live = [pod for pod in observed.pods if not pod.ended]
        p.plan.delete += stops
        plan = _decide(p, spec, observed, live)
        plan.delete = gang.expand(plan.delete, members, pod_names)
        return plan
    return _decide(p, spec, observed, live)


def _decide(p: Pass, spec: FineTuneSpec, observed: Observed, live: list[PodObservation]) -> Plan:
    st = p.st
    record_endings(p, observed)
    record_live_progress(p, live)
    attempts = st["attempts"]
    if any(a.get("role") == ROLE_EXPORT and a.get("result") == RESULT_COMPLETED for a in attempts):
        return _succeeded(p, spec, live)
    invalid = [a for a in attempts if a.get("result") == RESULT_INVALID]
    if invalid:
        return p.fail(live, S.REASON_INVALID_DATA,
                     f"{invalid[-1].get('role', 'worker')} pod {invalid[-1].get('pod')} rejected its input "
                     f"(exit 2, not retried): {invalid[-1].get('message') or 'no message'}")  # fmt: skip
    for role, counter, reason in ((ROLE_TRAIN, "failures", S.REASON_BACKOFF_LIMIT),
                                  (ROLE_EXPORT, "exportFailures", S.REASON_EXPORT_BACKOFF_LIMIT)):  # fmt: skip
        if st[counter] > spec.backoff_limit:
            last = [a for a in attempts if a.get("role") == role and a.get("result")][-1:]
            detail = describe(last[0]) if last else ""
            return p.fail(live, reason, f"{'training' if role == ROLE_TRAIN else 'export'} failed {st[counter]} times "
                                          f"(backoffLimit {spec.backoff_limit}); last attempt: {detail}")  # fmt: skip
    if spec.suspend:
        return _suspend(p, live)
    return _run(p, spec, observed, live)


def _fixed_invalid_spec(job: dict[str, Any], status: dict[str, Any]) -> bool:
    """A job Failed for an invalid spec gets another chance once the user edits the spec."""
    gen = (job.get("metadata") or {}).get("generation")
    return (
        status.get("phase") == S.PHASE_FAILED
        and status.get("reason") in (S.REASON_INVALID_SPEC, S.REASON_CONFIG_TOO_LARGE)
        and gen is not None
        and status.get("observedGeneration") is not None
        and gen > status["observedGeneration"]
    )


def _terminal(p: Pass, live: list[PodObservation]) -> Plan:
    p.stop(live)
    p.ttl()
    return p.finish()


def _succeeded(p: Pass, spec: FineTuneSpec, live: list[PodObservation]) -> Plan:
    p.stop(live)
    p.st.pop("nextAttemptAfter", None)
    path = (p.st.get("export") or {}).get("path")
    p.phase(S.PHASE_SUCCEEDED, S.REASON_EXPORTED, f"exported to {path}" if path else "exported")
    p.ttl()
    return p.finish()


def _suspend(p: Pass, live: list[PodObservation]) -> Plan:
    for rec in p.st["attempts"]:
        if not rec.get("result") and any(pod.name == rec.get("pod") for pod in live):
            rec["suspended"] = True
    p.stop(live)
    p.st.pop("nextAttemptAfter", None)
    ckpt = (p.st.get("checkpoint") or {}).get("name")
    if live:
        p.phase(S.PHASE_SUSPENDED, S.REASON_SUSPENDING,
                f"stopping {', '.join(pod.name for pod in live)}; the worker checkpoints before it exits")  # fmt: skip
        p.plan.requeue_after = p.settings.progress_interval
    else:
        # announce: Suspending -> Suspended stays in the phase, and `kubectl describe` should say the stop is done
        p.phase(S.PHASE_SUSPENDED, S.REASON_SUSPENDED,
                f"suspended; resumes from {ckpt} when spec.suspend is false" if ckpt else "suspended before any checkpoint",
                announce=True)  # fmt: skip
    return p.finish()


def _run(p: Pass, spec: FineTuneSpec, observed: Observed, live: list[PodObservation]) -> Plan:
    st = p.st
    role = ROLE_EXPORT if any(a.get("role") == ROLE_TRAIN and a.get("result") == RESULT_COMPLETED
                              for a in st["attempts"]) else ROLE_TRAIN  # fmt: skip
    p.plan.requeue_after = p.settings.progress_interval
    for pod in live:
        if pod.role != role and not pod.deleting:  # a stray training pod while exporting
            p.plan.delete.append(Delete("Pod", pod.name, p.settings.grace_seconds))
    current = [pod for pod in live if pod.role == role and not pod.deleting]
    if current:
        return live_pod(p, role, current[-1])
    if live:  # something still terminating: never two writers on one workspace
        p.phase(str(st.get("phase") or S.PHASE_PENDING), str(st.get("reason") or S.REASON_POD_STARTING),
                f"waiting for {', '.join(pod.name for pod in live)} to terminate")  # fmt: skip
        return p.finish()
    after = parse_time(st.get("nextAttemptAfter"))
    if after is not None and after > p.now:
        wait = (after - p.now).total_seconds()
        last = [a for a in st["attempts"] if a.get("result")][-1:]
        p.phase(S.PHASE_EXPORTING if role == ROLE_EXPORT else S.PHASE_PENDING, S.REASON_BACKOFF,
                f"retrying in {wait:.0f}s after {describe(last[0]) if last else 'an interruption'}")  # fmt: skip
        p.plan.requeue_after = wait
        return p.finish()
    missing = missing_secrets(spec.credentials, observed.secrets) if observed.secrets is not None else None
    if missing is not None:  # never a pod stuck silently in CreateContainerConfigError
        p.phase(S.PHASE_EXPORTING if role == ROLE_EXPORT else S.PHASE_PENDING, S.REASON_SECRET_MISSING,
                f"waiting for credentials: {missing}; the {role} pod starts once it is there", announce=True)  # fmt: skip
        p.plan.requeue_after = p.settings.pending_interval
        return p.finish()
    source = None
    if needs_source(spec, role):
        gate = source_workspace(p, spec, role, observed, live)
        if isinstance(gate, Plan):
            return gate
        source = gate
    if not observed.claim_exists:
        if spec.storage.claim_name:
            p.phase(S.PHASE_PENDING, S.REASON_WAITING_FOR_STORAGE,
                    f"waiting for PersistentVolumeClaim {spec.storage.claim_name} (spec.storage.claimName) to exist")  # fmt: skip
            p.plan.requeue_after = p.settings.pending_interval
            return p.finish()
        p.plan.create.append(build_pvc(p.job, spec))
    return _launch(p, spec, role, observed, source)


def _launch(
    p: Pass, spec: FineTuneSpec, role: str, observed: Observed, source: SourceWorkspace | None = None
) -> Plan:
    st = p.st
    numbers = [pod.attempt for pod in observed.pods if pod.role == role]
    numbers += [int(a.get("attempt") or 0) for a in st["attempts"] if a.get("role") == role]
    attempt = max(numbers, default=0) + 1
    pod = build_pod(p.job, spec, role, attempt, image=p.settings.worker_image,
                    grace_seconds=p.settings.grace_seconds, source=source)  # fmt: skip
    name = pod["metadata"]["name"]
    record: dict[str, Any] = {}
    if role == ROLE_TRAIN and spec.world_size > 1:
        _distributed_env(pod, p.settings.grace_seconds)
        st["worldSize"] = record["worldSize"] = spec.world_size
    if role == ROLE_TRAIN and spec.distributed.nodes > 1:
        job_name = str(p.job["metadata"]["name"])
        gang_pods = gang.gang_members(pod, job_name, attempt, spec.distributed.nodes)
        p.plan.create += [gang.build_service(p.job), *gang_pods]
        name = gang.gang_name(job_name, attempt)
        record["pods"] = [m["metadata"]["name"] for m in gang_pods]
    else:
        p.plan.create.append(pod)
    resumed = (st.get("checkpoint") or {}).get("name") if role == ROLE_TRAIN else None
    if attempt > 1:
        st["restarts"] += 1
    if role == ROLE_TRAIN and attempt > 1:  # progress starts again from the resume point
        _progress_from(st, st.get("checkpoint") if resumed else None, p.ts)
    st["attempts"].append(
        {"pod": name, "role": role, "attempt": attempt, "startedAt": p.ts, "resumedFrom": resumed, **record}
    )
    st.pop("nextAttemptAfter", None)
    st.setdefault("startTime", p.ts)
    if source is not None and role == ROLE_TRAIN:
        st.setdefault("source", {"job": source.job, "claim": source.claim})
    if role == ROLE_EXPORT:
        p.event("Normal", "ExportStarted", f"created export pod {name} (attempt {attempt})")
        p.phase(S.PHASE_EXPORTING, S.REASON_EXPORTING, f"export pod {name} is pending", told=True)
    else:
        what = (
            f"resuming from {resumed}"
            if resumed
            else ("starting over: no checkpoint yet" if attempt > 1 else "starting")
        )
        p.event(
            "Normal",
            "Resumed" if attempt > 1 else "Started",
            f"created training pod {name} (attempt {attempt}), {what}",
        )
        p.phase(S.PHASE_PENDING, S.REASON_POD_STARTING, f"training pod {name} created, {what}", told=True)
    return p.finish()


def _progress_from(st: dict[str, Any], checkpoint: dict[str, Any] | None, ts: str) -> None:
    """status.progress of a new training attempt: the resumed checkpoint's step (0 without one),
    not the previous attempt's last log line."""
    total = (st.get("progress") or {}).get("totalSteps")
    was_stale = "stale" in (st.get("progress") or {})
    step = (checkpoint or {}).get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else 0
    prog: dict[str, Any] = {"step": step, "updatedAt": ts}
    if isinstance(total, (int, float)) and total > 0:
        prog["totalSteps"] = total
        prog["percent"] = round(min(100.0, 100.0 * step / total), 1)
    if was_stale:  # false, not absent: a merge patch keeps keys it does not name
        prog["stale"] = False
    st["progress"] = prog


def _shutdown_timeout(grace_seconds: int) -> int:
    """torchrun's wait for its ranks after SIGTERM: the pod's grace period less a margin to exit."""
    return max(5, grace_seconds - min(30, grace_seconds // 5))


def _distributed_env(pod: dict[str, Any], grace_seconds: int) -> None:
    env = pod["spec"]["containers"][0]["env"]
    env.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(_shutdown_timeout(grace_seconds))})
