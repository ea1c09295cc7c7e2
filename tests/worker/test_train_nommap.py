"""Training on a workspace whose filesystem cannot mmap (errno 19: `OSError: No such device`, seen on
some network filesystems): the base model loads and a killed run resumes from its checkpoint, by
reading safetensors files into memory. The failure is injected in the worker process
(tests/worker/nommap/sitecustomize.py) for every file under the workspace and the base model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.trainkit import max_abs_diff, pair_spec, train, write_config

pytestmark = pytest.mark.worker
SHIM = Path(__file__).with_name("nommap")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_no_mmap_workspace_trains_and_resumes_exactly(
    lora: bool, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, pair_spec(tiny_model, lora=lora))
    ref = train(tmp_path, cfg, tmp_path / "ref")
    assert ref.rc == 0, ref.stderr[-2000:]

    ws = tmp_path / "ws"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAULT_ENODEV_PATHS", f"{ws},{tiny_model}")
    killed = train(tmp_path, cfg, ws, fault="kill-at-step:6")
    assert killed.rc == -9, killed.stderr[-2000:]
    assert "reading it into memory instead" in killed.stderr  # the base model load took the fallback
    resumed = train(tmp_path, cfg, ws)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert resumed.summary and resumed.summary["resumedFrom"] == "checkpoint-4"
    # the checkpoint reload hit the injected error and fell back
    assert f"memory-mapping {ws / 'checkpoints' / 'checkpoint-4'}" in resumed.stderr, resumed.stderr[-3000:]
    weights = "final/adapter/adapter_model.safetensors" if lora else "final/model.safetensors"
    assert max_abs_diff(tmp_path / "ref" / weights, ws / weights) <= 1e-6


def test_no_mmap_tsdae_builds_its_decoder_from_memory(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sentence-transformers loads the TSDAE decoder itself (from the base model's files)."""
    from tinymodel import corpus

    spec = pair_spec(tiny_model, steps=4, loss="DenoisingAutoEncoderLoss")
    spec["dataset"] = {"inline": [{"text": t} for t in corpus(16)]}
    cfg = write_config(tmp_path, spec)
    ws = tmp_path / "ws"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAULT_ENODEV_PATHS", f"{ws},{tiny_model}")
    run = train(tmp_path, cfg, ws)
    assert run.rc == 0, run.stderr[-3000:]
    assert "reading it into memory instead" in run.stderr
