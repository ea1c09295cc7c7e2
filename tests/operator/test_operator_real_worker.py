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

from finetune_api.contract import API_VERSION, PLURAL
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
        "training": {"maxSteps": 120, "batchSize": 8, "learningRate": 1e-3, "warmupRatio": 0.0,
                     "checkpoint": {"everySteps": 4, "keep": 2}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "export": {"formats": ["sentence-transformers"], "verify": {"tolerance": 1e-4}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        "backoffLimit": 2,
    }  # fmt: skip

    def status() -> dict[str, Any]:
        return ((kube.job("real") or {}).get("status")) or {}

    with run_operator():
        kube.create(finetune_job("real", spec))
        ckpts = kubelet.workspace("real-workspace") / "checkpoints"
        kube.wait_for(lambda: ckpts.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir()),
                      240, interval=0.05, what="a first checkpoint")  # fmt: skip
        kubelet.kill("real-train-1", signal.SIGKILL)
        kube.wait_for(lambda: status().get("phase") in ("Succeeded", "Failed"), 420, interval=0.1,
                      what=f"the end (phase {status().get('phase')}: {status().get('message')})")  # fmt: skip
    st = status()
    assert st["phase"] == "Succeeded", st.get("message")
    history = [
        ((v.get("status") or {}).get("phase")) for v in kube.history(API_VERSION, PLURAL, "default", "real")
    ]
    seen = [ph for i, ph in enumerate(history) if ph and (i == 0 or ph != history[i - 1])]
    # killed -> back to Pending (backoff, then the new pod starting) -> Training again, resumed
    assert seen == ["Pending", "Training", "Pending", "Training", "Exporting", "Succeeded"], seen
    first, second = [a for a in st["attempts"] if a["role"] == "train"][:2]
    assert first["result"] == "failed" and first["exitCode"] == 137
    assert second["resumedFrom"] is not None and second["result"] == "completed"
    assert second["resumedFrom"].startswith("checkpoint-"), st["attempts"]
    assert int(second["resumedFrom"].rsplit("-", 1)[1]) >= 4
    assert st["restarts"] == 1 and st["progress"]["percent"] == 100.0
    from sentence_transformers import SentenceTransformer

    ws = kubelet.workspace("real-workspace")
    model = SentenceTransformer(str(ws / "export" / "sentence-transformers"), device="cpu")
    emb = model.encode(["how do I reset my password?"])
    assert emb.shape[0] == 1 and emb.shape[1] > 0
