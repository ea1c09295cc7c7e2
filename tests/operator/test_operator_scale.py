"""100 FineTuneJobs at once against the emulated API: every one reconciled, no duplicates.

No kubelet here (100 worker processes would measure the machine, not the operator): the test
plays the kubelet itself by writing pod statuses, so what is measured and asserted is the
control plane: pods and claims created once each, statuses written, endings classified.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, finetune_job, run_operator

from finetune_api import contract

pytestmark = [pytest.mark.operator, pytest.mark.slow]
N = 100
SPEC = {"dataset": {"inline": [{"question": "q", "answer": "a"}]}, "resources": {"gpus": 1}}


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("FINETUNE_RESYNC_SECONDS", "2")
    c = Cluster(tmp_path / "cluster", kubelet=False).start()
    try:
        yield c
    finally:
        c.stop()


def jobs(cluster: Cluster) -> list[dict]:
    return cluster.list(contract.API_VERSION, contract.PLURAL, "default")


def test_100_jobs_at_once_all_reconciled(cluster: Cluster) -> None:
    with run_operator(cluster):
        for i in range(N):
            cluster.create(finetune_job(f"job-{i:03d}", SPEC))
        cluster.wait_for(lambda: len(cluster.pods()) >= N and all((j.get("status") or {}).get("attempts") for j in jobs(cluster)),
                         120, what="100 training pods and statuses")  # fmt: skip
        pods = cluster.pods()
        assert sorted(p["metadata"]["name"] for p in pods) == [f"job-{i:03d}-train-1" for i in range(N)]
        assert len(cluster.list("v1", "persistentvolumeclaims", "default")) == N
        assert all(j["status"]["phase"] == "Pending" and j["status"]["attempts"][0]["pod"].endswith("-train-1")
                   for j in jobs(cluster))  # fmt: skip
        # the "kubelet": every training pod completes
        summary = json.dumps({"result": "completed", "step": 10, "checkpoint": "checkpoint-10"})
        for p in pods:
            cluster.patch("v1", "pods", "default", p["metadata"]["name"], {"status": {
                "phase": "Succeeded", "containerStatuses": [{"name": "worker", "state": {"terminated": {
                    "exitCode": 0, "reason": "Completed", "message": summary}}}]}}, subresource="status")  # fmt: skip
        cluster.wait_for(lambda: all((j.get("status") or {}).get("phase") == "Exporting" for j in jobs(cluster)),
                         120, what="all 100 exporting")  # fmt: skip
        names = sorted(p["metadata"]["name"] for p in cluster.pods())
        assert names.count("job-000-export-1") == 1 and len(names) == 2 * N
        assert all(j["status"]["checkpoint"]["name"] == "checkpoint-10" for j in jobs(cluster))
