"""Prometheus metrics of the operator: jobs by phase, attempts by result, reconcile latency.

Served on :9090/metrics by `finetune-operator run` (--metrics-port). Names:
  finetune_jobs{phase}                      gauge: FineTuneJobs this operator saw, by phase
  finetune_attempts_total{role,result}      counter: worker pods that ended, by result
  finetune_reconcile_seconds                histogram: one reconcile pass (API reads + decision + writes)
  finetune_reconcile_errors_total           counter: passes that raised
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .status import PHASES

REGISTRY = CollectorRegistry(auto_describe=True)
JOBS = Gauge("finetune_jobs", "FineTuneJobs by phase", ["phase"], registry=REGISTRY)
ATTEMPTS = Counter("finetune_attempts", "Worker pods that ended, by role and result", ["role", "result"],
                   registry=REGISTRY)  # fmt: skip
RECONCILE_SECONDS = Histogram(
    "finetune_reconcile_seconds", "Duration of one reconcile pass", registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip
RECONCILE_ERRORS = Counter("finetune_reconcile_errors", "Reconcile passes that raised", registry=REGISTRY)

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
for _phase in PHASES:
    JOBS.labels(phase=_phase).set(0)


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's current phase (None: the job is gone)."""
    with _lock:
        key = (namespace, name)
        if phase is None:
            _phases.pop(key, None)
        else:
            _phases[key] = phase
        counts = dict.fromkeys(PHASES, 0)
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            JOBS.labels(phase=p).set(n)


def observe_attempts(role_results: list[tuple[str, str]]) -> None:
    for role, result in role_results:
        ATTEMPTS.labels(role=role, result=result).inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a background thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)
