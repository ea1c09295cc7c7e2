"""Status of a FineTuneJob: phases, conventional conditions, and the minimal patch.

Pure. Condition Types and Reasons are constants so `kubectl wait --for=condition=Succeeded`,
Argo CD health checks and alerts can rely on them. `lastTransitionTime` moves only when a
condition's status flips, and `status_patch` returns None when nothing changed, so an idle
job costs no writes.
"""

from __future__ import annotations

import copy
from typing import Any

PHASE_PENDING = "Pending"
PHASE_TRAINING = "Training"
PHASE_EXPORTING = "Exporting"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
PHASE_SUSPENDED = "Suspended"
PHASES = (PHASE_PENDING, PHASE_TRAINING, PHASE_EXPORTING, PHASE_SUCCEEDED, PHASE_FAILED, PHASE_SUSPENDED)
TERMINAL_PHASES = (PHASE_SUCCEEDED, PHASE_FAILED)

COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_TRAINING = "Training"
COND_SUSPENDED = "Suspended"
CONDITION_TYPES = (COND_TRAINING, COND_SUSPENDED, COND_SUCCEEDED, COND_FAILED)

# Reasons (CamelCase, as Kubernetes conventions ask).
REASON_INVALID_SPEC = "InvalidSpec"
REASON_CONFIG_TOO_LARGE = "ConfigTooLarge"
REASON_INVALID_DATA = "InvalidConfigOrData"
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
REASON_EXPORT_BACKOFF_LIMIT = "ExportBackoffLimitExceeded"
REASON_EXPORTED = "Exported"
REASON_WAITING_FOR_STORAGE = "WaitingForStorage"
REASON_WAITING_FOR_SOURCE = "WaitingForSourceJob"  # spec.model.fromJob missing or not Succeeded yet
REASON_SOURCE_FAILED = "SourceJobFailed"
REASON_SOURCE_EXPORT_MISSING = "SourceExportMissing"  # Succeeded, but no sentence-transformers export
REASON_SECRET_MISSING = "SecretMissing"  # a spec.credentials Secret or key does not exist (yet)
REASON_POD_STARTING = "PodStarting"
REASON_TRAINING = "Training"
REASON_EXPORTING = "Exporting"
REASON_BACKOFF = "BackingOff"
REASON_SUSPENDED = "Suspended"
REASON_SUSPENDING = "Suspending"
REASON_NOT_STARTED = "NotStarted"
REASON_RUNNING = "Running"
REASON_FINISHED = "Finished"


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str, now: str
) -> list[dict[str, Any]]:
    """Return `conditions` with `type_` set; lastTransitionTime changes only when status flips."""
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(cond)
            continue
        found = True
        transition = cond.get("lastTransitionTime", now) if cond.get("status") == value else now
        out.append({"type": type_, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": transition})  # fmt: skip
    if not found:
        out.append(
            {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": now}
        )
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(str(c.get("type")), len(order)))


def get_condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def set_phase(status: dict[str, Any], phase: str, reason: str, message: str, now: str) -> None:
    """Set `phase`, `message` and all four conditions coherently for it (in place)."""
    conds = list(status.get("conditions") or [])
    active = phase in (PHASE_TRAINING, PHASE_EXPORTING)
    conds = set_condition(
        conds,
        COND_TRAINING,
        active,
        reason if active else _idle_reason(phase),
        message if active else "",
        now,
    )
    conds = set_condition(conds, COND_SUSPENDED, phase == PHASE_SUSPENDED,
                          reason if phase == PHASE_SUSPENDED else _idle_reason(phase),
                          message if phase == PHASE_SUSPENDED else "", now)  # fmt: skip
    conds = set_condition(conds, COND_SUCCEEDED, phase == PHASE_SUCCEEDED,
                          reason if phase == PHASE_SUCCEEDED else REASON_NOT_STARTED if phase == PHASE_PENDING else _idle_reason(phase),
                          message if phase == PHASE_SUCCEEDED else "", now)  # fmt: skip
    conds = set_condition(conds, COND_FAILED, phase == PHASE_FAILED,
                          reason if phase == PHASE_FAILED else _idle_reason(phase),
                          message if phase == PHASE_FAILED else "", now)  # fmt: skip
    status["phase"] = phase
    status["reason"] = reason
    status["message"] = message
    status["conditions"] = conds


def _idle_reason(phase: str) -> str:
    return {
        PHASE_PENDING: REASON_NOT_STARTED,
        PHASE_SUSPENDED: REASON_SUSPENDED,
        PHASE_SUCCEEDED: REASON_FINISHED,
        PHASE_FAILED: REASON_FINISHED,
        PHASE_TRAINING: REASON_RUNNING,
        PHASE_EXPORTING: REASON_RUNNING,
    }.get(phase, REASON_RUNNING)


def _without_volatile(status: dict[str, Any]) -> dict[str, Any]:
    """Status minus timestamps that change on every look (progress.updatedAt)."""
    s = copy.deepcopy(status)
    if isinstance(s.get("progress"), dict):
        s["progress"].pop("updatedAt", None)
    return s


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch turning `old` into `new` (top-level keys), or None when nothing that
    matters changed (a progress report that differs only in updatedAt is not a change)."""
    if _without_volatile(old) == _without_volatile(new):
        return None
    patch = _with_removals(old, new)
    return {k: v for k, v in patch.items() if k not in new or old.get(k) != new[k]} or None


def _with_removals(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new`, plus null for each key `old` had and `new` dropped, at any depth of nested objects:
    a JSON merge patch merges objects key by key, so a key it does not name stays."""
    out: dict[str, Any] = {}
    for k, v in new.items():
        was = old.get(k)
        out[k] = _with_removals(was, v) if isinstance(was, dict) and isinstance(v, dict) else copy.deepcopy(v)
    for k in old:
        if k not in new:
            out[k] = None
    return out


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`target` with the JSON merge patch (RFC 7386) applied, as the API server applies it."""
    out = copy.deepcopy(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = merge_patch({}, v) if isinstance(v, dict) else copy.deepcopy(v)
    return out
