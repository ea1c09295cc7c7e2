"""Helpers for the training-worker tests: configs, running the real CLI as a subprocess, reading results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COLUMNS = {"anchor": "question", "positive": "answer"}


def pair_spec(base: Path | str, *, steps: int = 12, every: int = 4, keep: int = 3, lora: bool = False,
              rows: int = 64, **training: Any) -> dict[str, Any]:
    """A small MNRL job: 8 steps per epoch at batch 8 with 64 rows (so 12 steps cross an epoch)."""
    from tinymodel import pairs

    s: dict[str, Any] = {
        "model": {"base": str(base)},
        "dataset": {"inline": pairs(rows), "columns": dict(COLUMNS)},
        "training": {"maxSteps": steps, "batchSize": 8, "learningRate": 1e-3, "warmupRatio": 0.1,
                     "checkpoint": {"everySteps": every, "keep": keep}, **training},
        "resources": {"gpus": 0},
    }
    if lora:
        s["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}
    return s


def write_config(tmp: Path, spec: dict[str, Any], name: str = "job.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                 "metadata": {"name": "t"}, "spec": spec}))
    return p


def _env(tmp: Path, fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_FAULT"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               FINETUNE_TERMINATION_LOG=str(tmp / "termination-log"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO / "operator"), env.get("PYTHONPATH", "")]))
    if fault:
        env["FINETUNE_FAULT"] = fault
    return env


def _cmd(config: Path, workspace: Path) -> list[str]:
    return [sys.executable, "-m", "finetune_worker.cli", "train", "--config", str(config), "--workspace", str(workspace)]


class Run:
    def __init__(self, rc: int, stdout: str, stderr: str, summary: dict[str, Any] | None) -> None:
        self.rc, self.stdout, self.stderr, self.summary = rc, stdout, stderr, summary

    def events(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == kind:
                    out.append(ev)
        return out


def _summary(tmp: Path) -> dict[str, Any] | None:
    p = tmp / "termination-log"
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    p.unlink()
    return data


def train(tmp: Path, config: Path, workspace: Path, fault: str | None = None, timeout: float = 240) -> Run:
    """Run `finetune-worker train` as a real process to its end (or its death)."""
    p = subprocess.run(_cmd(config, workspace), env=_env(tmp, fault), capture_output=True, text=True,
                       timeout=timeout, cwd=tmp)
    return Run(p.returncode, p.stdout, p.stderr, _summary(tmp))


def train_and_sigterm(tmp: Path, config: Path, workspace: Path, after_step: int = 1, timeout: float = 240) -> Run:
    """Start training, send a real SIGTERM once a progress line reports `after_step`, wait for the exit."""
    p = subprocess.Popen(_cmd(config, workspace), env=_env(tmp, None), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp)
    lines = []
    deadline = time.monotonic() + timeout
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        if line.startswith("{") and '"progress"' in line and json.loads(line).get("step", 0) >= after_step:
            p.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "no progress line in time"
    out, err = p.communicate(timeout=timeout)
    return Run(p.returncode, "".join(lines) + out, err, _summary(tmp))


def train_and_sigterm_while_loading_torch(tmp: Path, config: Path, workspace: Path, timeout: float = 240) -> Run:
    """Start training and send a real SIGTERM the moment torch's library is mapped into the process:
    in the middle of the heavy imports, long before the model loads (Linux: polls /proc/<pid>/maps)."""
    p = subprocess.Popen(_cmd(config, workspace), env=_env(tmp, None), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp)
    maps = Path(f"/proc/{p.pid}/maps")
    deadline = time.monotonic() + timeout
    while True:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        assert p.poll() is None, f"exited ({p.returncode}) before torch loaded"
        assert time.monotonic() < deadline, "torch never loaded"
        time.sleep(0.002)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=timeout)
    return Run(p.returncode, out, err, _summary(tmp))


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))[:5]
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def checkpoint_names(workspace: Path) -> list[str]:
    d = workspace / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
