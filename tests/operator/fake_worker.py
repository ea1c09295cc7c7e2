"""A stand-in `finetune-worker` that keeps the worker contract without torch, for fast operator tests.

It does what the real worker does at the boundary the operator sees, in milliseconds: reads the
FineTuneJob from FINETUNE_CONFIG, resumes from the highest `checkpoints/checkpoint-N` in the
workspace, prints JSON progress/checkpoint lines, checkpoints and exits 75 on SIGTERM, writes the
termination summary, exits 0/2/1. The lifecycle test with real training uses the real worker;
these tests exercise the operator's decisions (backoff, suspend, restart, scale) where real
training would only add minutes.

Per-workspace behaviour comes from `<workspace>/fake-worker.json` (all optional):
  {"train": "ok" | "fail" | "invalid", "export": "ok" | "fail", "steps": 20, "stepSeconds": 0.05}
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def summary(doc: dict) -> None:
    Path(os.environ["FINETUNE_TERMINATION_LOG"]).write_text(json.dumps(doc))


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def latest_checkpoint(ws: Path) -> int:
    steps = [
        int(p.name.split("-")[1])
        for p in (ws / "checkpoints").glob("checkpoint-*")
        if p.name.split("-")[1].isdigit()
    ]
    return max(steps, default=0)


def save(ws: Path, step: int) -> str:
    d = ws / "checkpoints" / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    emit(event="checkpoint", name=d.name, step=step)
    return d.name


def train(ws: Path, spec: dict, cfg: dict) -> int:
    mode = cfg.get("train", "ok")
    if mode == "invalid":
        summary({"result": "invalid", "message": "spec.dataset: column 'answer' not found in the data"})
        return 2
    total = int(cfg.get("steps", (spec.get("training") or {}).get("maxSteps") or 20))
    every = int(((spec.get("training") or {}).get("checkpoint") or {}).get("everySteps") or 5)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    start = latest_checkpoint(ws)
    resumed = f"checkpoint-{start}" if start else None
    emit(event="resume", fromCheckpoint=resumed)
    ckpt = resumed
    for step in range(start + 1, total + 1):
        time.sleep(float(cfg.get("stepSeconds", 0.05)))
        emit(
            event="progress",
            step=step,
            totalSteps=total,
            epoch=round(step / total, 3),
            loss=1.0 / step,
            samplesPerSecond=100.0,
        )
        if mode == "fail" and step >= start + 2:
            print(
                "Traceback (most recent call last):\nRuntimeError: injected failure",
                file=sys.stderr,
                flush=True,
            )
            return 1
        if step % every == 0:
            ckpt = save(ws, step)
        if stop:
            ckpt = save(ws, step)
            summary(
                {
                    "result": "preempted",
                    "step": step,
                    "checkpoint": ckpt,
                    "resumedFrom": resumed,
                    "message": f"stopped on SIGTERM after checkpointing at step {step}",
                }
            )
            return 75
    (ws / "final").mkdir(exist_ok=True)
    summary(
        {"result": "completed", "step": total, "checkpoint": ckpt, "resumedFrom": resumed, "message": "done"}
    )
    return 0


def export(ws: Path, cfg: dict) -> int:
    if cfg.get("export", "ok") == "fail":
        print("RuntimeError: injected export failure", file=sys.stderr, flush=True)
        return 1
    out = ws / "export"
    (out / "sentence-transformers").mkdir(parents=True, exist_ok=True)
    (out / "metadata.json").write_text("{}")
    summary(
        {
            "result": "completed",
            "export": str(out),
            "formats": ["sentence-transformers"],
            "maxDeviation": 0.0,
            "metrics": {},
            "message": "exported",
        }
    )
    return 0


def source_export(ws: Path, spec: dict) -> str | None:
    """Where the real worker finds `model.fromJob`'s export (modelsrc.py), or a failure message."""
    src = (spec.get("model") or {}).get("fromJob")
    mounted = os.environ.get("FINETUNE_SOURCE_EXPORT")
    export = Path(mounted) if mounted else Path(os.environ.get("FINETUNE_JOBS_ROOT") or ws.parent) / src / "export"
    path = export / "sentence-transformers"
    return None if path.is_dir() else f"spec.model.fromJob: job {src!r} has no sentence-transformers export at {path}"


def main() -> int:
    command, ws = sys.argv[1], Path(sys.argv[sys.argv.index("--workspace") + 1])
    spec = json.loads(os.environ["FINETUNE_CONFIG"])["spec"]
    cfg_path = ws / "fake-worker.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    needs_source = command == "train" or spec.get("lora") is not None  # a LoRA export merges onto it
    if (spec.get("model") or {}).get("fromJob") and needs_source and (problem := source_export(ws, spec)):
        summary({"result": "invalid", "message": problem})
        return 2
    return train(ws, spec, cfg) if command == "train" else export(ws, cfg)


if __name__ == "__main__":
    sys.exit(main())
