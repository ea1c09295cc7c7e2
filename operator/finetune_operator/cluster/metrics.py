"""Prometheus metrics of the operator: jobs by phase, attempts by result, reconcile latency.

Served on :9090/metrics by `finetune-operator run` (--metrics-port). A standby replica (kopf
peering) sees no jobs: it serves no finetune_jobs samples at all, rather than zeros that a scrape
through the Service would mix with the active replica's figures. Names:
  finetune_jobs{phase}                      gauge: FineTuneJobs by phase, from the active replica only
  finetune_operator_active                  gauge: 1 on the replica that runs the jobs, 0 on a standby
  finetune_attempts_total{role,result}      counter: worker pods that ended, by result
  finetune_reconcile_seconds                histogram: one reconcile pass (API reads + decision + writes)
  finetune_reconcile_errors_total           counter: passes that raised
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from finetune_operator.decisions.status import PHASES

REGISTRY = CollectorRegistry(auto_describe=True)
ATTEMPTS = Counter("finetune_attempts", "Worker pods that ended, by role and result", ["role", "result"],
                   registry=REGISTRY)  # fmt: skip
RECONCILE_SECONDS = Histogram(
    "finetune_reconcile_seconds", "Duration of one reconcile pass", registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip
RECONCILE_ERRORS = Counter("finetune_reconcile_errors", "Reconcile passes that raised", registry=REGISTRY)

_phases: dict[tuple[str, str], str] = {}
_active = [True]  # standalone: always; peered: while kopf has not paused this replica
_lock = threading.Lock()


class _Jobs(Collector):
    """finetune_jobs{phase} (every phase, zeros included) and finetune_operator_active, read at
    scrape time; a standby serves the family with no samples."""

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("finetune_jobs", "FineTuneJobs by phase (the active replica only)", labels=["phase"])
        with _lock:
            active = _active[0]
            counts = dict.fromkeys(PHASES, 0)
            for phase in _phases.values():
                counts[phase] = counts.get(phase, 0) + 1
        if active:
            for phase, n in counts.items():
                jobs.add_metric([phase], n)
        yield jobs
        yield GaugeMetricFamily("finetune_operator_active", "1 on the replica that runs the jobs, 0 on a standby",
                                value=1 if active else 0)  # fmt: skip


REGISTRY.register(_Jobs())


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's current phase (None: the job is gone)."""
    with _lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = phase


def set_active(active: bool) -> None:
    """This replica runs the jobs (True) or stands by (False): a standby forgets the phases it
    knew, since it hears of no change while paused; its next active spell re-lists them."""
    with _lock:
        _active[0] = active
        if not active:
            _phases.clear()


def observe_attempts(role_results: list[tuple[str, str]]) -> None:
    for role, result in role_results:
        ATTEMPTS.labels(role=role, result=result).inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a background thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)
