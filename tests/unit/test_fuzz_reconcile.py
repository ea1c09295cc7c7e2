"""Fuzzed reconcile: a simulated world where pods start, end with random exit codes, reasons and
termination messages, get evicted, vanish, linger while terminating; time jumps; the user
suspends and resumes; status is occasionally wiped. After every pass:

- reconcile never raises, and its status is JSON the API server would store;
- never two workers on one workspace: a pod is created only when no other pod of the job is
  still live (running, pending or terminating), at most one per pass, never a name that exists;
- attempt numbers only increase per role; an export pod only after a completed training attempt;
- counters never go down, a finished job stays finished, and once the world turns benign every
  job ends Succeeded (or Failed with a stated reason) within a bounded number of passes.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from fuzzkit import FUZZ
from hypothesis import event, given, settings
from hypothesis import strategies as st

from finetune_operator.decisions.builders import LABEL_ATTEMPT, LABEL_ROLE, ROLE_EXPORT, ROLE_TRAIN
from finetune_operator.decisions.observe import Observed, observe_pod
from finetune_operator.decisions.reconcile import Plan, Settings, reconcile
from finetune_operator.decisions.status import PHASES, TERMINAL_PHASES, merge_patch

FUZZ_SIM = settings(FUZZ, max_examples=150)  # each example is up to 65 passes
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SETTINGS = Settings(worker_image="worker:test", backoff_base=10, backoff_max=120, grace_seconds=30)
SPECS = [
    {"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}, "resources": {"gpus": 0}},
    {"dataset": {"path": "data/train.jsonl"}, "lora": {"r": 4}, "export": {"formats": ["adapter", "huggingface"]},
     "storage": {"claimName": "shared"}, "ttlSecondsAfterFinished": 60},
]  # fmt: skip
EXIT_CODES = [0, 0, 2, 75, 75, 1, 137, 143, 255, -1, None]
REASONS = [None, "Error", "Completed", "OOMKilled", "Evicted", "ContainerCannotRun", "DeadlineExceeded"]
MESSAGES = [
    "", "not json", "{", "[1, 2]", "null", '{"result": "completed", "step": 40, "checkpoint": "checkpoint-40"}',
    '{"result": "preempted", "step": "forty", "checkpoint": 7, "resumedFrom": {"x": 1}}',
    '{"message": "' + "m" * 5000 + '"}', '{"export": "/workspace/export", "formats": ["huggingface"], "maxDeviation": 1e-7}',
    '{"step": 12, "checkpoint": "checkpoint-\\u0000"}', '{"step": 1e400, "maxDeviation": NaN, "checkpoint": "checkpoint-4"}',
]  # fmt: skip
LOG_TAILS = [None, "", '{"event": "progress", "step": 3, "totalSteps": 10, "loss": 0.5}',
             '{"event": "progress", "step": "x", "totalSteps": 0}\n{"event": "checkpoint", "name": "checkpoint-3", "step": 3}',
             '{"event": "progress", "step": 4, "totalSteps": 10, "loss": NaN, "samplesPerSecond": Infinity}',
             '{"event": "checkpoint", "name": 5}\ngarbage\n{"event": "progress", "step": -1, "totalSteps": -5}']  # fmt: skip


@dataclass
class Pod:
    name: str
    role: str
    attempt: str  # label text: the world may hold garbage there
    phase: str = "Pending"
    exit_code: int | None = None
    reason: str | None = None
    message: str = ""
    pod_reason: str | None = None
    deleting: bool = False
    log: str | None = None

    @property
    def live(self) -> bool:
        return self.phase in ("Pending", "Running")

    def manifest(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "labels": {LABEL_ROLE: self.role, LABEL_ATTEMPT: self.attempt}}
        if self.deleting:
            meta["deletionTimestamp"] = "2026-01-01T12:00:00Z"
        status: dict[str, Any] = {"phase": self.phase}
        if self.pod_reason:
            status["reason"] = self.pod_reason
        if not self.live:
            term = {"exitCode": self.exit_code, "reason": self.reason, "message": self.message,
                    "finishedAt": "2026-01-01T12:00:00Z"}  # fmt: skip
            status["containerStatuses"] = [{"name": "worker", "state": {"terminated": term}}]
        elif self.phase == "Running":
            status["containerStatuses"] = [{"name": "worker", "state": {"running": {}}}]
        return {"metadata": meta, "status": status}


@dataclass
class World:
    job: dict[str, Any]
    pods: dict[str, Pod] = field(default_factory=dict)
    claim: bool = False
    now: dt.datetime = T0
    wiped: bool = False
    deleted: bool = False
    history: list[str] = field(default_factory=list)


def new_world(spec: dict[str, Any], backoff: int) -> World:
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "fz", "namespace": "ml", "uid": "u-1", "generation": 1},
           "spec": {**copy.deepcopy(spec), "backoffLimit": backoff}, "status": {}}  # fmt: skip
    return World(job=job, claim="claimName" in spec.get("storage", {}))


def attempt_of(pod: Pod) -> int:
    try:
        return int(pod.attempt)
    except ValueError:
        return 0


def one_pass(w: World) -> Plan:
    """Observe, reconcile, check the invariants, apply the plan to the world."""
    observed = Observed(pods=tuple(observe_pod(p.manifest(), p.log) for p in w.pods.values()), claim_exists=w.claim)
    before = copy.deepcopy(w.job)
    plan = reconcile(w.job, observed, w.now, SETTINGS)
    assert w.job == before, "reconcile mutated the job it was given"
    old = w.job["status"]
    new = merge_patch(old, plan.status or {})
    json.dumps(new, allow_nan=False)  # the API server stores JSON: no NaN, no objects
    assert new.get("phase", "Pending") in PHASES

    pods = [o for o in plan.create if o["kind"] == "Pod"]
    assert len(pods) <= 1, f"two pods in one pass: {[o['metadata']['name'] for o in pods]}"
    for o in pods:
        name, role = o["metadata"]["name"], o["metadata"]["labels"][LABEL_ROLE]
        attempt = int(o["metadata"]["labels"][LABEL_ATTEMPT])
        assert name not in w.pods, f"planned {name}, which exists"
        live = [p.name for p in w.pods.values() if p.live]
        assert not live, f"planned {name} while {live} still live: two writers on one workspace"
        seen = [attempt_of(p) for p in w.pods.values() if p.role == role]
        seen += [int(a.get("attempt") or 0) for a in old.get("attempts", []) if a.get("role") == role]
        assert attempt > max(seen, default=0), f"{name}: attempt {attempt} does not increase on {seen}"
        if role == ROLE_EXPORT:
            assert any(a.get("role") == ROLE_TRAIN and a.get("result") == "completed" for a in new["attempts"])
    names = [a.get("pod") for a in new.get("attempts", [])]
    assert len(names) == len(set(names)), f"an attempt recorded twice: {names}"
    if not w.wiped:
        for counter in ("restarts", "preemptions", "failures", "exportFailures"):
            assert new.get(counter, 0) >= old.get(counter, 0), f"{counter} went down"
        if old.get("phase") in TERMINAL_PHASES and old.get("reason") not in ("InvalidSpec", "ConfigTooLarge"):
            assert new["phase"] == old["phase"] and not pods, "a finished job started again"
    if new.get("phase") == "Failed":
        assert new.get("reason") and new.get("message"), "Failed without a stated reason"

    for o in plan.create:
        if o["kind"] == "PersistentVolumeClaim":
            w.claim = True
        else:
            lab = o["metadata"]["labels"]
            w.pods[o["metadata"]["name"]] = Pod(o["metadata"]["name"], lab[LABEL_ROLE], lab[LABEL_ATTEMPT])
    for d in plan.delete:
        if d.kind == "Pod" and d.name in w.pods:
            w.pods[d.name].deleting = True
    w.job["status"] = new
    w.deleted = plan.delete_job
    w.history.append(f"{new.get('phase')}:{[o['metadata']['name'] for o in plan.create]}")
    return plan


def end(pod: Pod, code: int | None, reason: str | None, message: str) -> None:
    pod.phase = "Succeeded" if code == 0 else "Failed"
    pod.exit_code, pod.reason, pod.message = code, reason, message


def chaos_event(w: World, data: st.DataObject) -> None:
    live = [p for p in w.pods.values() if p.live]
    kind = data.draw(st.sampled_from(["start", "end", "end", "evict", "vanish", "terminate", "time", "time",
                                      "suspend", "wipe", "stray", "nothing"]))  # fmt: skip
    if kind == "start" and live:
        pod = data.draw(st.sampled_from(live))
        pod.phase, pod.log = "Running", data.draw(st.sampled_from(LOG_TAILS))
    elif kind == "end" and live:
        end(data.draw(st.sampled_from(live)), data.draw(st.sampled_from(EXIT_CODES)),
            data.draw(st.sampled_from(REASONS)), data.draw(st.sampled_from(MESSAGES)))  # fmt: skip
    elif kind == "evict" and live:
        pod = data.draw(st.sampled_from(live))
        end(pod, data.draw(st.sampled_from([137, 143, None])), "Error", "")
        pod.pod_reason = "Evicted"
    elif kind == "vanish" and w.pods:
        del w.pods[data.draw(st.sampled_from(sorted(w.pods)))]
    elif kind == "terminate":
        for p in [p for p in w.pods.values() if p.deleting]:
            if p.live and data.draw(st.booleans()):
                end(p, 75, "Error", '{"result": "preempted", "checkpoint": "checkpoint-5", "step": 5}')
            else:
                del w.pods[p.name]
    elif kind == "time":
        w.now += dt.timedelta(seconds=data.draw(st.integers(0, 400)))
    elif kind == "suspend":
        w.job["spec"]["suspend"] = not w.job["spec"].get("suspend", False)
        w.job["metadata"]["generation"] += 1
    elif kind == "wipe" and data.draw(st.integers(0, 3)) == 0:
        w.job["status"] = {}  # e.g. the object restored from a backup without status
        w.wiped = True
    elif kind == "stray":
        role = data.draw(st.sampled_from([ROLE_TRAIN, ROLE_EXPORT]))
        attempt = data.draw(st.sampled_from(["7", "x", "-1", "0"]))
        name = f"fz-{role}-{attempt}"
        if name not in w.pods:
            w.pods[name] = Pod(name, role, attempt, phase=data.draw(st.sampled_from(["Failed", "Succeeded", "Unknown"])),
                               exit_code=data.draw(st.sampled_from(EXIT_CODES)))  # fmt: skip


def benign(w: World) -> None:
    """The world after the storm: the user unsuspends, pods start, run, and complete; time passes."""
    if w.job["spec"].get("suspend"):
        w.job["spec"]["suspend"] = False
        w.job["metadata"]["generation"] += 1
    w.now += dt.timedelta(seconds=SETTINGS.backoff_max + 1)
    for p in list(w.pods.values()):
        if p.deleting and p.live:
            del w.pods[p.name]
        elif p.phase == "Pending":
            p.phase = "Running"
        elif p.phase == "Running":
            end(p, 0, "Completed", json.dumps({"result": "completed", "step": 10, "checkpoint": "checkpoint-10",
                                                "export": "/workspace/export", "formats": ["sentence-transformers"]}))


@FUZZ_SIM
@given(st.data())
def test_reconcile_under_random_worlds_keeps_its_invariants_and_finishes(data: st.DataObject) -> None:
    w = new_world(data.draw(st.sampled_from(SPECS)), data.draw(st.integers(0, 3)))
    for _ in range(data.draw(st.integers(1, 25))):
        one_pass(w)
        if w.deleted:
            return
        for _ in range(data.draw(st.integers(1, 3))):
            chaos_event(w, data)
    for _ in range(40):
        benign(w)
        one_pass(w)
        phase = w.job["status"].get("phase")
        if phase in TERMINAL_PHASES or w.deleted:
            break
    assert w.deleted or w.job["status"].get("phase") in TERMINAL_PHASES, f"never finished: {w.history[-6:]}"
    event(f"ended {w.job['status'].get('phase')} {w.job['status'].get('reason')}")
    event(f"passes >= {len(w.history) // 10 * 10}")
    st_ = w.job["status"]
    if st_.get("phase") == "Succeeded" and not w.wiped:
        roles = [(a["role"], a.get("result")) for a in st_["attempts"]]
        assert (ROLE_TRAIN, "completed") in roles and (ROLE_EXPORT, "completed") in roles, roles


TERMINATED = st.fixed_dictionaries({}, optional={"exitCode": st.sampled_from(EXIT_CODES), "reason": st.sampled_from(REASONS),
                                                "message": st.sampled_from(MESSAGES), "finishedAt": st.text(max_size=25)})
WAITING = st.fixed_dictionaries({"reason": st.sampled_from(["ImagePullBackOff", "ContainerCreating", "ErrImagePull"])})
CONTAINER = st.fixed_dictionaries({"name": st.just("worker")}, optional={
    "state": st.fixed_dictionaries({}, optional={"terminated": TERMINATED, "waiting": WAITING, "running": st.just({})})})
POD_STATUS = st.fixed_dictionaries({}, optional={
    "phase": st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"]),
    "reason": st.sampled_from([*REASONS, "NodeLost", "Shutdown", "Preempting"]),
    "message": st.text(max_size=50),
    "startTime": st.sampled_from(["2026-01-01T11:00:00Z", "yesterday", ""]),
    "containerStatuses": st.lists(CONTAINER, max_size=2),
    "conditions": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["DisruptionTarget", "Ready"]),
                                                  "status": st.sampled_from(["True", "False"])}), max_size=2),
})  # fmt: skip


@FUZZ
@given(POD_STATUS, st.sampled_from(LOG_TAILS), st.sampled_from(["1", "2", "x", ""]), st.booleans())
def test_observing_any_pod_status_never_raises(status: dict[str, Any], log: str | None, attempt: str,
                                               deleting: bool) -> None:
    meta: dict[str, Any] = {"name": f"fz-train-{attempt}", "labels": {LABEL_ROLE: ROLE_TRAIN, LABEL_ATTEMPT: attempt}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    obs = observe_pod({"metadata": meta, "status": status}, log)
    assert obs.result in (None, "completed", "preempted", "evicted", "oomkilled", "invalid", "failed")
    j = new_world(SPECS[0], 1).job
    j, _ = applied(j, reconcile(j, Observed(), T0, SETTINGS))
    plan = reconcile(j, Observed(pods=(obs,), claim_exists=True), T0 + dt.timedelta(seconds=5), SETTINGS)
    if plan.status:
        json.dumps(plan.status, allow_nan=False)
    if not obs.ended:
        assert not [o for o in plan.create if o["kind"] == "Pod"], "a new pod while one is live"


def applied(job: dict[str, Any], plan: Plan) -> tuple[dict[str, Any], Plan]:
    job = copy.deepcopy(job)
    job["status"] = merge_patch(job["status"], plan.status or {})
    return job, plan


def test_non_finite_numbers_from_a_worker_never_reach_status() -> None:
    """Regression: a diverged loss (NaN) in a progress line, or 1e400 in a summary, went into the
    status patch; the API server rejects non-JSON numbers, so every later status write failed."""
    w = new_world(SPECS[0], 1)
    one_pass(w)
    pod = next(iter(w.pods.values()))
    pod.phase, pod.log = "Running", '{"event": "progress", "step": 4, "totalSteps": 10, "loss": NaN}'
    one_pass(w)  # json.dumps(allow_nan=False) inside
    assert w.job["status"]["progress"].get("loss") is None and w.job["status"]["progress"]["step"] == 4  # null: dropped, as a merge patch does
    end(pod, 75, "Error", '{"result": "preempted", "step": 1e400, "checkpoint": "checkpoint-4"}')
    one_pass(w)
    assert w.job["status"]["checkpoint"]["name"] == "checkpoint-4"


def test_a_pod_adopted_after_its_launch_pass_died_counts_as_a_restart() -> None:
    """Regression (found by the operator chaos suite): the operator restarted between creating
    train-3 and writing status; the adopted attempt was not counted in status.restarts."""
    w = new_world(SPECS[0], 3)
    one_pass(w)
    for _ in range(2):
        pod = next(p for p in w.pods.values() if p.live)
        end(pod, 75, "Error", '{"result": "preempted", "checkpoint": "checkpoint-5", "step": 5}')
        one_pass(w)
        w.now += dt.timedelta(seconds=SETTINGS.backoff_max + 1)
        one_pass(w)  # past any backoff: the next attempt is created
    assert sorted(w.pods) == ["fz-train-1", "fz-train-2", "fz-train-3"]
    before = copy.deepcopy(w.job["status"])
    lost = before["attempts"].pop()  # as if that status write never happened
    before["restarts"] -= 1
    w.job["status"] = before
    one_pass(w)
    st = w.job["status"]
    assert [a["pod"] for a in st["attempts"]] == ["fz-train-1", "fz-train-2", lost["pod"]]
    assert st["restarts"] == 2
