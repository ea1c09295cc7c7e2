"""The distributed training worker against a plain torchrun + SentenceTransformerTrainer script; SIGTERM to one rank.

Builds offline a small BERT sentence-transformers model and MNRL pairs, then runs, each as fresh
processes on the same world size (gloo on CPU; alternating worker and baseline):

  worker    `finetune-worker train` with spec.distributed.procsPerNode = N: torch.distributed.run in
            the process, rank-0 progress, shared-staging checkpoints published by rank 0, the
            per-step all_reduce stop agreement, in-batch negatives gathered across ranks
  baseline  `torchrun --standalone --nproc-per-node N script.py`: SentenceTransformerTrainer, MNRL with
            gather_across_devices, the same model, data, seed, steps, per-process batch and checkpoint cadence

and prints, from one run:
  throughput  worker / baseline, steps per second from the first step to the last (median of pairs;
              goal >= 0.97)
  sigterm     seconds from a SIGTERM to ONE rank until every rank has exited (exit 75) with the
              checkpoint written, and the steps lost (trained but not in that checkpoint; goal 0),
              checked by resuming: the resumed run's first step must be the checkpoint's step + 1
  sigkill     seconds from a SIGKILL of one rank until every rank has exited (exit 1)

    python bench/bench_distributed.py [--procs 2] [--steps 40] [--every 20] [--batch 16] [--repeat 2]
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
import json, os, sys, time
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import TrainerCallback, set_seed
cfg = json.loads(open(sys.argv[1]).read())
set_seed(cfg["seed"])
model = SentenceTransformer(cfg["model"], device="cpu")
rows = json.load(open(cfg["data"]))
ds = Dataset.from_list([{"anchor": r["question"], "positive": r["answer"]} for r in rows])
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if os.environ.get("RANK", "0") == "0" and state.global_step in (1, state.max_steps):
            print(json.dumps({"event": "progress", "time": time.time(), "step": state.global_step}), flush=True)
args = SentenceTransformerTrainingArguments(
    output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
    learning_rate=cfg["lr"], warmup_steps=0.1, seed=cfg["seed"], data_seed=cfg["seed"], use_cpu=True,
    save_strategy="steps", save_steps=cfg["every"], save_total_limit=cfg["keep"], logging_steps=min(10, cfg["every"]),
    report_to="none", disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo")
loss = MultipleNegativesRankingLoss(model, gather_across_devices=True)
SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss, callbacks=[Clock()]).train()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "PET_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO / "operator"), env.get("PYTHONPATH", "")]))
    return env


def _steps_per_second(stdout: str) -> float:
    marks = {}
    for line in stdout.splitlines():
        if line.startswith("{") and '"progress"' in line:
            ev = json.loads(line)
            marks.setdefault(ev["step"], ev["time"])
    first, last = min(marks), max(marks)
    return (last - first) / (marks[last] - marks[first])


def _worker_cmd(config: Path, ws: Path) -> list[str]:
    return [sys.executable, "-m", "finetune_worker.cli", "train", "--config", str(config), "--workspace", str(ws)]


def _job(model: Path, data: list[dict[str, str]], a: argparse.Namespace, steps: int, every: int) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
            "spec": {"model": {"base": str(model)},
                     "dataset": {"inline": data, "columns": {"anchor": "question", "positive": "answer"}},
                     "training": {"maxSteps": steps, "batchSize": a.batch, "learningRate": 1e-4, "warmupRatio": 0.1,
                                  "seed": 42, "checkpoint": {"everySteps": every, "keep": 2}},
                     "resources": {"gpus": 0}, "distributed": {"procsPerNode": a.procs, "backend": "gloo"}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    a = ap.parse_args()
    from tinymodel import build_tiny_bert, pairs
    from worker.distkit import rank_pids

    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    model = build_tiny_bert(tmp / "model", hidden=a.hidden, layers=4)
    data = pairs(a.steps * a.batch * a.procs, seed=5)
    (tmp / "data.json").write_text(json.dumps(data))
    cfg = tmp / "job.json"
    cfg.write_text(json.dumps(_job(model, data, a, a.steps, a.every)))
    script = tmp / "baseline.py"
    script.write_text(BASELINE)
    ratios = []
    for i in range(a.repeat):
        rates = {}
        for who in (("worker", "baseline") if i % 2 == 0 else ("baseline", "worker")):
            if who == "worker":
                cmd = _worker_cmd(cfg, tmp / f"ws-{i}")
            else:
                bcfg = tmp / f"baseline-{i}.json"
                bcfg.write_text(json.dumps({"model": str(model), "data": str(tmp / "data.json"), "out": str(tmp / f"b-{i}"),
                                            "steps": a.steps, "every": a.every, "keep": 2, "batch": a.batch,
                                            "lr": 1e-4, "seed": 42}))
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.procs}",
                       str(script), str(bcfg)]
            p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=tmp, timeout=1800)
            assert p.returncode == 0, f"{who} failed: {p.stderr[-3000:]}"
            rates[who] = _steps_per_second(p.stdout)
        ratios.append(rates["worker"] / rates["baseline"])
        print(f"pair {i}: worker {rates['worker']:.2f} steps/s, baseline {rates['baseline']:.2f} steps/s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"throughput worker/baseline (world size {a.procs}, median of {a.repeat}): {statistics.median(ratios):.3f}"
          "  (goal >= 0.97)")

    # SIGTERM to one rank (rank 1): seconds until every rank exited; steps lost
    long_cfg = tmp / "long.json"
    long_cfg.write_text(json.dumps(_job(model, data, a, a.steps * 3, a.steps * 3)))
    ws = tmp / "ws-term"
    p = subprocess.Popen(_worker_cmd(long_cfg, ws), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp)
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("{") and '"progress"' in line and json.loads(line)["step"] >= 10:
            break
    pids = rank_pids(p.pid)
    sent = time.monotonic()
    os.kill(pids[1], signal.SIGTERM)
    out, _ = p.communicate(timeout=600)
    took = time.monotonic() - sent
    result = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"event":"result"')][-1]
    ckpt = result.get("checkpoint")
    assert p.returncode == 75 and ckpt, (p.returncode, result)
    resumed = subprocess.run(_worker_cmd(long_cfg, ws), env=_env(), capture_output=True, text=True, cwd=tmp,
                             timeout=1800)
    first = next(json.loads(ln)["step"] for ln in resumed.stdout.splitlines() if '"progress"' in ln)
    lost = result["step"] - (first - 1)
    print(f"sigterm to rank 1 of {a.procs}: every rank exited 75 in {took:.2f}s with {ckpt} written "
          f"(stopped at step {result['step']}); steps lost: {lost}  (goal 0)")

    # SIGKILL of one rank (an OOM kill): seconds until every rank has exited (a failure, exit 1)
    p = subprocess.Popen(_worker_cmd(long_cfg, tmp / "ws-kill"), env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, cwd=tmp)
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("{") and '"progress"' in line and json.loads(line)["step"] >= 10:
            break
    pids = rank_pids(p.pid)
    sent = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    p.communicate(timeout=600)
    print(f"sigkill of rank 1 of {a.procs}: the launch exited {p.returncode} in {time.monotonic() - sent:.2f}s")


if __name__ == "__main__":
    main()
