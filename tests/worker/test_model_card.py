"""The export's model card carries a picture of the run: the training loss (and, with an eval split,
the eval metrics scored at every checkpoint) over steps, drawn from the trainer's log history as a
PNG next to the card, plus the verification and evaluation results. Real training and export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import _env, pair_spec, train, write_config

pytestmark = [pytest.mark.worker, pytest.mark.slow]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_card_shows_the_loss_curve_eval_metrics_verification_and_gate(tiny_model: Path, tmp_path: Path) -> None:
    spec = pair_spec(tiny_model, steps=8, every=4, lora=True)
    spec["dataset"]["eval"] = {"fraction": 0.125}
    spec["training"]["checkpoint"]["everySteps"] = 2
    spec["export"] = {"formats": ["sentence-transformers", "adapter"], "verify": {"tolerance": 1e-4},
                      "evaluate": {"metric": "ndcg@10", "min": 0.0}}
    config, ws = write_config(tmp_path, spec), tmp_path / "ws"
    assert train(tmp_path, config, ws).rc == 0
    history = json.loads((ws / "final" / "training.json").read_text())["logHistory"]
    assert [e["step"] for e in history if "eval_loss" in e][:4] == [2, 4, 6, 8]  # scored at every checkpoint
    r = subprocess.run([sys.executable, "-m", "finetune_worker.cli", "export", "--config", str(config),
                        "--workspace", str(ws)], env=_env(tmp_path, None), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["trainingCurve"]["file"] == "training_curve.png" and "eval_loss" in meta["trainingCurve"]["evalMetrics"]
    assert meta["trainingCurve"]["lossPoints"] >= 2
    for fmt in ("sentence-transformers", "adapter"):
        card = (ws / "export" / fmt / "README.md").read_text()
        png = ws / "export" / fmt / "training_curve.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
        assert "![training loss and evaluation metrics over steps](training_curve.png)" in card
        assert "## Verification" in card and "max |Δ|" in card
        assert "ndcg@10 (export evaluation)" in card and "loss (eval split, end of training)" in card
    import shutil

    shutil.copyfile(ws / "export" / "adapter" / "training_curve.png", Path("/tmp") / "ft-card-curve.png")
