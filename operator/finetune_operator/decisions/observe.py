"""Read what worker pods report: how a pod ended, its termination summary, its live progress.

Pure: takes Pod dicts and log text, returns dataclasses. The handlers fetch; this module decides
what the fetched data means, so the classification table is testable without a cluster.

Every ending is one of the results in finetune_api.contract:
  completed  exit 0
  preempted  exit 75: the worker checkpointed on SIGTERM and stopped (does not consume backoffLimit)
  evicted    pod reason Evicted / NodeLost / Shutdown, a DisruptionTarget condition (or Kueue's
             TerminationTarget: a Kueue preemption whose worker did not exit 75), a pod that
             vanished before it finished, or one that failed while being deleted (exit 143 or 137
             from its deletion's SIGTERM/SIGKILL) (does not consume backoffLimit)
  oomkilled  container reason OOMKilled (consumes backoffLimit)
  invalid    exit 2: invalid config or data, permanent
  failed     anything else (consumes backoffLimit)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from finetune_api.contract import (
    CHECKPOINT_EVENT,
    EXIT_COMPLETED,
    EXIT_INVALID,
    EXIT_PREEMPTED,
    PROGRESS_EVENT,
    PROGRESS_KEY,
    RESULT_COMPLETED,
    RESULT_EVICTED,
    RESULT_FAILED,
    RESULT_INVALID,
    RESULT_OOMKILLED,
    RESULT_PREEMPTED,
)
from finetune_operator.decisions.builders import LABEL_ATTEMPT, LABEL_RANK, LABEL_ROLE
from finetune_operator.decisions.kueue import (
    ADMISSION_GATE,
    TERMINATION_TARGET,
    admission_hold,
    admitted,
    queue_of,
    termination_target,
)

EVICTION_REASONS = ("Evicted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated", "Preempting")
DISRUPTION_CONDITION = "DisruptionTarget"
# Conditions saying the platform is ending the pod (the kubelet / eviction API's, and Kueue's own)
DISRUPTION_CONDITIONS = (DISRUPTION_CONDITION, TERMINATION_TARGET)
# Results that are the platform's doing, not the workload's: they never consume backoffLimit.
INTERRUPTIONS = (RESULT_PREEMPTED, RESULT_EVICTED)
EXPORT_EVENT = "export"
PROGRESS_FIELDS = ("step", "totalSteps", "epoch", "loss", "samplesPerSecond", "etaSeconds")
LOG_TAIL_LINES = 40
# Container waiting reasons of a normal start; any other (ErrImagePull, ImagePullBackOff,
# CreateContainerConfigError, ...) holds the pod until someone acts.
WAITING_NORMAL = (None, "ContainerCreating", "PodInitializing")


@dataclass(frozen=True)
class PodObservation:
    """One child pod as the operator sees it."""

    name: str
    role: str
    attempt: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    result: str | None = None  # set once the pod has ended (see the module docstring)
    exit_code: int | None = None
    reason: str | None = None  # container/pod reason: Completed, Error, OOMKilled, Evicted, ...
    message: str = ""  # human-readable: the summary's message, or the raw termination message
    summary: dict[str, Any] = field(default_factory=dict)  # the worker's JSON termination summary
    started_at: str | None = None
    finished_at: str | None = None
    deleting: bool = False  # metadata.deletionTimestamp is set
    waiting_reason: str | None = None  # ImagePullBackOff, CreateContainerConfigError, ...
    # Why a pod that has not started is held, as (reason, message) in the words of whoever holds
    # it: the scheduler (Unschedulable: "0/1 nodes are available: 1 Insufficient cpu."), a
    # scheduling gate (SchedulingGated: Kueue's admission gate), or the kubelet (ErrImagePull,
    # ImagePullBackOff, CreateContainerConfigError, ...). None: starting normally, or started.
    held: tuple[str, str] | None = None
    progress: dict[str, Any] | None = None  # last progress line of the log tail
    checkpoint: dict[str, Any] | None = None  # last checkpoint line of the log tail
    stage: str | None = None  # last export stage line of the log tail (loading, merged, verified, ...)
    log_error: str | None = None  # why the log tail could not be read (progress is then stale)
    rank: int | None = None  # a multi-node gang's member rank (label finetune.dev/rank), else None
    queue: str | None = None  # the Kueue LocalQueue it was submitted to (label kueue.x-k8s.io/queue-name)
    stopped_by: tuple[str, str] | None = None  # Kueue's (reason, message) when Kueue stopped it (preemption)

    @property
    def ended(self) -> bool:
        return self.result is not None

    @property
    def running(self) -> bool:
        return self.result is None and self.phase == "Running"


@dataclass(frozen=True)
class Observed:
    """Everything reconcile needs to know about the world besides the job itself."""

    pods: tuple[PodObservation, ...] = ()
    claim_exists: bool = False
    # spec.model.fromJob: the source FineTuneJob as read from the API (same namespace), None when
    # it does not exist (or the job has no fromJob). Reconcile decides what its state means.
    source_job: dict[str, Any] | None = None
    # The workspace claim recorded in status.source: does it still exist? None: not looked at.
    source_claim_exists: bool | None = None
    # spec.credentials: the referenced Secrets that exist, name -> their keys (never their values),
    # read before a launch. None: not looked at (the local runner has no Secrets: the user's own
    # environment carries the credentials).
    secrets: dict[str, frozenset[str]] | None = None


def _finite_float(text: str) -> float | None:
    """JSON numbers from a worker, with NaN/Infinity/1e400 read as null: the API server stores JSON,
    which has no non-finite numbers, so one diverged loss would make every status patch fail."""
    value = float(text)
    return value if math.isfinite(value) else None


def _no_constant(text: str) -> None:  # NaN, Infinity, -Infinity
    return None


def parse_summary(message: str | None) -> dict[str, Any]:
    """The worker's termination summary (a JSON object), or {} when the message is something else
    (e.g. the log tail the kubelet falls back to when the process died without writing one)."""
    if not message or not message.lstrip().startswith("{"):
        return {}
    try:
        doc = json.loads(message, parse_float=_finite_float, parse_constant=_no_constant)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def parse_log_tail(text: str | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(last progress line, last checkpoint line) of a log tail; lines that are not JSON are skipped."""
    progress: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    for line in (text or "").splitlines()[::-1]:
        line = line.strip()
        if not line.startswith("{") or (progress is not None and checkpoint is not None):
            continue
        try:
            doc = json.loads(line, parse_float=_finite_float, parse_constant=_no_constant)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        kind = doc.get(PROGRESS_KEY)
        if kind == PROGRESS_EVENT and progress is None:
            progress = {k: doc[k] for k in PROGRESS_FIELDS if k in doc}
        elif kind == CHECKPOINT_EVENT and checkpoint is None and isinstance(doc.get("name"), str):
            checkpoint = {"name": doc["name"], "step": doc.get("step")}
    return progress, checkpoint


def parse_export_stage(text: str | None) -> str | None:
    """The stage of the last `{"event": "export", "stage": ...}` line of a log tail."""
    for line in (text or "").splitlines()[::-1]:
        line = line.strip()
        if not line.startswith("{") or '"export"' not in line:
            continue
        try:
            doc = json.loads(line, parse_float=_finite_float, parse_constant=_no_constant)
        except ValueError:
            continue
        if (
            isinstance(doc, dict)
            and doc.get(PROGRESS_KEY) == EXPORT_EVENT
            and isinstance(doc.get("stage"), str)
        ):
            return str(doc["stage"])
    return None


def _terminated(status: dict[str, Any]) -> dict[str, Any] | None:
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return dict(term)
    return None


def _waiting_reason(status: dict[str, Any]) -> str | None:
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in WAITING_NORMAL:
            return str(waiting["reason"])
    return None


def held_by(pod: dict[str, Any], workload: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """(reason, message) of what holds a pod that has not started: scheduling gates first (the
    scheduler does not look at a gated pod; Kueue's admission gate in the words of the pod's
    Workload, `workload` as kueue.workload_view made it), then the scheduler's verdict, then the
    kubelet's."""
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    gates = [str(g.get("name")) for g in spec.get("schedulingGates") or [] if isinstance(g, dict)]
    if ADMISSION_GATE in gates:  # Kueue's: its Workload says why, once Kueue has said anything
        if admitted(workload):
            gates.remove(ADMISSION_GATE)  # Kueue is removing it
        elif (hold := admission_hold(workload)) is not None:
            return hold
    if gates:
        return "SchedulingGated", f"held by scheduling gate {', '.join(gates)}"
    for cond in status.get("conditions") or []:
        if cond.get("reason") == "SchedulingGated":  # stale once the gates are gone: the API server set it
            continue  # at creation, and only a scheduler (not yet at it) would update it
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
            return str(cond["reason"]), str(cond.get("message") or "not scheduled yet")
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in WAITING_NORMAL:
            return str(waiting["reason"]), str(waiting.get("message") or "").strip()
    return None


def _disrupted(status: dict[str, Any]) -> bool:
    if status.get("reason") in EVICTION_REASONS:
        return True
    return any(
        c.get("type") in DISRUPTION_CONDITIONS and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def classify(status: dict[str, Any]) -> tuple[str | None, int | None, str | None]:
    """(result, exit code, reason) of a PodStatus; result None while the pod has not ended."""
    phase = status.get("phase") or "Pending"
    term = _terminated(status)
    code = term.get("exitCode") if term else None
    reason = (term or {}).get("reason") or status.get("reason")
    if phase not in ("Succeeded", "Failed", "Unknown"):
        return None, None, None  # restartPolicy Never: the phase turns final once the container ends
    if code == EXIT_COMPLETED and phase != "Failed":
        return RESULT_COMPLETED, code, reason or "Completed"
    if code == EXIT_PREEMPTED:
        return RESULT_PREEMPTED, code, reason
    if code == EXIT_INVALID:
        return RESULT_INVALID, code, reason
    if (term or {}).get("reason") == "OOMKilled":
        return RESULT_OOMKILLED, code, "OOMKilled"
    if _disrupted(status) or phase == "Unknown":
        return RESULT_EVICTED, code, status.get("reason") or reason or "NodeLost"
    return RESULT_FAILED, code, reason or "Error"


def _message(summary: dict[str, Any], raw: str, status: dict[str, Any]) -> str:
    if summary.get("message"):
        return str(summary["message"])
    if raw.strip() and not summary:
        lines = [ln for ln in raw.strip().splitlines() if ln.strip()]
        return lines[-1][:512] if lines else ""
    return str(status.get("message") or "")


def observe_pod(pod: dict[str, Any], log_tail: str | None = None, log_error: str | None = None,
                workload: dict[str, Any] | None = None) -> PodObservation:  # fmt: skip
    """Turn a Pod object (and optionally its log tail, or why it could not be read, and the view of
    its Kueue Workload) into a PodObservation."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    result, code, reason = classify(status)
    if result == RESULT_FAILED and meta.get("deletionTimestamp"):
        # ended by its deletion (kubectl delete, a drain, a suspend: SIGTERM, or SIGKILL after the
        # grace period; an export has no graceful stop): an interruption, as for an Evicted pod
        result, reason = RESULT_EVICTED, "Deleted"
    term = _terminated(status) or {}
    raw = str(term.get("message") or "")
    summary = parse_summary(raw)
    progress, checkpoint = parse_log_tail(log_tail)
    message = _message(summary, raw, status) if result else ""
    stopped_by = termination_target(status) if result else None
    if stopped_by is not None:  # Kueue stopped it: say so in its words, beside the worker's
        message = "; ".join(m for m in (message, f"Kueue {stopped_by[0]}: {stopped_by[1]}".rstrip(": ")) if m)
    try:
        attempt = int(labels.get(LABEL_ATTEMPT, "0"))
    except ValueError:
        attempt = 0
    return PodObservation(
        name=meta.get("name", ""),
        role=str(labels.get(LABEL_ROLE, "")),
        attempt=attempt,
        phase=str(status.get("phase") or "Pending"),
        result=result,
        exit_code=code,
        reason=reason,
        message=message,
        summary=summary,
        started_at=term.get("startedAt") or status.get("startTime"),
        finished_at=term.get("finishedAt"),
        deleting=bool(meta.get("deletionTimestamp")),
        waiting_reason=_waiting_reason(status),
        held=held_by(pod, workload) if result is None else None,
        progress=progress,
        checkpoint=checkpoint,
        stage=parse_export_stage(log_tail) if labels.get(LABEL_ROLE) == "export" else None,
        log_error=log_error,
        rank=int(labels[LABEL_RANK]) if str(labels.get(LABEL_RANK, "")).isdigit() else None,
        queue=queue_of(pod),
        stopped_by=stopped_by,
    )
