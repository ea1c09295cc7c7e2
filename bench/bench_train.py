"""The training worker against a plain SentenceTransformerTrainer script; resume start-up; SIGTERM loss.

Builds offline a 4-layer BERT (hidden 256) sentence-transformers model and MNRL pairs, then runs,
each as a fresh process (alternating worker and baseline so background load hits both alike):

  worker    `finetune-worker train` (atomic checkpoints, validation, progress lines, SIGTERM watch)
  baseline  a plain script: SentenceTransformerTrainer with the same model, data, seed, steps,
            batch size, learning rate and checkpoint cadence (stock checkpoint saves)

and prints, from one run:
  throughput   worker ÷ baseline, steps per second from the first step to the last, the median of
               back-to-back pairs run in alternating order (goal >= 0.97); also steps per CPU second
               (the child's user+system time from /proc), which shared-machine load disturbs less
  resume       seconds from process start to the first step of a resumed run ÷ of a cold start
               (goal <= 1.15); the resumed run restarts a worker stopped by SIGTERM
  lost steps   steps the resumed run had to redo after that SIGTERM (goal 0), and what a stock
               trainer would have lost (steps since its last scheduled checkpoint)

    python bench/bench_train.py [--steps 60] [--every 20] [--batch 32] [--repeat 4] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

BASELINE = r"""
import json, sys, time
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import TrainerCallback, set_seed
cfg = json.loads(sys.argv[1])
set_seed(cfg["seed"])
model = SentenceTransformer(cfg["model"], device="cpu")
rows = json.load(open(cfg["data"]))
ds = Dataset.from_list([{"anchor": r["question"], "positive": r["answer"]} for r in rows])
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step in (1, state.max_steps):
            print(json.dumps({"event": "progress", "time": time.time(), "step": state.global_step}), flush=True)
args = SentenceTransformerTrainingArguments(
    output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
    learning_rate=cfg["lr"], warmup_steps=0.1, seed=cfg["seed"], data_seed=cfg["seed"], use_cpu=True,
    save_strategy="steps", save_steps=cfg["every"], save_total_limit=cfg["keep"], logging_steps=min(10, cfg["every"]),
    report_to="none", disable_tqdm=True, dataloader_num_workers=0)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                     loss=MultipleNegativesRankingLoss(model), callbacks=[Clock()])
trainer.train()
"""


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a running process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _events(lines: list[tuple[float, float, str]]) -> list[dict[str, Any]]:
    out = []
    for arrived, cpu, line in lines:
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["arrived"], ev["cpu"] = arrived, cpu
            out.append(ev)
    return out


def _run(cmd: list[str], env: dict[str, str], sigterm_at: int | None = None) -> tuple[float, list[dict[str, Any]], int]:
    """Start a process, collect its JSON lines with arrival times; SIGTERM it once a step >= sigterm_at shows."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    lines = []
    assert p.stdout is not None
    sent = False
    for line in p.stdout:
        lines.append((time.time(), _cpu_seconds(p.pid), line))
        if sigterm_at is not None and not sent and '"progress"' in line and json.loads(line)["step"] >= sigterm_at:
            p.send_signal(signal.SIGTERM)
            sent = True
    rc = p.wait()
    return t0, _events(lines), rc


def _steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "progress"]


def _throughput(events: list[dict[str, Any]]) -> tuple[float, float]:
    """Steps per wall second and per CPU second, from the first step to the last."""
    prog = _steps(events)
    first, last = prog[0], prog[-1]
    steps = last["step"] - first["step"]
    return steps / (last["time"] - first["time"]), steps / (last["cpu"] - first["cpu"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()

    import yaml

    from tinymodel import build_tiny_bert, pairs

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_bert(work / "model", hidden=a.hidden, layers=4, seed=0)
    rows = pairs(a.steps * a.batch, seed=1)
    (work / "data.json").write_text(json.dumps(rows))
    lr, seed, keep = 5e-5, 42, 3
    spec = {"model": {"base": str(model)},
            "dataset": {"inline": rows, "columns": {"anchor": "question", "positive": "answer"}},
            "training": {"maxSteps": a.steps, "batchSize": a.batch, "learningRate": lr, "seed": seed,
                         "checkpoint": {"everySteps": a.every, "keep": keep}},
            "resources": {"gpus": 0}}
    cfg = work / "job.yaml"
    cfg.write_text(yaml.safe_dump({"spec": spec}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")])}
    worker = [sys.executable, "-m", "finetune_worker.cli", "train", "--config", str(cfg), "--workspace"]

    tw, tb, cold = [], [], []  # (steps per wall second, steps per CPU second) per run
    for i in range(a.repeat):
        base_cfg = {"model": str(model), "data": str(work / "data.json"), "out": str(work / f"b{i}"), "steps": a.steps,
                    "batch": a.batch, "lr": lr, "seed": seed, "every": a.every, "keep": keep}
        order = ("worker", "baseline") if i % 2 == 0 else ("baseline", "worker")  # alternate: load drifts cancel
        for who in order:
            if who == "worker":
                t0, ev, rc = _run([*worker, str(work / f"w{i}")], env)
                assert rc == 0, f"worker exited {rc}"
                tw.append(_throughput(ev))
                cold.append(_steps(ev)[0]["arrived"] - t0)
            else:
                _, ev, rc = _run([sys.executable, "-c", BASELINE, json.dumps(base_cfg)], env)
                assert rc == 0, f"baseline exited {rc}"
                tb.append(_throughput(ev))
        print(f"  pair {i}: worker {tw[-1][0]:.2f} steps/s ({tw[-1][1]:.2f}/CPU-s), baseline {tb[-1][0]:.2f} steps/s "
              f"({tb[-1][1]:.2f}/CPU-s), cold start {cold[-1]:.2f}s", flush=True)

    # SIGTERM a fresh run a little past a scheduled checkpoint, then resume it
    stop_at = min(a.every + a.every // 2, a.steps - 2)
    t0, ev, rc = _run([*worker, str(work / "preempt")], env, sigterm_at=stop_at)
    assert rc == 75, f"SIGTERM'd worker exited {rc}, not 75"
    cold.append(_steps(ev)[0]["arrived"] - t0)
    result = [e for e in ev if e.get("event") == "result"][-1]
    stopped_step = result["step"]
    t0, ev, rc = _run([*worker, str(work / "preempt")], env)
    assert rc == 0, f"resumed worker exited {rc}"
    first = _steps(ev)[0]
    resumed_start = first["arrived"] - t0
    lost = stopped_step - (first["step"] - 1)
    stock_lost = stopped_step - (stopped_step // a.every) * a.every

    wall = [w[0] / b[0] for w, b in zip(tw, tb, strict=True)]  # each pair ran back to back: shared load cancels
    cpu = [w[1] / b[1] for w, b in zip(tw, tb, strict=True)]
    resume = resumed_start / statistics.median(cold)
    print(f"model: 4-layer BERT hidden {a.hidden}; {a.steps} steps of batch {a.batch}, checkpoint every {a.every}, CPU")
    print(f"throughput worker/baseline, wall clock: {statistics.median(wall):.3f} (median of pairs "
          f"{', '.join(f'{r:.3f}' for r in wall)}; goal >= 0.97)")
    print(f"throughput worker/baseline, per CPU second: {statistics.median(cpu):.3f} (median of pairs "
          f"{', '.join(f'{r:.3f}' for r in cpu)}; less sensitive to other processes on a shared machine)")
    print(f"start to first step, resumed/cold: {resume:.3f} ({resumed_start:.2f}s vs median {statistics.median(cold):.2f}s; "
          f"goal <= 1.15)")
    print(f"steps lost to SIGTERM: {lost} (stopped at step {stopped_step}, resumed at step {first['step']}; "
          f"a stock trainer would lose {stock_lost}; goal 0)")


if __name__ == "__main__":
    main()
