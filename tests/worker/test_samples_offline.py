"""Every sample in manifests/samples/ (except those named *_hub.yaml, which say they need the hub) runs
to Succeeded with `finetune-operator local` on this machine with HF_HUB_OFFLINE=1: the data they
read ships in manifests/samples/data/ and their base model is the bundled MiniLM.

To keep it lean the samples run with maxSteps capped at 2 (checkpoint every step); every other field
is as shipped, all jobs in one local world (the continuation needs the LoRA sample's export).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.worker, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "manifests" / "samples"


def offline_samples() -> list[Path]:
    return sorted(p for p in SAMPLES.glob("finetune_v1alpha1_finetunejob_*.yaml") if not p.stem.endswith("_hub"))


def test_hub_samples_say_they_need_the_hub() -> None:
    for p in SAMPLES.glob("*_hub.yaml"):
        assert "NEEDS HUB ACCESS" in p.read_text(), p
        assert yaml.safe_load(p.read_text())["spec"]["dataset"].get("hub") or "/" in \
            yaml.safe_load(p.read_text())["spec"]["model"].get("base", "")


def test_every_offline_sample_runs_to_succeeded(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples)
    files = []
    for p in offline_samples():
        doc = yaml.safe_load(p.read_text())
        training = doc["spec"].setdefault("training", {})
        training["maxSteps"] = min(2, training.get("maxSteps") or 2)
        training.setdefault("checkpoint", {})["everySteps"] = 1
        (samples / p.name).write_text(yaml.safe_dump(doc))
        files.append(str(samples / p.name))
    assert len(files) >= 5
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home")}  # no hub, no cache
    workdir = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "finetune_operator.cli", "local", *files, "--workdir", str(workdir),
                        "--timeout", "500"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=560)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for f in files:
        name = yaml.safe_load(Path(f).read_text())["metadata"]["name"]
        status = json.loads((workdir / "status" / f"{name}.json").read_text())
        assert status["phase"] == "Succeeded", (name, status.get("message"))
        assert f"{name} succeeded; exported model:" in r.stdout
        export = Path(status["export"]["path"]) if Path(status["export"]["path"]).is_absolute() else None
        assert export is None or (export / "metadata.json").is_file()
    assert "copied data/support-pairs.jsonl" in r.stdout  # the shipped data went into the workspace
    full = workdir / "pvcs" / "support-data" / "export" / "sentence-transformers"  # the full fine-tune's card
    card = (full / "README.md").read_text()
    assert "![training loss and evaluation metrics over steps](training_curve.png)" in card
    assert (full / "training_curve.png").is_file()
    assert "## From sentence-transformers' model card" in card and "### Training Hyperparameters" in card
    assert "## Verification" in card and "ndcg@10 (export evaluation)" in card
