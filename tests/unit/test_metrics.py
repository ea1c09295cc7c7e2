"""Operator metrics as Prometheus would scrape them.

The registry is process-wide and other tests in the same session run handlers that record
phases and attempts, so each assertion is on the change this test makes, not on absolutes.
"""

from __future__ import annotations

from prometheus_client import generate_latest

from finetune_operator.cluster import metrics


def _jobs(phase: str) -> float:
    return metrics.REGISTRY.get_sample_value("finetune_jobs", {"phase": phase}) or 0.0


def _attempts(role: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value("finetune_attempts_total", {"role": role, "result": result}) or 0.0


def test_jobs_by_phase_follow_each_job_and_attempts_count_by_result() -> None:
    ns = "test-metrics-ns"
    training, succeeded = _jobs("Training"), _jobs("Succeeded")
    preempted = _attempts("train", "preempted")
    metrics.observe_phase(ns, "a", "Training")
    metrics.observe_phase(ns, "b", "Training")
    metrics.observe_phase(ns, "a", "Succeeded")
    metrics.observe_attempts([("train", "preempted"), ("train", "preempted"), ("export", "completed")])
    assert _jobs("Training") - training == 1 and _jobs("Succeeded") - succeeded == 1
    assert _attempts("train", "preempted") - preempted == 2
    metrics.observe_phase(ns, "a", None)
    metrics.observe_phase(ns, "b", None)
    assert _jobs("Training") == training and _jobs("Succeeded") == succeeded
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'finetune_jobs{phase="Training"}' in text and "finetune_reconcile_seconds_bucket" in text
    assert 'finetune_attempts_total{result="preempted",role="train"}' in text


def test_a_standby_serves_no_job_gauges_and_forgets_what_it_knew() -> None:
    """A standby replica (paused by kopf's peering) hears of no job: zeros from it, mixed by a
    scrape through the Service with the active replica's figures, would be false (issue 22)."""
    ns = "test-metrics-standby"
    metrics.observe_phase(ns, "a", "Training")
    try:
        metrics.set_active(False)
        text = generate_latest(metrics.REGISTRY).decode()
        assert "finetune_jobs{" not in text and "finetune_operator_active 0.0" in text
        metrics.set_active(True)
        assert "finetune_operator_active 1.0" in generate_latest(metrics.REGISTRY).decode()
        assert _jobs("Pending") >= 0 and metrics.REGISTRY.get_sample_value("finetune_jobs", {"phase": "Failed"}) is not None
        metrics.observe_phase(ns, "b", "Training")  # re-listed after the pause: only what is there now
        assert "a" not in {name for (n, name) in metrics._phases if n == ns}
    finally:
        metrics.set_active(True)
        metrics.observe_phase(ns, "b", None)
