"""`finetune-operator run` as a process: liveness probe, Prometheus metrics, a job reconciled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, finetune_job

from remotekit import fetch, free_port

pytestmark = pytest.mark.operator


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", kubelet=False).start()
    try:
        yield c
    finally:
        c.stop()


def test_run_serves_liveness_and_metrics_and_reconciles(cluster: Cluster) -> None:
    live, prom = free_port(), free_port()
    exe = Path(sys.executable).with_name("finetune-operator")
    env = {**os.environ, "FINETUNE_KUBE_SERVER": cluster.url}
    proc = subprocess.Popen([str(exe), "run", "--namespace", "default", "--liveness-port", str(live),
                             "--metrics-port", str(prom)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        cluster.wait_for(
            lambda: fetch(f"http://127.0.0.1:{live}/healthz")[0] == 200, 60, what="liveness probe"
        )
        cluster.create(finetune_job("cli-job", {"dataset": {"inline": [{"question": "q", "answer": "a"}]}}))
        cluster.wait_for(lambda: cluster.pod("cli-job-train-1"), 30, what="training pod")
        text = cluster.wait_for(lambda: (t := fetch(f"http://127.0.0.1:{prom}/metrics")[1])
                                and 'finetune_jobs{phase="Pending"} 1.0' in t and t, 30, what="metrics")  # fmt: skip
        assert "finetune_reconcile_seconds_count" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-3000:]
