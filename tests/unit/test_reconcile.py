"""Reconcile tables: every lifecycle transition of a FineTuneJob, decided from (job, observed, now)."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from finetune_operator.decisions.builders import CONFIG_ENV_MAX_BYTES
from finetune_operator.decisions.observe import Observed, PodObservation
from finetune_operator.decisions.reconcile import Plan, Settings, reconcile
from finetune_operator.decisions.status import get_condition, merge_patch

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SETTINGS = Settings(worker_image="worker:test", backoff_base=10, backoff_max=300, grace_seconds=120)


def job(
    spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, generation: int = 1
) -> dict[str, Any]:
    base = {
        "dataset": {"inline": [{"question": "q", "answer": "a"}]},
        "resources": {"gpus": 0},
        "backoffLimit": 2,
    }
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "faq", "namespace": "ml", "uid": "u-1", "generation": generation},
        "spec": {**base, **(spec or {})},
        "status": status or {},
    }


def pod(name: str, phase: str = "Running", result: str | None = None, **kw: Any) -> PodObservation:
    _, role, attempt = name.rsplit("-", 2)
    return PodObservation(name=name, role=role, attempt=int(attempt), phase=phase, result=result, **kw)


def apply(j: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The job as it would be stored after the plan's status patch."""
    j = copy.deepcopy(j)
    j["status"] = merge_patch(j["status"], plan.status or {})
    return j


def step(
    j: dict[str, Any], pods: list[PodObservation], now: dt.datetime = T0, claim: bool = True
) -> tuple[dict[str, Any], Plan]:
    plan = reconcile(j, Observed(pods=tuple(pods), claim_exists=claim), now, SETTINGS)
    return apply(j, plan), plan


def kinds(plan: Plan) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in plan.create]


def reasons(plan: Plan) -> list[str]:
    return [e["reason"] for e in plan.events]


def started(j: dict[str, Any]) -> dict[str, Any]:
    """A job whose first training pod was created."""
    j, _ = step(j, [], claim=False)
    return j


def test_new_job_creates_claim_then_training_pod_and_is_pending() -> None:
    j, plan = step(job(), [], claim=False)
    assert kinds(plan) == [("PersistentVolumeClaim", "faq-workspace"), ("Pod", "faq-train-1")]
    st = j["status"]
    assert (
        st["phase"] == "Pending"
        and st["observedGeneration"] == 1
        and st["startTime"] == "2026-01-01T12:00:00Z"
    )
    assert st["attempts"] == [{"pod": "faq-train-1", "role": "train", "attempt": 1,
                               "startedAt": "2026-01-01T12:00:00Z", "resumedFrom": None}]  # fmt: skip
    assert get_condition(st, "Succeeded")["status"] == "False"
    # one Event for the transition: Started names the pod, no second "Pending" event says it again
    assert reasons(plan) == ["Started"] and plan.requeue_after == SETTINGS.progress_interval


def test_existing_claim_is_used_and_a_missing_named_claim_is_waited_for() -> None:
    j, plan = step(job({"storage": {"claimName": "shared"}}), [], claim=False)
    assert plan.create == [] and j["status"]["reason"] == "WaitingForStorage"
    assert "shared" in j["status"]["message"] and plan.requeue_after == SETTINGS.pending_interval
    _, plan = step(job({"storage": {"claimName": "shared"}}), [], claim=True)
    assert kinds(plan) == [("Pod", "faq-train-1")]
    vol = plan.create[0]["spec"]["volumes"][0]
    assert vol["persistentVolumeClaim"]["claimName"] == "shared"


def test_second_pass_with_the_same_world_changes_nothing() -> None:
    j = started(job())
    j, plan = step(j, [pod("faq-train-1", "Pending")])
    assert plan.create == [] and plan.delete == [] and plan.status is None and plan.events == []


def test_running_pod_reports_progress_and_checkpoint() -> None:
    j = started(job())
    prog = {"step": 30, "totalSteps": 120, "epoch": 0.25, "loss": 0.8, "samplesPerSecond": 40.0}
    j, plan = step(j, [pod("faq-train-1", progress=prog, checkpoint={"name": "checkpoint-20", "step": 20})])
    st = j["status"]
    assert st["phase"] == "Training" and get_condition(st, "Training")["status"] == "True"
    assert st["progress"]["percent"] == 25.0 and st["progress"]["loss"] == 0.8
    assert st["checkpoint"]["name"] == "checkpoint-20" and "step 30/120" in st["message"]
    assert "Training" in reasons(plan)


def test_preempted_pod_is_relaunched_at_once_resuming_without_consuming_backoff() -> None:
    j = started(job())
    j, _ = step(j, [pod("faq-train-1")])
    ended = pod("faq-train-1", "Failed", "preempted", exit_code=75,
                summary={"result": "preempted", "step": 40, "checkpoint": "checkpoint-40"})  # fmt: skip
    j, plan = step(j, [ended])
    st = j["status"]
    assert kinds(plan) == [("Pod", "faq-train-2")]
    assert st["preemptions"] == 1 and st["failures"] == 0 and st["restarts"] == 1
    assert st["attempts"][0]["result"] == "preempted" and st["attempts"][0]["exitCode"] == 75
    assert st["attempts"][1]["resumedFrom"] == "checkpoint-40" and st["checkpoint"]["step"] == 40
    assert reasons(plan) == ["AttemptPreempted", "Resumed"]


def test_vanished_pod_counts_as_evicted() -> None:
    j = started(job())
    j, plan = step(j, [])
    assert j["status"]["attempts"][0]["result"] == "evicted" and j["status"]["preemptions"] == 1
    assert kinds(plan) == [("Pod", "faq-train-2")]


@pytest.mark.parametrize("result,code", [("failed", 1), ("oomkilled", 137)])
def test_application_errors_back_off_exponentially_and_consume_backoff(result: str, code: int) -> None:
    j = started(job())
    j, plan = step(j, [pod("faq-train-1", "Failed", result, exit_code=code, message="boom")])
    st = j["status"]
    assert plan.create == [] and st["failures"] == 1 and st["nextAttemptAfter"] == "2026-01-01T12:00:10Z"
    assert st["reason"] == "BackingOff" and "boom" in st["message"] and plan.requeue_after == 10
    j, plan = step(j, [pod("faq-train-1", "Failed", result, exit_code=code)], T0 + dt.timedelta(seconds=10))
    assert kinds(plan) == [("Pod", "faq-train-2")] and "nextAttemptAfter" not in j["status"]
    later = T0 + dt.timedelta(seconds=20)
    j, plan = step(j, [pod("faq-train-1", "Failed", result, exit_code=code),
                       pod("faq-train-2", "Failed", result, exit_code=code)], later)  # fmt: skip
    assert j["status"]["nextAttemptAfter"] == "2026-01-01T12:00:40Z"  # 20 s: doubled


def test_backoff_limit_exhausted_fails_with_the_reason() -> None:
    j = started(job({"backoffLimit": 0}))
    j, plan = step(j, [pod("faq-train-1", "Failed", "failed", exit_code=1, message="CUDA error")])
    st = j["status"]
    assert st["phase"] == "Failed" and st["reason"] == "BackoffLimitExceeded"
    assert "CUDA error" in st["message"] and "backoffLimit 0" in st["message"]
    assert get_condition(st, "Failed")["status"] == "True" and st["completionTime"]
    assert plan.create == [] and "BackoffLimitExceeded" in reasons(plan)


def test_invalid_exit_fails_at_once() -> None:
    j = started(job({"backoffLimit": 5}))
    j, plan = step(
        j, [pod("faq-train-1", "Failed", "invalid", exit_code=2, message="column 'answer' missing")]
    )
    assert j["status"]["phase"] == "Failed" and j["status"]["reason"] == "InvalidConfigOrData"
    assert "column 'answer' missing" in j["status"]["message"] and plan.create == []


def test_completed_training_starts_export_and_export_failure_retries_export_only() -> None:
    j = started(job())
    done = pod(
        "faq-train-1",
        "Succeeded",
        "completed",
        exit_code=0,
        summary={"step": 120, "checkpoint": "checkpoint-120"},
    )
    j, plan = step(j, [done])
    assert kinds(plan) == [("Pod", "faq-export-1")] and j["status"]["phase"] == "Exporting"
    assert reasons(plan) == ["AttemptCompleted", "ExportStarted"]  # no second "Exporting" event
    assert plan.create[0]["spec"]["containers"][0]["command"][:2] == ["finetune-worker", "export"]
    assert j["status"]["progress"]["percent"] == 100.0
    j, _ = step(j, [done, pod("faq-export-1", stage="verified")])
    assert (
        j["status"]["phase"] == "Exporting"
        and j["status"]["message"] == "export pod faq-export-1 stage verified"
    )
    j, plan = step(j, [done, pod("faq-export-1", "Failed", "failed", exit_code=1)])
    assert j["status"]["exportFailures"] == 1 and j["status"]["failures"] == 0
    j, plan = step(
        j, [done, pod("faq-export-1", "Failed", "failed", exit_code=1)], T0 + dt.timedelta(seconds=11)
    )
    assert kinds(plan) == [("Pod", "faq-export-2")]


def test_completed_export_succeeds_with_its_result() -> None:
    j = started(job({"ttlSecondsAfterFinished": 60}))
    done = pod("faq-train-1", "Succeeded", "completed", exit_code=0)
    j, _ = step(j, [done])
    summary = {"result": "completed", "export": "/workspace/export", "formats": ["sentence-transformers"],
               "maxDeviation": 2e-7, "metrics": {"ndcg@10": 0.5}}  # fmt: skip
    j, plan = step(j, [done, pod("faq-export-1", "Succeeded", "completed", exit_code=0, summary=summary)])
    st = j["status"]
    assert st["phase"] == "Succeeded" and st["export"]["path"] == "/workspace/export"
    assert st["export"]["maxDeviation"] == 2e-7 and get_condition(st, "Succeeded")["status"] == "True"
    assert get_condition(st, "Training")["status"] == "False" and plan.requeue_after == 60
    assert "Succeeded" in reasons(plan) and not plan.delete_job
    _, plan = step(j, [], T0 + dt.timedelta(seconds=61))
    assert plan.delete_job and plan.create == []


def test_suspend_stops_the_pod_gracefully_then_resume_continues_from_the_checkpoint() -> None:
    j = started(job())
    j, _ = step(j, [pod("faq-train-1", checkpoint={"name": "checkpoint-20", "step": 20})])
    j["spec"]["suspend"] = True
    j, plan = step(j, [pod("faq-train-1")])
    assert [(d.name, d.grace_seconds) for d in plan.delete] == [("faq-train-1", 120)]
    assert j["status"]["phase"] == "Suspended" and j["status"]["reason"] == "Suspending"
    stopped = pod(
        "faq-train-1",
        "Failed",
        "preempted",
        exit_code=75,
        summary={"checkpoint": "checkpoint-25", "step": 25},
    )
    j, plan = step(j, [stopped])
    st = j["status"]
    assert st["reason"] == "Suspended" and get_condition(st, "Suspended")["status"] == "True"
    assert st["preemptions"] == 0 and plan.create == [] and "checkpoint-25" in st["message"]
    assert "Suspended" in reasons(plan)  # the stop is done: an Event says so, not only the Suspending one
    j, plan = step(j, [stopped])
    assert "Suspended" not in reasons(plan)  # once
    j["spec"]["suspend"] = False
    j, plan = step(j, [stopped])
    assert (
        kinds(plan) == [("Pod", "faq-train-2")]
        and j["status"]["attempts"][-1]["resumedFrom"] == "checkpoint-25"
    )
    assert get_condition(j["status"], "Suspended")["status"] == "False"


def test_a_pod_stuck_waiting_says_why() -> None:
    j = started(job())
    j, _ = step(j, [pod("faq-train-1", "Pending", waiting_reason="ImagePullBackOff")])
    assert j["status"]["phase"] == "Pending" and "ImagePullBackOff" in j["status"]["message"]


def test_no_new_pod_while_the_old_one_terminates() -> None:
    j = started(job())
    j, plan = step(j, [pod("faq-train-1", deleting=True)])
    assert plan.create == [] and "terminate" in j["status"]["message"]


def test_invalid_spec_fails_permanently_naming_the_field_and_recovers_when_fixed() -> None:
    j, plan = step(job({"training": {"learningRate": -1}}), [], claim=False)
    st = j["status"]
    assert st["phase"] == "Failed" and st["reason"] == "InvalidSpec"
    assert "spec.training.learningRate" in st["message"] and plan.permanent_error and plan.create == []
    assert get_condition(st, "Failed")["status"] == "True"
    _, again = step(j, [], claim=False)
    assert again.status is None and again.events == []  # no churn on an invalid object
    j["spec"]["training"] = {}
    j["metadata"]["generation"] = 2
    j, plan = step(j, [], claim=False)
    assert kinds(plan)[-1] == ("Pod", "faq-train-1") and j["status"]["phase"] == "Pending"
    assert "completionTime" not in j["status"]


def test_config_too_large_for_an_env_var_is_refused_with_advice() -> None:
    big = [{"question": "q" * 200, "answer": f"a{i}"} for i in range(CONFIG_ENV_MAX_BYTES // 200 + 10)]
    j, plan = step(job({"dataset": {"inline": big}}), [], claim=False)
    assert j["status"]["reason"] == "ConfigTooLarge" and "dataset.path" in j["status"]["message"]
    assert plan.create == [] and plan.permanent_error


def test_operator_restart_adopts_existing_pods_without_duplicates() -> None:
    # status lost everything (or was never written): the running pod is adopted, none created
    j, plan = step(job(), [pod("faq-train-1", "Failed", "preempted", exit_code=75), pod("faq-train-2")])
    assert plan.create == [] and [a["pod"] for a in j["status"]["attempts"]] == ["faq-train-1", "faq-train-2"]
    assert j["status"]["phase"] == "Training"
    # and the next attempt number continues after the highest existing one
    j, plan = step(j, [pod("faq-train-1", "Failed", "preempted", exit_code=75),
                       pod("faq-train-2", "Failed", "preempted", exit_code=75)])  # fmt: skip
    assert plan.create == [] and j["status"]["preemptions"] == 2  # second interruption in a row: back off
    j, plan = step(j, [pod("faq-train-1", "Failed", "preempted", exit_code=75),
                       pod("faq-train-2", "Failed", "preempted", exit_code=75)], T0 + dt.timedelta(seconds=30))  # fmt: skip
    assert kinds(plan) == [("Pod", "faq-train-3")] and j["status"]["preemptions"] == 2


def test_finished_job_deletes_stray_pods_and_does_nothing_else() -> None:
    j = job(status={"phase": "Succeeded", "completionTime": "2026-01-01T11:00:00Z", "attempts": []})
    _, plan = step(j, [pod("faq-train-9")])
    assert (
        [d.name for d in plan.delete] == ["faq-train-9"] and plan.create == [] and plan.requeue_after is None
    )
