"""Classifying how worker pods end, and reading their summaries and progress lines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator.decisions.observe import classify, observe_pod, parse_log_tail, parse_summary


def terminated(code: int, reason: str = "Error", phase: str = "Failed", **pod_status: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        **pod_status,
        "containerStatuses": [
            {"name": "worker", "state": {"terminated": {"exitCode": code, "reason": reason}}}
        ],
    }


@pytest.mark.parametrize(
    "status,result",
    [
        ({"phase": "Pending"}, None),
        ({"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}, None),
        (terminated(0, "Completed", "Succeeded"), "completed"),
        (terminated(75), "preempted"),
        (terminated(2), "invalid"),
        (terminated(137, "OOMKilled"), "oomkilled"),
        (terminated(137, "Error"), "failed"),
        (terminated(1), "failed"),
        (terminated(143, reason="Error", reason_unused=None) | {"reason": "Evicted"}, "evicted"),
        ({"phase": "Failed", "reason": "Evicted", "message": "low on ephemeral storage"}, "evicted"),
        (terminated(137) | {"conditions": [{"type": "DisruptionTarget", "status": "True"}]}, "evicted"),
        ({"phase": "Unknown", "reason": "NodeLost"}, "evicted"),
        (terminated(75) | {"reason": "Evicted"}, "preempted"),  # checkpointed in its grace period
    ],
)
def test_every_ending_is_classified(status: dict[str, Any], result: str | None) -> None:
    status.pop("reason_unused", None)
    assert classify(status)[0] == result


def test_summary_and_fallback_log_message() -> None:
    assert parse_summary('{"result": "preempted", "step": 3}') == {"result": "preempted", "step": 3}
    assert parse_summary("Traceback (most recent call last):\n ...") == {}
    pod = {"metadata": {"name": "j-train-2", "labels": {"finetune.dev/role": "train", "finetune.dev/attempt": "2"}},
           "status": terminated(1) | {"containerStatuses": [{"state": {"terminated": {
               "exitCode": 1, "reason": "Error", "message": "Traceback\n  File x\nRuntimeError: disk full\n",
               "finishedAt": "2026-01-01T00:00:00Z"}}}]}}  # fmt: skip
    obs = observe_pod(pod)
    assert (obs.role, obs.attempt, obs.result, obs.exit_code) == ("train", 2, "failed", 1)
    assert obs.message == "RuntimeError: disk full" and obs.finished_at == "2026-01-01T00:00:00Z"


def test_progress_and_checkpoint_come_from_the_last_json_lines() -> None:
    lines = [
        json.dumps({"event": "progress", "step": 1, "totalSteps": 10, "loss": 2.0}),
        json.dumps({"event": "checkpoint", "name": "checkpoint-5", "step": 5}),
        "some warning from a library",
        json.dumps({"event": "progress", "step": 7, "totalSteps": 10, "loss": 1.0, "epoch": 0.7, "time": 1}),
        '{"event": "progress", "step": 8, "tot',  # a line cut by the tail
    ]
    progress, checkpoint = parse_log_tail("\n".join(lines))
    assert progress == {"step": 7, "totalSteps": 10, "loss": 1.0, "epoch": 0.7}
    assert checkpoint == {"name": "checkpoint-5", "step": 5}
    assert parse_log_tail("") == (None, None)


def test_deleting_and_waiting_pods() -> None:
    pod = {
        "metadata": {
            "name": "j-train-1",
            "deletionTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"finetune.dev/role": "train", "finetune.dev/attempt": "1"},
        },
        "status": {
            "phase": "Pending",
            "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff"}}}],
        },
    }
    obs = observe_pod(pod)
    assert obs.deleting and not obs.ended and obs.waiting_reason == "ImagePullBackOff"


def test_a_pod_that_fails_while_being_deleted_was_interrupted_not_failed() -> None:
    """kubectl delete pod (or a drain without the Eviction API): the export has no graceful stop and
    exits 143, a pod past its grace period 137. README: a deleted pod is evicted, not a failure."""
    def ended(code: int, deleting: bool, reason: str = "Error") -> dict[str, Any]:
        meta: dict[str, Any] = {"name": "j-export-1", "labels": {"finetune.dev/role": "export", "finetune.dev/attempt": "1"}}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        term = {"exitCode": code, "reason": reason}
        return {"metadata": meta, "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": term}}]}}

    assert (observe_pod(ended(143, True)).result, observe_pod(ended(143, True)).reason) == ("evicted", "Deleted")
    assert observe_pod(ended(137, True)).result == "evicted"
    assert observe_pod(ended(143, False)).result == "failed"  # a SIGTERM from elsewhere is still a failure
    assert observe_pod(ended(2, True)).result == "invalid"  # what the worker said stands
    assert observe_pod(ended(137, True, "OOMKilled")).result == "oomkilled"
    assert observe_pod(ended(75, True)).result == "preempted"


def test_export_stage_is_read_from_the_export_pods_log() -> None:
    tail = "\n".join([json.dumps({"event": "export", "stage": "merged"}), json.dumps({"event": "export", "stage": "verified",
                      "maxDeviation": 1e-7}), "INFO something"])  # fmt: skip
    pod = {"metadata": {"name": "j-export-1", "labels": {"finetune.dev/role": "export", "finetune.dev/attempt": "1"}},
           "status": {"phase": "Running"}}  # fmt: skip
    assert observe_pod(pod, tail).stage == "verified"
