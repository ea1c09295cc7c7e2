"""Interruptions of the real training worker (a subprocess), each followed by a resume that completes
with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worker.trainkit import checkpoint_names, max_abs_diff, pair_spec, train, train_and_sigterm, write_config

pytestmark = pytest.mark.worker


def test_sigkill_mid_training_then_resume_matches_uninterrupted_full(tiny_model: Path, tmp_path: Path) -> None:
    spec = pair_spec(tiny_model)
    spec["dataset"]["eval"] = {"fraction": 0.125}  # 56 train rows: 7 steps per epoch, 12 steps cross an epoch
    cfg = write_config(tmp_path, spec)
    ref = train(tmp_path, cfg, tmp_path / "ref")
    assert ref.rc == 0, ref.stderr[-2000:]
    assert ref.summary and ref.summary["result"] == "completed" and ref.summary["resumedFrom"] is None

    ws = tmp_path / "ws"
    killed = train(tmp_path, cfg, ws, fault="kill-at-step:10")  # in the second epoch
    assert killed.rc == -9
    assert killed.summary is None  # SIGKILL: nothing written at exit
    assert checkpoint_names(ws) == ["checkpoint-4", "checkpoint-8"]
    assert not (ws / "final").exists()

    resumed = train(tmp_path, cfg, ws)
    assert resumed.rc == 0, resumed.stderr[-2000:]
    assert resumed.summary == {"result": "completed", "step": 12, "checkpoint": "final",
                               "message": "trained 12 steps; result in final/", "resumedFrom": "checkpoint-8"}
    assert resumed.events("start")[0]["resumeFrom"] == "checkpoint-8"
    assert resumed.events("progress")[0]["step"] == 9  # first step after the checkpoint, none repeated
    # resumed mid-epoch-2: the batch order must come from (seed, epoch), not from a freshly seeded generator
    assert max_abs_diff(tmp_path / "ref/final/model.safetensors", ws / "final/model.safetensors") <= 1e-6
    info = json.loads((ws / "final/training.json").read_text())
    assert info["lora"] is False and info["steps"] == 12 and info["trainRows"] == 56 and info["evalRows"] == 8
    assert "eval_loss" in info["evalMetrics"]
    assert checkpoint_names(ws) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]  # keep: 3 (4 from attempt 1)

    again = train(tmp_path, cfg, ws)  # a finished job started again (e.g. its pod restarted) does not retrain
    assert again.rc == 0 and again.summary and again.summary["message"] == "already trained: final/ exists"
    shutil.rmtree(ws / "final")  # killed after the last checkpoint, before final/ was published
    last = train(tmp_path, cfg, ws)
    assert last.rc == 0, last.stderr[-2000:]
    assert last.summary and last.summary["resumedFrom"] == "checkpoint-12" and not last.events("progress")
    assert max_abs_diff(tmp_path / "ref/final/model.safetensors", ws / "final/model.safetensors") <= 1e-6


def test_sigterm_checkpoints_off_schedule_exits_75_and_lora_resume_is_exact(tiny_model: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pair_spec(tiny_model, lora=True))
    ref = train(tmp_path, cfg, tmp_path / "ref")
    assert ref.rc == 0, ref.stderr[-2000:]

    ws = tmp_path / "ws"
    stopped = train(tmp_path, cfg, ws, fault="sigterm-at-step:6")  # the process signals itself at step 6
    assert stopped.rc == 75, stopped.stderr[-2000:]
    assert stopped.summary is not None
    assert stopped.summary["result"] == "preempted" and stopped.summary["step"] == 6
    assert stopped.summary["checkpoint"] == "checkpoint-6"  # everySteps is 4: an off-schedule save
    assert checkpoint_names(ws) == ["checkpoint-4", "checkpoint-6"]
    assert not (ws / "final").exists()  # never reported or published as completed
    assert [e["name"] for e in stopped.events("checkpoint")] == ["checkpoint-4", "checkpoint-6"]

    resumed = train(tmp_path, cfg, ws)
    assert resumed.rc == 0, resumed.stderr[-2000:]
    assert resumed.summary and resumed.summary["resumedFrom"] == "checkpoint-6"
    adapter = "final/adapter/adapter_model.safetensors"
    assert max_abs_diff(tmp_path / "ref" / adapter, ws / adapter) <= 1e-6
    cfg_json = json.loads((ws / "final/adapter/adapter_config.json").read_text())
    assert cfg_json["base_model_name_or_path"] == str(tiny_model) and cfg_json["r"] == 4
    assert (ws / "final/adapter/tokenizer.json").exists()


def test_real_sigterm_during_long_run_loses_no_step(tiny_model: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pair_spec(tiny_model, steps=2000, every=1000))
    ws = tmp_path / "ws"
    run = train_and_sigterm(tmp_path, cfg, ws, after_step=1)
    assert run.rc == 75, run.stderr[-2000:]
    assert run.summary is not None and run.summary["result"] == "preempted"
    step = run.summary["step"]
    assert 1 <= step < 1000
    assert checkpoint_names(ws) == [f"checkpoint-{step}"]  # saved at the step it stopped on: no step lost
    state = json.loads((ws / f"checkpoints/checkpoint-{step}/trainer_state.json").read_text())
    assert state["global_step"] == step


def test_sigkill_during_checkpoint_save_leaves_no_fake_checkpoint_and_tsdae_resume_is_exact(
        tiny_model: Path, tmp_path: Path) -> None:
    from tinymodel import corpus

    spec = pair_spec(tiny_model, steps=10, loss="DenoisingAutoEncoderLoss")
    spec["dataset"] = {"inline": [{"text": t} for t in corpus(48)]}
    cfg = write_config(tmp_path, spec)
    ref = train(tmp_path, cfg, tmp_path / "ref")
    assert ref.rc == 0, ref.stderr[-2000:]
    assert (tmp_path / "ref/checkpoints/checkpoint-8/loss_state.pt").exists()  # the decoder is checkpointed

    ws = tmp_path / "ws"
    killed = train(tmp_path, cfg, ws, fault="kill-in-save:8")  # model written, optimizer not yet
    assert killed.rc == -9
    staging = [p.name for p in (ws / "checkpoints").iterdir() if p.name.startswith(".staging-")]
    assert len(staging) == 1 and checkpoint_names(ws) == [staging[0], "checkpoint-4"]

    resumed = train(tmp_path, cfg, ws)
    assert resumed.rc == 0, resumed.stderr[-2000:]
    assert [e["name"] for e in resumed.events("cleaned")] == staging
    assert resumed.summary and resumed.summary["resumedFrom"] == "checkpoint-4"
    assert checkpoint_names(ws) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    # decoder restored on resume: otherwise steps 5-10 would train against a different decoder
    assert max_abs_diff(tmp_path / "ref/final/model.safetensors", ws / "final/model.safetensors") <= 1e-6
