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
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from . import status as S
from .builders import (
    DEFAULT_WORKER_IMAGE,
    ROLE_EXPORT,
    ROLE_TRAIN,
    build_event,
    build_pod,
    build_pvc,
    config_too_large,
    rfc3339,
)
from .contract import RESULT_COMPLETED, RESULT_FAILED, RESULT_INVALID, RESULT_OOMKILLED
from .observe import INTERRUPTIONS, Observed, PodObservation
from .spec import FineTuneSpec, SpecError, parse_spec

MAX_ATTEMPT_HISTORY = 100
VANISHED_MESSAGE = "the pod disappeared before it finished (deleted, or its node was lost)"


@dataclass(frozen=True)
class Settings:
    """Operator knobs (env FINETUNE_* in `run`; tests shorten the intervals)."""

    worker_image: str = DEFAULT_WORKER_IMAGE
    grace_seconds: int = 300  # terminationGracePeriodSeconds: time to checkpoint on SIGTERM
    backoff_base: float = 10.0  # first retry delay; doubles per consecutive unsuccessful attempt
    backoff_max: float = 300.0
    progress_interval: float = 5.0  # look again this often while a pod runs (live progress)
    pending_interval: float = 10.0  # ... and this often while waiting on something else


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    grace_seconds: int | None = None


@dataclass
class Plan:
    """What the handlers apply, in this order: create, delete, status, events, delete_job."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[Delete] = field(default_factory=list)
    status: dict[str, Any] | None = None  # merge patch for the status subresource; None = unchanged
    events: list[dict[str, Any]] = field(default_factory=list)
    requeue_after: float | None = None
    delete_job: bool = False
    permanent_error: str | None = None  # invalid object: handlers raise kopf.PermanentError
    phase: str = S.PHASE_PENDING
    ended: list[tuple[str, str]] = field(default_factory=list)  # (role, result) of attempts ended in this pass


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def backoff_delay(consecutive: int, settings: Settings) -> float:
    """Delay before the next attempt after `consecutive` unsuccessful attempts in a row (>= 1)."""
    return float(min(settings.backoff_max, settings.backoff_base * 2 ** max(0, consecutive - 1)))


class _Pass:
    """One reconcile pass: the working copy of status and the plan being built."""

    def __init__(self, job: dict[str, Any], now: dt.datetime, settings: Settings) -> None:
        self.job = job
        self.now = now
        self.ts = rfc3339(now)
        self.settings = settings
        self.old = job.get("status") or {}
        self.st: dict[str, Any] = copy.deepcopy(self.old)
        self.plan = Plan()
        if (job.get("metadata") or {}).get("generation") is not None:
            self.st["observedGeneration"] = job["metadata"]["generation"]
        self.st.setdefault("attempts", [])
        for counter in ("restarts", "preemptions", "failures", "exportFailures"):
            self.st.setdefault(counter, 0)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(build_event(self.job, type_, reason, message, self.now, len(self.plan.events)))

    def phase(self, phase: str, reason: str, message: str) -> None:
        before = self.old.get("phase")
        S.set_phase(self.st, phase, reason, message, self.ts)
        if phase in S.TERMINAL_PHASES:
            self.st.setdefault("completionTime", self.ts)
        if before != phase:
            warn = phase == S.PHASE_FAILED
            self.event("Warning" if warn else "Normal", reason if warn or phase == S.PHASE_SUSPENDED else phase, message)

    def finish(self) -> Plan:
        self.st["attempts"] = self.st["attempts"][-MAX_ATTEMPT_HISTORY:]
        self.plan.status = S.status_patch(self.old, self.st)
        self.plan.phase = str(self.st.get("phase") or S.PHASE_PENDING)
        return self.plan


def reconcile(job: dict[str, Any], observed: Observed, now: dt.datetime, settings: Settings | None = None) -> Plan:
    """Decide what to do for `job` given what exists. See the module docstring.

    Args:
        job: the FineTuneJob object (metadata, spec, status).
        observed: its child pods and whether its workspace claim exists.
        now: the current time (timezone-aware).
        settings: operator knobs.
    """
    p = _Pass(job, now, settings or Settings())
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
        return _invalid(p, live, S.REASON_INVALID_SPEC, f"invalid spec: {e}")
    if too_large:
        return _invalid(p, live, S.REASON_CONFIG_TOO_LARGE, too_large)

    _record_endings(p, observed)
    _record_live_progress(p, live)
    attempts = st["attempts"]
    if any(a.get("role") == ROLE_EXPORT and a.get("result") == RESULT_COMPLETED for a in attempts):
        return _succeeded(p, spec, live)
    invalid = [a for a in attempts if a.get("result") == RESULT_INVALID]
    if invalid:
        return _fail(p, live, S.REASON_INVALID_DATA,
                     f"{invalid[-1].get('role', 'worker')} pod {invalid[-1].get('pod')} rejected its input "
                     f"(exit 2, not retried): {invalid[-1].get('message') or 'no message'}")  # fmt: skip
    for role, counter, reason in ((ROLE_TRAIN, "failures", S.REASON_BACKOFF_LIMIT),
                                  (ROLE_EXPORT, "exportFailures", S.REASON_EXPORT_BACKOFF_LIMIT)):  # fmt: skip
        if st[counter] > spec.backoff_limit:
            last = [a for a in attempts if a.get("role") == role and a.get("result")][-1:]
            detail = _describe(last[0]) if last else ""
            return _fail(p, live, reason, f"{'training' if role == ROLE_TRAIN else 'export'} failed {st[counter]} times "
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


def _describe(attempt: dict[str, Any]) -> str:
    text = f"{attempt.get('pod')} {attempt.get('result')}"
    if attempt.get("exitCode") is not None:
        text += f" (exit {attempt['exitCode']})"
    return text + (f": {attempt['message']}" if attempt.get("message") else "")


def _stop_live(p: _Pass, live: list[PodObservation]) -> None:
    for pod in live:
        if not pod.deleting:
            p.plan.delete.append(Delete("Pod", pod.name, p.settings.grace_seconds))


def _invalid(p: _Pass, live: list[PodObservation], reason: str, message: str) -> Plan:
    _stop_live(p, live)
    p.phase(S.PHASE_FAILED, reason, message)
    p.plan.permanent_error = message
    return p.finish()


def _fail(p: _Pass, live: list[PodObservation], reason: str, message: str) -> Plan:
    _stop_live(p, live)
    p.st.pop("nextAttemptAfter", None)
    p.phase(S.PHASE_FAILED, reason, message)
    _ttl(p)
    return p.finish()


def _terminal(p: _Pass, live: list[PodObservation]) -> Plan:
    _stop_live(p, live)
    _ttl(p)
    return p.finish()


def _ttl(p: _Pass) -> None:
    ttl = (p.job.get("spec") or {}).get("ttlSecondsAfterFinished")
    done = parse_time(p.st.get("completionTime"))
    if not isinstance(ttl, int) or isinstance(ttl, bool) or done is None:
        return
    remaining = (done + dt.timedelta(seconds=ttl) - p.now).total_seconds()
    if remaining <= 0:
        p.plan.delete_job = True
    else:
        p.plan.requeue_after = remaining


def _record_endings(p: _Pass, observed: Observed) -> None:
    """Fold ended pods into status.attempts (adopting pods status does not know yet)."""
    attempts: list[dict[str, Any]] = p.st["attempts"]
    by_pod = {a.get("pod"): a for a in attempts}
    for pod in sorted(observed.pods, key=lambda x: (x.role != ROLE_TRAIN, x.attempt)):
        rec = by_pod.get(pod.name)
        if rec is None:  # status lost or written by a pass that crashed: adopt what exists
            rec = {"pod": pod.name, "role": pod.role, "attempt": pod.attempt,
                   "startedAt": pod.started_at or p.ts, "resumedFrom": None}  # fmt: skip
            attempts.append(rec)
            by_pod[pod.name] = rec
        if pod.ended and not rec.get("result"):
            _close(p, rec, pod)
    names = {pod.name for pod in observed.pods}
    for rec in attempts:
        if not rec.get("result") and rec.get("pod") not in names:
            _close(p, rec, None)


def _close(p: _Pass, rec: dict[str, Any], pod: PodObservation | None) -> None:
    st = p.st
    result = pod.result if pod is not None else ("preempted" if rec.get("suspended") else "evicted")
    summary = pod.summary if pod is not None else {}
    rec["result"] = result
    rec["finishedAt"] = (pod.finished_at if pod is not None else None) or p.ts
    rec["exitCode"] = pod.exit_code if pod is not None else None
    rec["message"] = (pod.message if pod is not None else "") or (VANISHED_MESSAGE if pod is None else "")
    if summary.get("resumedFrom") is not None:
        rec["resumedFrom"] = summary["resumedFrom"]
    if rec.get("role") == ROLE_TRAIN and isinstance(summary.get("checkpoint"), str):
        st["checkpoint"] = {"name": summary["checkpoint"], "step": summary.get("step"), "savedAt": rec["finishedAt"]}
    if rec.get("role") == ROLE_TRAIN and result == RESULT_COMPLETED and isinstance(summary.get("step"), int):
        prog = dict(st.get("progress") or {})
        prog.update(step=summary["step"], percent=100.0, updatedAt=p.ts)
        prog.setdefault("totalSteps", summary["step"])
        st["progress"] = prog
    if rec.get("role") == ROLE_EXPORT and result == RESULT_COMPLETED:
        st["export"] = {k: summary[k] for k in ("export", "formats", "maxDeviation", "metrics") if k in summary}
        if "export" in st["export"]:
            st["export"]["path"] = st["export"].pop("export")
    p.plan.ended.append((str(rec.get("role")), str(result)))
    if result in INTERRUPTIONS and not rec.get("suspended"):
        st["preemptions"] += 1
    if result in (RESULT_FAILED, RESULT_OOMKILLED):
        st["exportFailures" if rec.get("role") == ROLE_EXPORT else "failures"] += 1
    if result != RESULT_COMPLETED and not rec.get("suspended"):
        consecutive = _consecutive_unsuccessful(st["attempts"], str(rec.get("role")))
        delay = 0.0 if result in INTERRUPTIONS and consecutive <= 1 else backoff_delay(consecutive, p.settings)
        st["nextAttemptAfter"] = rfc3339(p.now + dt.timedelta(seconds=math.ceil(delay)))
    bad = result not in (RESULT_COMPLETED,) and not rec.get("suspended")
    p.event("Warning" if bad and result not in INTERRUPTIONS else "Normal", f"Attempt{str(result).capitalize()}",
            _describe(rec))


def _consecutive_unsuccessful(attempts: list[dict[str, Any]], role: str) -> int:
    n = 0
    for a in reversed(attempts):
        if a.get("role") != role or not a.get("result"):
            continue
        if a["result"] == RESULT_COMPLETED:
            break
        n += 1
    return n


def _record_live_progress(p: _Pass, live: list[PodObservation]) -> None:
    for pod in live:
        if pod.role == ROLE_TRAIN and pod.checkpoint:
            cur = p.st.get("checkpoint") or {}
            if cur.get("name") != pod.checkpoint["name"]:
                p.st["checkpoint"] = {**pod.checkpoint, "savedAt": p.ts}
        if pod.role == ROLE_TRAIN and pod.progress:
            prog = dict(pod.progress)
            step, total = prog.get("step"), prog.get("totalSteps")
            if isinstance(step, (int, float)) and isinstance(total, (int, float)) and total > 0:
                prog["percent"] = round(min(100.0, 100.0 * step / total), 1)
            prog["updatedAt"] = p.ts
            p.st["progress"] = prog


def _succeeded(p: _Pass, spec: FineTuneSpec, live: list[PodObservation]) -> Plan:
    _stop_live(p, live)
    p.st.pop("nextAttemptAfter", None)
    path = (p.st.get("export") or {}).get("path")
    p.phase(S.PHASE_SUCCEEDED, S.REASON_EXPORTED, f"exported to {path}" if path else "exported")
    _ttl(p)
    return p.finish()


def _suspend(p: _Pass, live: list[PodObservation]) -> Plan:
    for rec in p.st["attempts"]:
        if not rec.get("result") and any(pod.name == rec.get("pod") for pod in live):
            rec["suspended"] = True
    _stop_live(p, live)
    p.st.pop("nextAttemptAfter", None)
    ckpt = (p.st.get("checkpoint") or {}).get("name")
    if live:
        p.phase(S.PHASE_SUSPENDED, S.REASON_SUSPENDING,
                f"stopping {', '.join(pod.name for pod in live)}; the worker checkpoints before it exits")  # fmt: skip
        p.plan.requeue_after = p.settings.progress_interval
    else:
        p.phase(S.PHASE_SUSPENDED, S.REASON_SUSPENDED,
                f"suspended; resumes from {ckpt} when spec.suspend is false" if ckpt else "suspended before any checkpoint")  # fmt: skip
    return p.finish()


def _run(p: _Pass, spec: FineTuneSpec, observed: Observed, live: list[PodObservation]) -> Plan:
    st = p.st
    role = ROLE_EXPORT if any(a.get("role") == ROLE_TRAIN and a.get("result") == RESULT_COMPLETED
                              for a in st["attempts"]) else ROLE_TRAIN  # fmt: skip
    p.plan.requeue_after = p.settings.progress_interval
    for pod in live:
        if pod.role != role and not pod.deleting:  # a stray training pod while exporting
            p.plan.delete.append(Delete("Pod", pod.name, p.settings.grace_seconds))
    current = [pod for pod in live if pod.role == role and not pod.deleting]
    if current:
        return _running(p, role, current[-1])
    if live:  # something still terminating: never two writers on one workspace
        p.phase(str(st.get("phase") or S.PHASE_PENDING), str(st.get("reason") or S.REASON_POD_STARTING),
                f"waiting for {', '.join(pod.name for pod in live)} to terminate")  # fmt: skip
        return p.finish()
    after = parse_time(st.get("nextAttemptAfter"))
    if after is not None and after > p.now:
        wait = (after - p.now).total_seconds()
        last = [a for a in st["attempts"] if a.get("result")][-1:]
        p.phase(S.PHASE_EXPORTING if role == ROLE_EXPORT else S.PHASE_PENDING, S.REASON_BACKOFF,
                f"retrying in {wait:.0f}s after {_describe(last[0]) if last else 'an interruption'}")  # fmt: skip
        p.plan.requeue_after = wait
        return p.finish()
    if not observed.claim_exists:
        if spec.storage.claim_name:
            p.phase(S.PHASE_PENDING, S.REASON_WAITING_FOR_STORAGE,
                    f"waiting for PersistentVolumeClaim {spec.storage.claim_name} (spec.storage.claimName) to exist")  # fmt: skip
            p.plan.requeue_after = p.settings.pending_interval
            return p.finish()
        p.plan.create.append(build_pvc(p.job, spec))
    return _launch(p, spec, role, observed)


def _launch(p: _Pass, spec: FineTuneSpec, role: str, observed: Observed) -> Plan:
    st = p.st
    numbers = [pod.attempt for pod in observed.pods if pod.role == role]
    numbers += [int(a.get("attempt") or 0) for a in st["attempts"] if a.get("role") == role]
    attempt = max(numbers, default=0) + 1
    pod = build_pod(p.job, spec, role, attempt, image=p.settings.worker_image, grace_seconds=p.settings.grace_seconds)
    p.plan.create.append(pod)
    name = pod["metadata"]["name"]
    resumed = (st.get("checkpoint") or {}).get("name") if role == ROLE_TRAIN else None
    if attempt > 1:
        st["restarts"] += 1
    st["attempts"].append({"pod": name, "role": role, "attempt": attempt, "startedAt": p.ts, "resumedFrom": resumed})
    st.pop("nextAttemptAfter", None)
    st.setdefault("startTime", p.ts)
    if role == ROLE_EXPORT:
        p.event("Normal", "ExportStarted", f"created export pod {name} (attempt {attempt})")
        p.phase(S.PHASE_EXPORTING, S.REASON_EXPORTING, f"export pod {name} created")
    else:
        what = f"resuming from {resumed}" if resumed else ("starting over: no checkpoint yet" if attempt > 1 else "starting")
        p.event("Normal", "Resumed" if attempt > 1 else "Started", f"created training pod {name} (attempt {attempt}), {what}")
        p.phase(S.PHASE_PENDING, S.REASON_POD_STARTING, f"training pod {name} created, {what}")
    return p.finish()


def _running(p: _Pass, role: str, pod: PodObservation) -> Plan:
    if role == ROLE_EXPORT:
        p.phase(S.PHASE_EXPORTING, S.REASON_EXPORTING, f"export pod {pod.name} {pod.phase.lower()}")
    elif pod.phase == "Running":
        prog = p.st.get("progress") or {}
        where = f"step {prog.get('step')}/{prog.get('totalSteps')}" if prog.get("step") is not None else "started"
        p.phase(S.PHASE_TRAINING, S.REASON_TRAINING, f"training pod {pod.name}: {where}")
    else:
        waiting = f" ({pod.waiting_reason})" if pod.waiting_reason else ""
        p.phase(S.PHASE_PENDING, S.REASON_POD_STARTING, f"training pod {pod.name} is {pod.phase.lower()}{waiting}")
    return p.finish()
