"""Operator metrics as Prometheus would scrape them."""

from __future__ import annotations

from prometheus_client import generate_latest

from finetune_operator import metrics


def test_jobs_by_phase_follow_each_job_and_attempts_count_by_result() -> None:
    metrics.observe_phase("ns", "a", "Training")
    metrics.observe_phase("ns", "b", "Training")
    metrics.observe_phase("ns", "a", "Succeeded")
    metrics.observe_attempts([("train", "preempted"), ("train", "preempted"), ("export", "completed")])
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'finetune_jobs{phase="Training"} 1.0' in text and 'finetune_jobs{phase="Succeeded"} 1.0' in text
    assert 'finetune_attempts_total{result="preempted",role="train"} 2.0' in text
    metrics.observe_phase("ns", "a", None)
    metrics.observe_phase("ns", "b", None)
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'finetune_jobs{phase="Training"} 0.0' in text and 'finetune_jobs{phase="Succeeded"} 0.0' in text
    assert "finetune_reconcile_seconds_bucket" in text
