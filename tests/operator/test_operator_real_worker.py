"""The whole lifecycle with REAL training and export: kopf operator, emulated API, test kubelet
running `finetune-worker` as local processes on a tiny BERT built offline.

Pending -> Training -> (training pod SIGKILLed after a checkpoint) -> Training again, resumed from
that checkpoint -> Exporting -> Succeeded, and the exported model loads with SentenceTransformer.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from harness import finetune_job

from tinymodel import pairs

pytestmark = [pytest.mark.operator, pytest.mark.worker, pytest.mark.slow]
pytest.importorskip("finetune_worker.train", reason="the training worker is not in this checkout yet")

FAST_ENV = {"FINETUNE_RESYNC_SECONDS": "0.5", "FINETUNE_BACKOFF_SECONDS": "1", "FINETUNE_GRACE_SECONDS": "60"}


def test_real_training_survives_a_kill_and_exports_a_loadable_model(
    kube: Any, kubelet: Any, run_operator: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in FAST_ENV.items():
        monkeypatch.setenv(k, v)
    spec = {
        "model": {"base": str(tiny_model)},
        "dataset": {"inline": pairs(64, seed=1), "columns": {"anchor": "question", "positive": "answer"}},
        "training": {"maxSteps": 24, "batchSize": 8, "learningRate": 1e-3, "warmupRatio": 0.0,
                     "checkpoint": {"everySteps": 4, "keep": 2}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "export": {"formats": ["sentence-transformers"], "verify": {"tolerance": 1e-4}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        "backoffLimit": 2,
    }  # fmt: skip
    phases: list[str] = []

    def status() -> dict[str, Any]:
        st = ((kube.job("real") or {}).get("status")) or {}
        if st.get("phase") and (not phases or phases[-1] != st["phase"]):
            phases.append(st["phase"])
        return st

    with run_operator():
        kube.create(finetune_job("real", spec))
        kube.wait_for(lambda: (status().get("checkpoint") or {}).get("step"), 240, interval=0.1,
                      what="a first checkpoint")  # fmt: skip
        killed_at = status()["checkpoint"]["name"]
        kubelet.kill("real-train-1", signal.SIGKILL)
        kube.wait_for(lambda: status().get("phase") in ("Succeeded", "Failed"), 420, interval=0.1,
                      what=f"the end (phase {status().get('phase')}: {status().get('message')})")  # fmt: skip
    st = status()
    assert st["phase"] == "Succeeded", st.get("message")
    assert phases[0] == "Pending" and "Training" in phases and "Exporting" in phases, phases
    first, second = [a for a in st["attempts"] if a["role"] == "train"][:2]
    assert first["result"] == "failed" and first["exitCode"] == 137
    assert second["resumedFrom"] is not None and second["result"] == "completed"
    step_of = int(second["resumedFrom"].rsplit("-", 1)[1])
    assert step_of >= int(killed_at.rsplit("-", 1)[1]), (second, killed_at)
    assert st["restarts"] == 1 and st["progress"]["percent"] == 100.0
    from sentence_transformers import SentenceTransformer

    ws = kubelet.workspace("real-workspace")
    model = SentenceTransformer(str(ws / "export" / "sentence-transformers"), device="cpu")
    emb = model.encode(["how do I reset my password?"])
    assert emb.shape[0] == 1 and emb.shape[1] > 0
