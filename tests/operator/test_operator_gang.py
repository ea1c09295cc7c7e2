"""A 2-node FineTuneJob with the REAL worker through the kopf operator, the emulated API and the test
kubelet: the gang and its rendezvous Service are created with Kueue's pod-group metadata; one member
is evicted, the whole gang stops at one checkpoint, is relaunched as one and resumes; an operator
restart mid-gang adopts it; the job Succeeds without touching backoffLimit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import finetune_job

from finetune_operator.decisions.gang import POD_GROUP_COUNT, POD_GROUP_LABEL
from tinymodel import pairs

pytestmark = [pytest.mark.operator, pytest.mark.worker, pytest.mark.slow]
pytest.importorskip("finetune_worker.train", reason="the training worker is not in this checkout yet")

FAST_ENV = {"FINETUNE_RESYNC_SECONDS": "0.5", "FINETUNE_BACKOFF_SECONDS": "1", "FINETUNE_GRACE_SECONDS": "60"}


def test_two_node_gang_survives_the_eviction_of_one_member(
    kube: Any, kubelet: Any, run_operator: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in FAST_ENV.items():
        monkeypatch.setenv(k, v)
    spec = {
        "model": {"base": str(tiny_model)},
        "dataset": {"inline": pairs(64, seed=1), "columns": {"anchor": "question", "positive": "answer"}},
        "training": {"maxSteps": 60, "batchSize": 8, "learningRate": 1e-3, "checkpoint": {"everySteps": 4, "keep": 2}},
        "export": {"formats": ["sentence-transformers"], "verify": {"tolerance": 1e-4}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        "distributed": {"nodes": 2},
        "queueName": "team-gpus",
        "backoffLimit": 0,  # an eviction that consumed it would fail the job
    }  # fmt: skip

    def status() -> dict[str, Any]:
        return ((kube.job("gang") or {}).get("status")) or {}

    with run_operator() as op:
        kube.create(finetune_job("gang", spec))
        kube.wait_for(lambda: kube.pod("gang-train-1-1") is not None, 60, what="the gang")
        svc = kube.get("v1", "services", "default", "gang-rdzv")
        assert svc and svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        for rank in (0, 1):
            meta = kube.pod(f"gang-train-1-{rank}")["metadata"]
            assert meta["labels"][POD_GROUP_LABEL] == "gang-train-1" and meta["annotations"][POD_GROUP_COUNT] == "2"
            assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
        ckpts = kubelet.workspace("gang-workspace") / "checkpoints"
        kube.wait_for(lambda: ckpts.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir()),
                      240, interval=0.05, what="a first checkpoint")  # fmt: skip
        kubelet.evict("gang-train-1-1", grace_seconds=60)
        kube.wait_for(lambda: kube.pod("gang-train-2-1") is not None, 120, interval=0.1,
                      what=f"the relaunched gang ({status().get('message')})")  # fmt: skip
        op.restart()  # the new gang is adopted, not duplicated
        kube.wait_for(lambda: status().get("phase") in ("Succeeded", "Failed"), 420, interval=0.1,
                      what=f"the end (phase {status().get('phase')}: {status().get('message')})")  # fmt: skip
    st = status()
    assert st["phase"] == "Succeeded", st.get("message")
    train = [a for a in st["attempts"] if a["role"] == "train"]
    assert [a["pod"] for a in train] == ["gang-train-1", "gang-train-2"], train
    first, second = train
    assert first["result"] in ("evicted", "preempted") and first["pods"] == ["gang-train-1-0", "gang-train-1-1"]
    assert first["endedFirst"]["pod"] in first["pods"]
    assert second["resumedFrom"] and second["resumedFrom"].startswith("checkpoint-") and second["result"] == "completed"
    assert st["failures"] == 0 and st["preemptions"] == 1 and st["worldSize"] == 2
    assert not [p for p in kube.pods() if p["metadata"]["name"].startswith("gang-train-3")]
