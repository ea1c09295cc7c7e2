"""Helpers for the distributed worker tests: start `finetune-worker train` (which runs torchrun in-process),
find its ranks' processes, and signal one of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from worker.trainkit import Run, _cmd, _env, _summary


def with_procs(spec: dict[str, Any], procs: int) -> dict[str, Any]:
    return {**spec, "distributed": {"procsPerNode": procs, "backend": "gloo"}}


def rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun started under `launcher` (read from /proc)."""
    out: dict[int, int] = {}
    try:
        children = [int(c) for t in Path(f"/proc/{launcher}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except OSError:
        return out
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def train_and_signal_rank(tmp: Path, config: Path, workspace: Path, *, rank: int, sig: signal.Signals,
                          after_step: int = 2, timeout: float = 240) -> tuple[Run, float]:
    """Start a distributed run, send `sig` to one rank once rank 0 reports `after_step`, wait for the exit.

    Returns the run and the seconds from the signal until the launcher (and so every rank) exited."""
    p = subprocess.Popen(_cmd(config, workspace), env=_env(tmp, None), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp)
    lines = []
    deadline = time.monotonic() + timeout
    assert p.stdout is not None
    sent_at = None
    for line in p.stdout:
        lines.append(line)
        if line.startswith("{") and '"progress"' in line and json.loads(line).get("step", 0) >= after_step:
            pids = rank_pids(p.pid)
            assert rank in pids, f"rank {rank} not found among {pids}"
            sent_at = time.monotonic()
            os.kill(pids[rank], sig)
            break
        assert time.monotonic() < deadline, "no progress line in time"
    assert sent_at is not None, "training ended before the signal: " + "".join(lines)[-2000:]
    out, err = p.communicate(timeout=timeout)
    took = time.monotonic() - sent_at
    return Run(p.returncode, "".join(lines) + out, err, _summary(tmp)), took
