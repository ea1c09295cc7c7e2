"""What status says of the job's one live pod: running (where it is), starting, or held, and by
whom (the scheduler, a scheduling gate, the kubelet), in their words. Pure; reconcile calls
`live_pod` once the attempt's pod exists and has not ended."""

from __future__ import annotations

from finetune_operator.decisions import status as S
from finetune_operator.decisions.builders import ROLE_EXPORT
from finetune_operator.decisions.kueue import REASON_INADMISSIBLE, REASON_QUEUED
from finetune_operator.decisions.observe import PodObservation
from finetune_operator.decisions.plan import Pass, Plan


def _held(p: Pass, role: str, pod: PodObservation) -> bool:
    """A pod that someone holds (the scheduler, a gate, the kubelet): say who and what, in their
    words, as the phase's reason and message, with a Warning Event once per reason (a gate is
    Normal: waiting for admission is the queue working; Kueue's queue is named)."""
    if pod.held is None:
        return False
    reason, said = pod.held
    what = f"{'export' if role == ROLE_EXPORT else 'training'} pod {pod.name} {HELD_WORDS.get(reason, 'is waiting')}"
    if reason in KUEUE_REASONS and pod.queue:
        what += f" in LocalQueue {pod.queue}"
    message = f"{what}: {said}" if said else what
    phase = S.PHASE_EXPORTING if role == ROLE_EXPORT else S.PHASE_PENDING
    p.phase(phase, reason, message, announce=True, warning=reason not in QUEUE_WORKING)
    return True


# How status words what holds a pod (observe.held_by); other reasons read "is waiting: ...".
HELD_WORDS = {
    "Unschedulable": "cannot be scheduled",
    "SchedulingGated": "is not admitted yet",
    REASON_QUEUED: "is queued",  # behind Kueue's admission gate (kueue.py), in Kueue's words
    REASON_INADMISSIBLE: "cannot be admitted",
    "ErrImagePull": "cannot pull its image",
    "ImagePullBackOff": "cannot pull its image",
    "InvalidImageName": "has an invalid image name",
    "CreateContainerConfigError": "cannot be configured",
}


KUEUE_REASONS = (REASON_QUEUED, REASON_INADMISSIBLE)
QUEUE_WORKING = ("SchedulingGated", REASON_QUEUED)  # held as a queue holds: a Normal Event, not a Warning


def live_pod(p: Pass, role: str, pod: PodObservation) -> Plan:
    """The phase a live pod gives the job: Training (or Exporting) with where it is, Pending while
    it starts, or held, and by whom."""
    if pod.phase != "Running":
        p.plan.requeue_after = None  # nothing to read: the pod's watch events bring what changes
    if _held(p, role, pod):  # (a gang is held while any member is, though rank 0 may run)
        return p.finish()
    if role == ROLE_EXPORT:
        where = f"stage {pod.stage}" if pod.stage else f"is {pod.phase.lower()}"
        p.phase(S.PHASE_EXPORTING, S.REASON_EXPORTING, f"export pod {pod.name} {where}")
    elif pod.phase == "Running":
        prog = p.st.get("progress") or {}
        where = (
            f"step {prog.get('step')}/{prog.get('totalSteps')}" if prog.get("step") is not None else "started"
        )
        stale = f" (progress stale: {pod.log_error})" if pod.log_error else ""
        p.phase(S.PHASE_TRAINING, S.REASON_TRAINING, f"training pod {pod.name}: {where}{stale}")
    elif pod.waiting_reason:
        p.phase(
            S.PHASE_PENDING,
            S.REASON_POD_STARTING,
            f"training pod {pod.name} is waiting: {pod.waiting_reason}",
        )
    else:  # keep the launch message ("created, resuming from ..."): nothing new to say, nothing to write
        message = str(p.st.get("message") or f"training pod {pod.name} is pending")
        if p.st.get("reason") != S.REASON_POD_STARTING:  # it was held, and no longer is
            message = f"training pod {pod.name} is starting"
        p.phase(S.PHASE_PENDING, S.REASON_POD_STARTING, message)
    return p.finish()
