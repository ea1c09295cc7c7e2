"""The vocabulary of a reconcile pass: operator Settings, the Plan it returns, and the working
state of one pass (`Pass`). Pure: no I/O, no kopf, no API client."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.decisions import status as S
from finetune_operator.decisions.builders import DEFAULT_WORKER_IMAGE, build_event, rfc3339
from finetune_operator.decisions.observe import PodObservation

MAX_ATTEMPT_HISTORY = 100


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
    ended: list[tuple[str, str]] = field(
        default_factory=list
    )  # (role, result) of attempts ended in this pass


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


class Pass:
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
        self.plan.events.append(
            build_event(self.job, type_, reason, message, self.now, len(self.plan.events))
        )

    def phase(self, phase: str, reason: str, message: str, *, announce: bool = False, told: bool = False,
              warning: bool = False) -> None:
        """Set the phase; post an Event when it changes (named after the phase, or after the
        reason for Failed and Suspended). `announce`: post one named after `reason` whenever the
        reason changes, even within a phase (e.g. Pending -> Pending/WaitingForSourceJob).
        `told`: the caller posted this transition's Event itself (Started, Resumed, ExportStarted
        name the pod they created): one Event per transition. `warning`: the Event is a Warning
        (as every Failed one is)."""
        before = self.old.get("phase")
        S.set_phase(self.st, phase, reason, message, self.ts)
        if phase in S.TERMINAL_PHASES:
            self.st.setdefault("completionTime", self.ts)
        warn = warning or phase == S.PHASE_FAILED
        if told:
            return
        if announce and (before != phase or self.old.get("reason") != reason):
            self.event("Warning" if warn else "Normal", reason, message)
        elif before != phase:
            self.event(
                "Warning" if warn else "Normal",
                reason if warn or phase == S.PHASE_SUSPENDED else phase,
                message,
            )

    def stop(self, live: Iterable[PodObservation]) -> None:
        """Delete every live pod not already being deleted (graceful: the worker checkpoints)."""
        for pod in live:
            if not pod.deleting:
                self.plan.delete.append(Delete("Pod", pod.name, self.settings.grace_seconds))

    def invalid(self, live: Iterable[PodObservation], reason: str, message: str) -> Plan:
        """Failed for the spec (fixed by editing it: no TTL, a permanent error for the caller)."""
        self.stop(live)
        self.phase(S.PHASE_FAILED, reason, message)
        self.plan.permanent_error = message
        return self.finish()

    def fail(self, live: Iterable[PodObservation], reason: str, message: str) -> Plan:
        """Failed for good: pods stopped, no next attempt, the TTL counted from now."""
        self.stop(live)
        self.st.pop("nextAttemptAfter", None)
        self.phase(S.PHASE_FAILED, reason, message)
        self.ttl()
        return self.finish()

    def ttl(self) -> None:
        """spec.ttlSecondsAfterFinished of a finished job: delete it when due, else look again then."""
        ttl = (self.job.get("spec") or {}).get("ttlSecondsAfterFinished")
        done = parse_time(self.st.get("completionTime"))
        if not isinstance(ttl, int) or isinstance(ttl, bool) or done is None:
            return
        ttl = min(ttl, 2**31 - 1)  # the parser caps it; a finished job's spec is not re-parsed
        remaining = (done + dt.timedelta(seconds=ttl) - self.now).total_seconds()
        if remaining <= 0:
            self.plan.delete_job = True
        else:
            self.plan.requeue_after = remaining

    def finish(self) -> Plan:
        self.st["attempts"] = self.st["attempts"][-MAX_ATTEMPT_HISTORY:]
        self.plan.status = S.status_patch(self.old, self.st)
        self.plan.phase = str(self.st.get("phase") or S.PHASE_PENDING)
        return self.plan


def describe(attempt: dict[str, Any]) -> str:
    text = f"{attempt.get('pod')} {attempt.get('result')}"
    if attempt.get("exitCode") is not None:
        text += f" (exit {attempt['exitCode']})"
    return text + (f": {attempt['message']}" if attempt.get("message") else "")
