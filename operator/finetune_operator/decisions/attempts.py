"""Attempt bookkeeping: fold ended pods into status.attempts, counters, backoff, live progress.

Pure. A pod's ending is recorded once (an attempt with a result is never rewritten); pods the
status does not know yet are adopted (operator restart, lost status write); an attempt whose pod
vanished before it was seen to end is recorded as evicted (or preempted when a suspend stopped it).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from finetune_api.contract import RESULT_COMPLETED, RESULT_FAILED, RESULT_OOMKILLED
from finetune_operator.decisions.builders import ROLE_EXPORT, ROLE_TRAIN, rfc3339
from finetune_operator.decisions.observe import INTERRUPTIONS, Observed, PodObservation
from finetune_operator.decisions.plan import Pass, backoff_delay, describe

VANISHED_MESSAGE = "the pod disappeared before it finished (deleted, or its node was lost)"


def record_endings(p: Pass, observed: Observed) -> None:
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
            if pod.attempt > 1:  # its launch pass died before writing status: count the restart now
                p.st["restarts"] = p.st.get("restarts", 0) + 1
        if pod.ended and not rec.get("result"):
            _close(p, rec, pod)
    names = {pod.name for pod in observed.pods}
    for rec in attempts:
        if not rec.get("result") and rec.get("pod") not in names:
            _close(p, rec, None)


def _close(p: Pass, rec: dict[str, Any], pod: PodObservation | None) -> None:
    st = p.st
    result = pod.result if pod is not None else ("preempted" if rec.get("suspended") else "evicted")
    summary = pod.summary if pod is not None else {}
    rec["result"] = result
    rec["finishedAt"] = (pod.finished_at if pod is not None else None) or p.ts
    rec["exitCode"] = pod.exit_code if pod is not None else None
    rec["message"] = (pod.message if pod is not None else "") or (VANISHED_MESSAGE if pod is None else "")
    if "endedFirst" in summary:  # a multi-node attempt (gang.py): the member whose ending ended it
        rec["endedFirst"] = summary["endedFirst"]
    if summary.get("resumedFrom") is not None:
        rec["resumedFrom"] = summary["resumedFrom"]
    if rec.get("role") == ROLE_TRAIN and isinstance(summary.get("checkpoint"), str):
        st["checkpoint"] = {
            "name": summary["checkpoint"],
            "step": summary.get("step"),
            "savedAt": rec["finishedAt"],
        }
    if rec.get("role") == ROLE_TRAIN and result == RESULT_COMPLETED and isinstance(summary.get("step"), int):
        prog = dict(st.get("progress") or {})
        prog.update(step=summary["step"], percent=100.0, etaSeconds=0, updatedAt=p.ts)
        if "stale" in prog:  # the summary is read from the pod status, not the log
            prog["stale"] = False
        prog.setdefault("totalSteps", summary["step"])
        st["progress"] = prog
    if rec.get("role") == ROLE_EXPORT and result == RESULT_COMPLETED:
        st["export"] = {
            k: summary[k] for k in ("export", "formats", "maxDeviation", "metrics", "pushed") if k in summary
        }
        if "export" in st["export"]:
            st["export"]["path"] = st["export"].pop("export")
    p.plan.ended.append((str(rec.get("role")), str(result)))
    if result in INTERRUPTIONS and not rec.get("suspended"):
        st["preemptions"] += 1
    if result in (RESULT_FAILED, RESULT_OOMKILLED):
        st["exportFailures" if rec.get("role") == ROLE_EXPORT else "failures"] += 1
    if result != RESULT_COMPLETED and not rec.get("suspended"):
        consecutive = _consecutive_unsuccessful(st["attempts"], str(rec.get("role")))
        # a pod Kueue stopped goes straight back to its queue, which orders it: no backoff there
        queued = pod is not None and pod.stopped_by is not None
        delay = (
            0.0 if result in INTERRUPTIONS and (consecutive <= 1 or queued) else backoff_delay(consecutive, p.settings)
        )
        st["nextAttemptAfter"] = rfc3339(p.now + dt.timedelta(seconds=math.ceil(delay)))
    bad = result not in (RESULT_COMPLETED,) and not rec.get("suspended")
    p.event(
        "Warning" if bad and result not in INTERRUPTIONS else "Normal",
        f"Attempt{str(result).capitalize()}",
        describe(rec),
    )


def _consecutive_unsuccessful(attempts: list[dict[str, Any]], role: str) -> int:
    n = 0
    for a in reversed(attempts):
        if a.get("role") != role or not a.get("result"):
            continue
        if a["result"] == RESULT_COMPLETED:
            break
        n += 1
    return n


def record_live_progress(p: Pass, live: list[PodObservation]) -> None:
    for pod in live:
        if pod.role == ROLE_TRAIN and pod.checkpoint:
            cur = p.st.get("checkpoint") or {}
            if cur.get("name") != pod.checkpoint["name"]:
                p.st["checkpoint"] = {**pod.checkpoint, "savedAt": p.ts}
        if pod.role != ROLE_TRAIN:
            continue
        cur = dict(p.st.get("progress") or {})
        if pod.log_error:  # the last values stay, marked stale; the message says why (reconcile)
            if pod.phase == "Running" and not cur.get("stale"):
                p.st["progress"] = {**cur, "stale": True}
            continue
        if pod.progress:
            prog = dict(pod.progress)
            step, total = prog.get("step"), prog.get("totalSteps")
            if isinstance(step, (int, float)) and isinstance(total, (int, float)) and total > 0:
                prog["percent"] = round(min(100.0, 100.0 * step / total), 1)
            eta = prog.get("etaSeconds")  # the schema says integer; a worker's float is rounded
            if isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 <= eta < 1e9:
                prog["etaSeconds"] = round(eta)
            else:
                prog.pop("etaSeconds", None)
            if {k: cur.get(k) for k in prog} == prog and not cur.get("stale"):
                continue  # nothing new in the log: no write (updatedAt says when it last moved)
            prog["updatedAt"] = p.ts
            if "stale" in cur:  # false, not absent: a merge patch keeps keys it does not name
                prog["stale"] = False
            p.st["progress"] = prog
        elif cur.get("stale") and pod.phase == "Running":  # readable again, nothing printed yet
            p.st["progress"] = {**cur, "stale": False}
