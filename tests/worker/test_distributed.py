"""The training worker on several processes (torchrun in the pod, gloo on CPU, a tiny model):
rank 0 speaks for the job, SIGTERM to one rank stops every rank at one checkpoint (exit 75) and the
resume is exact, and a resume on fewer processes keeps the global batch through gradient accumulation.
A SIGKILLed rank (the launch ends within a stated bound, the relaunch resumes) is in
tests/chaos/test_distributed_chaos.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from worker.distkit import train_and_signal_rank, with_procs
from worker.trainkit import checkpoint_names, max_abs_diff, pair_spec, train, write_config

pytestmark = pytest.mark.worker

def _weights(ws: Path, lora: bool) -> Path:
    return ws / "final" / ("adapter/adapter_model.safetensors" if lora else "model.safetensors")


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["full", "lora"])
def test_sigterm_to_one_rank_stops_all_at_one_checkpoint_and_resume_is_exact(tiny_model: Path, tmp_path: Path,
                                                                             lora: bool) -> None:
    cfg = write_config(tmp_path, with_procs(pair_spec(tiny_model, steps=12, every=5, lora=lora), 2))
    ref = train(tmp_path, cfg, tmp_path / "ref")
    assert ref.rc == 0, ref.stderr[-3000:]
    assert ref.summary and ref.summary["result"] == "completed" and ref.summary["worldSize"] == 2
    assert ref.summary["ranks"] == {"0": "completed", "1": "completed"}
    assert len(ref.events("start")) == 1 and len(ref.events("result")) == 1  # rank 0 alone speaks
    assert all(e["worldSize"] == 2 for e in ref.events("progress"))
    assert [e["step"] for e in ref.events("checkpoint")] == [5, 10, 12]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (tmp_path / "ref/checkpoints/checkpoint-5").iterdir()}

    ws = tmp_path / "ws"
    stopped, _ = train_and_signal_rank(tmp_path, cfg, ws, rank=1, sig=signal.SIGTERM, after_step=2)
    assert stopped.rc == 75, stopped.stderr[-3000:]
    assert stopped.summary and stopped.summary["result"] == "preempted"
    assert stopped.summary["ranks"] == {"0": "preempted", "1": "preempted"}
    assert stopped.summary["rankExitCodes"] == {"0": 75, "1": 75}  # what torchrun saw each rank exit with
    at = stopped.summary["step"]
    assert 2 <= at < 12
    saved = [e["step"] for e in stopped.events("checkpoint")]
    assert saved[-1] == at and saved.count(at) == 1  # one checkpoint at the agreed step
    assert stopped.events("preemption")[0]["step"] == at
    assert f"checkpoint-{at}" in checkpoint_names(ws) and not (ws / "final").exists()

    resumed = train(tmp_path, cfg, ws)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert resumed.summary and resumed.summary["resumedFrom"] == f"checkpoint-{at}"
    assert resumed.events("progress")[0]["step"] == at + 1
    assert max_abs_diff(_weights(tmp_path / "ref", lora), _weights(ws, lora)) <= 1e-6


@pytest.mark.slow
def test_world_size_4_to_2_keeps_the_global_batch_and_completes(tiny_model: Path, tmp_path: Path) -> None:
    spec = pair_spec(tiny_model, steps=8, every=2, rows=128)
    ws = tmp_path / "ws"
    four = write_config(tmp_path, with_procs(spec, 4), "four.yaml")
    stopped, _ = train_and_signal_rank(tmp_path, four, ws, rank=2, sig=signal.SIGTERM, after_step=2)
    assert stopped.rc == 75, stopped.stderr[-3000:]
    at = stopped.summary["step"] if stopped.summary else None
    assert at is not None and at < 8
    assert json.loads((ws / f"checkpoints/checkpoint-{at}/world.json").read_text()) == {
        "worldSize": 4, "gradientAccumulationSteps": 1}

    two = write_config(tmp_path, with_procs(spec, 2), "two.yaml")
    resumed = train(tmp_path, two, ws)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    changed = resumed.events("worldSizeChanged")
    assert changed == [{**changed[0], "previous": 4, "now": 2, "gradientAccumulationSteps": 2, "globalBatchKept": True}]
    start = resumed.events("start")[0]
    assert start["globalBatch"] == 8 * 4 and start["resumeFrom"] == f"checkpoint-{at}"
    assert resumed.events("progress")[0]["step"] == at + 1  # samples seen kept: no step repeated or skipped
    assert resumed.summary and resumed.summary["step"] == 8
    last = json.loads((ws / "checkpoints/checkpoint-8/trainer_state.json").read_text())
    assert last["global_step"] == 8 and abs(last["epoch"] - 8 * 32 / 128) < 1e-6  # 8 steps x 32 samples of 128
    assert json.loads((ws / "checkpoints/checkpoint-8/world.json").read_text()) == {
        "worldSize": 2, "gradientAccumulationSteps": 2}
