"""Streaming LoRA merge vs peft's full-load merge_and_unload, on a BERT-base-sized model.

Builds offline a randomly initialised BERT-base (~110M parameters, fp32, saved in several shards)
and a LoRA adapter (r=16 on every attention and MLP Linear), then measures, each in a fresh
subprocess so peak RSS is the operation's own:

  streaming  finetune_worker.export.merge: plan + stream_merge into shards of the same size
  peft       AutoModel.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  copy       a plain copy of the same base files (+ fsync, as the merge fsyncs its shards)

and prints: peak RSS streaming / peft (goal <= 0.5), wall time streaming / peft (goal <= 1.0), and
merge throughput / copy throughput (goal >= 0.5). Times are of the operation inside the process
(imports excluded); each is the best of --repeat runs. Files are read once first so every run
starts from a warm page cache.

    python bench/bench_merge.py [--workdir DIR] [--shard-size 100MB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, shutil, sys, time
from pathlib import Path
mode, base, adapter, out, shard = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
if mode != "copy":
    import torch  # imported before the clock starts in every mode that needs it
t0 = time.perf_counter()
if mode == "streaming":
    from finetune_worker.export import merge
    base_t = merge.base_tensors(base)
    config, state = merge.load_adapter(adapter)
    assert merge.unsupported_reason(config, state, base_t) is None
    plan = merge.plan_merge(config, state, base_t)
    merge.stream_merge(base, plan, out, shard)
elif mode == "peft":
    from peft import PeftModel
    from transformers import AutoModel
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(adapter))
    model.merge_and_unload().save_pretrained(str(out), max_shard_size=shard)
else:
    for f in sorted(base.iterdir()):
        if f.suffix == ".safetensors":
            shutil.copyfile(f, out / f.name)
            fd = os.open(out / f.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
seconds = time.perf_counter() - t0
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's size
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm / 1024}))
"""


def build(workdir: Path, shard_size: str) -> tuple[Path, Path, int]:
    base, adapter = workdir / "base", workdir / "adapter"
    if not (base / "model.safetensors.index.json").exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        model = BertModel(BertConfig())  # bert-base-uncased geometry: 12 x 768, vocab 30522
        model.save_pretrained(base, max_shard_size=shard_size)
        pm = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"])
        )
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        pm.save_pretrained(adapter)
        del model, pm
    n_params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"].get(
        "total_parameters", 0
    )
    return base, adapter, n_params


def measure(mode: str, base: Path, adapter: Path, workdir: Path, shard_bytes: int) -> dict:
    out = workdir / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO / "operator"), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(base), str(adapter), str(out), str(shard_bytes)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["process_seconds"] = time.perf_counter() - t0
    r["out_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    shutil.rmtree(out)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(Path(args.workdir), args.shard_size)
        return
    from finetune_api.spec import parse_size

    shard_bytes = parse_size(args.shard_size, "--shard-size")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (
        workdir / "base" / "model.safetensors.index.json"
    ).exists():  # build in a child: keep this process small
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--build-only",
                "--workdir",
                str(workdir),
                "--shard-size",
                args.shard_size,
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "operator")},
        )
    base, adapter, n_params = build(workdir, args.shard_size)
    files = sorted(base.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    for f in files:  # warm the page cache so no mode pays the first read
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    print(
        f"model: {n_params / 1e6:.1f}M parameters, {size / 1e6:.0f} MB in {len(files)} shards "
        f"(build {time.perf_counter() - t0:.1f}s); adapter r=16 on query/key/value/dense"
    )
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for mode in ("copy", "streaming", "peft"):
            r = measure(mode, base, adapter, workdir, shard_bytes)
            print(
                f"  {mode:9s} {r['seconds']:6.2f}s (process {r['process_seconds']:5.1f}s)  "
                f"peak RSS {r['peak_rss_mb']:7.0f} MB  wrote {r['out_bytes'] / 1e6:.0f} MB",
                flush=True,
            )
            b = best.setdefault(mode, r)
            b["seconds"] = min(b["seconds"], r["seconds"])
            b["peak_rss_mb"] = min(b["peak_rss_mb"], r["peak_rss_mb"])
    s, p, c = best["streaming"], best["peft"], best["copy"]
    rss_ratio = s["peak_rss_mb"] / p["peak_rss_mb"]
    time_ratio = s["seconds"] / p["seconds"]
    tp_ratio = (size / s["seconds"]) / (size / c["seconds"])
    print(
        f"peak RSS   streaming/peft  = {s['peak_rss_mb']:.0f}/{p['peak_rss_mb']:.0f} MB = {rss_ratio:.2f}  (goal <= 0.5)"
    )
    print(
        f"wall time  streaming/peft  = {s['seconds']:.2f}/{p['seconds']:.2f} s = {time_ratio:.2f}  (goal <= 1.0)"
    )
    print(
        f"throughput streaming/copy  = {size / s['seconds'] / 1e6:.0f}/{size / c['seconds'] / 1e6:.0f} MB/s "
        f"= {tp_ratio:.2f}  (goal >= 0.5)"
    )
    print(f"total {time.perf_counter() - t0:.0f}s; workdir {workdir}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
