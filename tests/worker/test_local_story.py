"""`finetune-operator local` tells the story across runs, driven with signals like a user at a terminal:
Ctrl-C once (checkpoint, stop, attempt `preempted`), a rerun that says where it resumes and keeps every
attempt, a rerun of a finished job that redoes nothing; Ctrl-C twice (stop now, no traceback). Both
leave status.json consistent. Real worker, tiny BERT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tinymodel import pairs

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def _job(base: Path, steps: int) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "story"},
            "spec": {"model": {"base": str(base)},
                     "dataset": {"inline": pairs(64, seed=5), "columns": {"anchor": "question", "positive": "answer"}},
                     "training": {"maxSteps": steps, "batchSize": 8, "learningRate": 1e-3, "warmupRatio": 0.0,
                                  "checkpoint": {"everySteps": 3, "keep": 2}},
                     "lora": {"r": 4, "alpha": 8},
                     "export": {"formats": ["sentence-transformers"], "verify": {"tolerance": 1e-4}},
                     "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"}}}  # fmt: skip


def _cmd(f: Path, workdir: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("finetune-operator")), "local", str(f), "--workdir", str(workdir),
            "--timeout", "400"]


def _status(workdir: Path) -> dict[str, Any]:
    try:
        return json.loads((workdir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _start(f: Path, workdir: Path, until: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_cmd(f, workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not until(_status(workdir)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the point to interrupt it"
        time.sleep(0.3)
    return proc


def _consistent(st: dict[str, Any]) -> None:
    assert st["phase"] == "Pending" and st["reason"] == "Interrupted", st
    assert "run the same command again" in st["message"]
    assert all(a.get("result") and a.get("finishedAt") for a in st["attempts"]), st["attempts"]
    assert "nextAttemptAfter" not in st


def test_ctrl_c_once_then_rerun_resumes_and_keeps_every_attempt(tiny_model: Path, tmp_path: Path) -> None:
    f, workdir = tmp_path / "story.yaml", tmp_path / "w"
    f.write_text(yaml.safe_dump(_job(tiny_model, 60)))
    proc = _start(f, workdir, lambda st: (st.get("checkpoint") or {}).get("step"))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "interrupted: the worker checkpoints and stops" in out
    st = _status(workdir)
    _consistent(st)
    first = st["attempts"][0]
    assert first["result"] == "preempted" and first["exitCode"] == 75, first
    cp = st["checkpoint"]["name"]
    assert f"rerun to resume from {cp}" in out

    rerun = subprocess.run(_cmd(f, workdir), capture_output=True, text=True, timeout=400,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    step = int(cp.split("-")[1])
    assert f"story-train-2: resuming from {cp} (step {step} of 60)" in rerun.stdout, rerun.stdout
    assert "carrying on from status.json: 1 earlier attempt" in rerun.stdout
    training_rows = [ln.split() for ln in rerun.stdout.splitlines() if ln.startswith("story ") and " Training " in ln]
    assert training_rows and all(r[3].startswith("checkpoint-") for r in training_rows), rerun.stdout  # CHECKPOINT filled
    st = _status(workdir)
    assert st["phase"] == "Succeeded" and st["restarts"] == 1 and st["preemptions"] == 1
    assert [(a["pod"], a["result"]) for a in st["attempts"]] == [
        ("story-train-1", "preempted"), ("story-train-2", "completed"), ("story-export-1", "completed")]
    assert st["attempts"][1]["resumedFrom"] == cp

    again = subprocess.run(_cmd(f, workdir), capture_output=True, text=True, timeout=60,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "story: already complete" in again.stdout and "nothing redone" in again.stdout
    assert "Pending" not in again.stdout and "Training" not in again.stdout
    assert _status(workdir)["attempts"] == st["attempts"]  # history untouched, no pod started


def test_ctrl_c_twice_stops_now_without_a_traceback(tiny_model: Path, tmp_path: Path) -> None:
    f, workdir = tmp_path / "story.yaml", tmp_path / "w"
    f.write_text(yaml.safe_dump(_job(tiny_model, 400)))
    proc = _start(f, workdir, lambda st: (st.get("progress") or {}).get("step"))
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert "stopping now" in out
    st = _status(workdir)
    _consistent(st)
    assert st["attempts"][0]["result"] == "preempted", st["attempts"]
    assert st["failures"] == 0  # stopping it was the user's doing, not the job's failure
