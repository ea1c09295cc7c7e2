"""Run `finetune-worker` as a real subprocess, watch its JSON events and its workspace, and kill it
at a chosen point; check checkpoints and exports independently of the worker's own validation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
FAULTINJECT = Path(__file__).resolve().parent / "faultinject"
STAGING = ".staging-"


def train_spec(model: Path, *, lora: bool, steps: int = 16, every: int = 2, keep: int = 2) -> dict[str, Any]:
    from tinymodel import pairs

    spec: dict[str, Any] = {
        "model": {"base": str(model)},
        "dataset": {"inline": pairs(32, seed=3), "columns": {"anchor": "question", "positive": "answer"}},
        "training": {"maxSteps": steps, "batchSize": 4, "learningRate": 1e-3, "seed": 11,
                     "checkpoint": {"everySteps": every, "keep": keep, "onPreemption": True}},
        "resources": {"gpus": 0},
        "export": {"formats": ["sentence-transformers", "huggingface"] + (["adapter"] if lora else [])},
    }  # fmt: skip
    if lora:
        spec["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}
    return spec


class Worker:
    """One `finetune-worker` process: its JSON events (read live), exit code and termination summary."""

    def __init__(self, command: str, spec: dict[str, Any], ws: Path, *, env: dict[str, str] | None = None) -> None:
        self.ws = ws
        ws.mkdir(parents=True, exist_ok=True)
        tag = f"{command}-{time.monotonic_ns()}"
        self.config = ws.parent / f"{ws.name}.{tag}.yaml"
        self.config.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                               "metadata": {"name": "chaos"}, "spec": spec}))  # fmt: skip
        self.termlog = ws.parent / f"{ws.name}.{tag}.termlog"
        self.stderr_path = ws.parent / f"{ws.name}.{tag}.stderr"
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                    "FINETUNE_TERMINATION_LOG": str(self.termlog), "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
        self.started = time.monotonic()
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "finetune_worker.cli", command, "--config", str(self.config), "--workspace", str(ws)],
                stdout=subprocess.PIPE, stderr=err, env=full_env, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    with self._changed:
                        self.events.append(doc)
                        self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 180.0) -> dict[str, Any] | None:
        """The first event matching pred, waiting for it; None if the process ends first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for ev in self.events[seen:]:
                    if pred(ev):
                        return ev
                seen = len(self.events)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching event in {timeout}s; last: {self.events[-3:]}")
                self._changed.wait(min(left, 0.05))

    def wait_path(self, pred: Callable[[], bool], timeout: float = 180.0, poll: float = 0.001) -> bool:
        """Poll the file system until pred() holds (True) or the process ends (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            if self.proc.poll() is not None:
                return pred()
            time.sleep(poll)
        raise TimeoutError(f"file-system condition not reached in {timeout}s")

    def signal(self, sig: int) -> bool:
        """Send sig; False when the process had already ended."""
        if self.proc.poll() is not None:
            return False
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float = 300.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not exit within {timeout}s; stderr:\n{self.stderr()}") from None
        self._reader.join(10)
        return code

    def summary(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.termlog.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def stderr(self, tail: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def event(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


# --------------------------------------------------------------------------- independent checks


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoint_fault(path: Path) -> str | None:
    """Why a checkpoint-N directory is unusable, checked without the worker's code: trainer state for
    step N, weights that load in full, torch archives whose every member passes its CRC."""
    try:
        step = int(path.name.split("-", 1)[1])
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError, IndexError) as e:
        return f"trainer_state: {e}"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return "trainer_state is for another step"
    weights = [p for p in (path / "model.safetensors", path / "adapter_model.safetensors") if p.exists()]
    if not weights:
        return "no weights"
    for w in weights:
        try:
            _tensors(w)
        except Exception as e:
            return f"{w.name}: {type(e).__name__}: {e}"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        p = path / name
        if not p.exists():
            if name == "rng_state.pth":
                continue
            return f"{name} missing"
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{name}: {e}"
        if bad is not None:
            return f"{name}: member {bad} fails its CRC"
    return None


def checkpoints(ws: Path) -> list[Path]:
    """checkpoint-N directories, newest first."""
    root = ws / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]), reverse=True)


def newest_valid(ws: Path) -> str | None:
    for p in checkpoints(ws):
        if checkpoint_fault(p) is None:
            return p.name
    return None


def staging_left(ws: Path) -> list[str]:
    out = []
    for root in (ws, ws / "checkpoints"):
        if root.is_dir():
            out += [str(p.relative_to(ws)) for p in root.iterdir() if p.name.startswith(STAGING)]
    return out


def final_weights(ws: Path, lora: bool) -> dict[str, Any]:
    return _tensors(ws / "final" / ("adapter/adapter_model.safetensors" if lora else "model.safetensors"))


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert set(a) == set(b), f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a else 0.0


def export_fault(ws: Path) -> str | None:
    """Why `export/` is not one complete export: metadata lists every file with its size."""
    root = ws / "export"
    try:
        meta = json.loads((root / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        return f"metadata.json: {e}"
    files = meta.get("files") or {}
    if not files:
        return "metadata lists no files"
    for rel, size in files.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size:
            return f"{rel}: missing or not {size} bytes"
    for p in root.rglob("*.safetensors"):
        try:
            _tensors(p)
        except Exception as e:
            return f"{p.relative_to(root)}: {e}"
    return None


def export_weights(ws: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in sorted((ws / "export" / "sentence-transformers").rglob("*.safetensors")):
        out.update(_tensors(p))
    return out


SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}
