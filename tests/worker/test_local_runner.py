"""`finetune-operator local FILE` end to end with the real worker on a tiny BERT: Succeeded, and
the exported model loads with SentenceTransformer (the README's first command, minus the sample)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinymodel import pairs

pytestmark = [pytest.mark.worker, pytest.mark.slow]
pytest.importorskip("finetune_worker.train", reason="the training worker is not in this checkout yet")


def test_local_runs_a_lora_job_to_a_loadable_export(tiny_model: Path, tmp_path: Path) -> None:
    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "local-demo"},
        "spec": {
            "model": {"base": str(tiny_model)},
            "dataset": {"inline": pairs(48, seed=2), "columns": {"anchor": "question", "positive": "answer"}},
            "training": {"maxSteps": 8, "batchSize": 8, "learningRate": 1e-3, "warmupRatio": 0.0,
                         "checkpoint": {"everySteps": 4}},
            "lora": {"r": 4, "alpha": 8},
            "export": {"formats": ["sentence-transformers"], "verify": {"tolerance": 1e-4}},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        },
    }  # fmt: skip
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job))
    exe = Path(sys.executable).with_name("finetune-operator")
    proc = subprocess.run([str(exe), "local", str(f), "--workdir", str(tmp_path / "w"), "--timeout", "400"],
                          capture_output=True, text=True, timeout=450)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("local-demo ")]
    assert {"Pending", "Training", "Exporting", "Succeeded"} <= {r[1] for r in rows}, proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "exported model:" in ln)
    export = Path(line.split("exported model:", 1)[1].strip())
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(export / "sentence-transformers"), device="cpu")
    assert model.encode(["hello"]).shape[0] == 1
