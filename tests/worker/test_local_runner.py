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


def test_local_continues_a_job_from_another_jobs_export(tiny_model: Path, tmp_path: Path) -> None:
    """`local prev.yaml next.yaml`: next (fromJob: prev) waits for prev, then trains a LoRA adapter
    on prev's export (not on prev's base) and merges onto it: every weight the adapter leaves alone
    is prev's trained weight, which differs from the tiny base model's."""
    import json

    import torch
    from sentence_transformers import SentenceTransformer

    common = {"dataset": {"inline": pairs(16, seed=3), "columns": {"anchor": "question", "positive": "answer"}},
              "export": {"formats": ["sentence-transformers"], "verify": {"tolerance": 1e-4}},
              "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"}}  # fmt: skip
    prev = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "prev"},
            "spec": {**common, "model": {"base": str(tiny_model)},
                     "training": {"maxSteps": 2, "batchSize": 8, "learningRate": 5e-3, "warmupRatio": 0.0}}}
    nxt = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "next"},
           "spec": {**common, "model": {"fromJob": "prev"}, "lora": {"r": 4, "alpha": 8},
                    "training": {"maxSteps": 2, "batchSize": 8, "learningRate": 2e-3, "warmupRatio": 0.0}}}  # fmt: skip
    files = []
    for doc in (prev, nxt):
        files.append(tmp_path / f"{doc['metadata']['name']}.yaml")
        files[-1].write_text(yaml.safe_dump(doc))
    exe = Path(sys.executable).with_name("finetune-operator")
    proc = subprocess.run([str(exe), "local", *map(str, files), "--workdir", str(tmp_path / "w"), "--timeout", "400"],
                          capture_output=True, text=True, timeout=450)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "next: Normal WaitingForSourceJob: waiting for FineTuneJob prev" in proc.stdout
    pvcs = tmp_path / "w" / "pvcs"
    source_dir = pvcs / "prev-workspace" / "export" / "sentence-transformers"
    meta = json.loads((pvcs / "next-workspace" / "export" / "metadata.json").read_text())
    assert meta["baseModelSpec"] == "fromJob:prev" and Path(meta["baseModel"]).resolve() == source_dir.resolve()

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return SentenceTransformer(str(path), device="cpu")[0].auto_model.state_dict()

    base, source = weights(tiny_model), weights(source_dir)
    continued = weights(pvcs / "next-workspace" / "export" / "sentence-transformers")
    assert continued.keys() == source.keys()
    kept = [k for k in source if torch.equal(continued[k], source[k])]
    moved_by_prev = [k for k in kept if not torch.equal(source[k], base[k])]
    assert "embeddings.word_embeddings.weight" in moved_by_prev  # prev's training, carried over verbatim
    assert len(kept) < len(source)  # and next's adapter changed the rest


def test_local_runs_a_two_node_gang_of_two_processes_each(tiny_model: Path, tmp_path: Path) -> None:
    """`finetune-operator local` with spec.distributed {nodes: 2, procsPerNode: 2}: two local pods
    (a gang, rendezvous on 127.0.0.1) of two gloo ranks each train one job to Succeeded; every
    checkpoint holds the RNG state of all four ranks, and status records the world size and the gang."""
    import json

    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "gang-demo"},
        "spec": {
            "model": {"base": str(tiny_model)},
            "dataset": {"inline": pairs(64, seed=5), "columns": {"anchor": "question", "positive": "answer"}},
            "training": {"maxSteps": 4, "batchSize": 4, "learningRate": 1e-3, "warmupRatio": 0.0,
                         "checkpoint": {"everySteps": 2, "keep": 2}},
            "export": {"formats": ["sentence-transformers"], "verify": {"tolerance": 1e-4}},
            "distributed": {"nodes": 2, "procsPerNode": 2, "backend": "gloo"},
            "storage": {"accessModes": ["ReadWriteMany"]},
            "resources": {"gpus": 0, "cpu": "1", "memory": "8Gi"},
        },
    }  # fmt: skip
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job))
    exe = Path(sys.executable).with_name("finetune-operator")
    work = tmp_path / "w"
    proc = subprocess.run([str(exe), "local", str(f), "--workdir", str(work), "--timeout", "500"],
                          capture_output=True, text=True, timeout=560)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((work / "status.json").read_text())
    assert status["phase"] == "Succeeded", status
    assert status["worldSize"] == 4
    train = [a for a in status["attempts"] if a.get("role") == "train"]
    assert train and train[0]["pods"] == ["gang-demo-train-1-0", "gang-demo-train-1-1"], train
    checkpoints = sorted((work / "pvcs" / "gang-demo-workspace" / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for cp in checkpoints:
        assert sorted(p.name for p in cp.glob("rng_state_*.pth")) == [f"rng_state_{r}.pth" for r in range(4)], cp
