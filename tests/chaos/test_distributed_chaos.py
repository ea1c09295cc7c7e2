"""Distributed kill points (2 ranks under torchrun, gloo, a tiny BERT): SIGTERM to every rank at once
(the pod's agent, as a drain does), SIGKILL of one rank while the ranks write a checkpoint together,
SIGKILL of rank 0 mid-step. After each: the launch exits as promised (75, or a failure within a stated
bound) and every published checkpoint is valid; the last run completes with the weights of an uninterrupted
2-rank run (max abs diff <= 1e-6) and nothing left in staging."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from finetune_worker.checkpoints import checkpoint_problem, list_checkpoints
from worker.distkit import rank_pids, with_procs
from worker.trainkit import _cmd, _env, _summary, max_abs_diff, pair_spec, train, write_config

pytestmark = [pytest.mark.worker, pytest.mark.slow]
KILLED_RANK_EXIT_BOUND_S = 30  # a SIGKILLed rank: its gloo peers fail at once and torchrun stops the rest


def _start(tmp: Path, config: Path, ws: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"log-{time.monotonic_ns()}"
    with log.open("wb") as out:
        p = subprocess.Popen(_cmd(config, ws), env=_env(tmp, None), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    return p, log


def _wait_for(pred, p: subprocess.Popen[bytes], timeout: float = 240, poll: float = 0.001) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert p.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(poll)


def _consistent(ws: Path) -> None:
    """Every published checkpoint is valid: the shared staging directory is published by one rename
    only after every rank wrote its part, so no kill leaves a checkpoint-N that fails validation."""
    problems = {c.name: checkpoint_problem(c) for c in list_checkpoints(ws)}
    assert problems and all(why is None for why in problems.values()), problems


def test_distributed_kill_points_then_an_exact_finish(tiny_model: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, with_procs(pair_spec(tiny_model, steps=24, every=3, keep=2), 2))
    ref = train(tmp_path, cfg, tmp_path / "ref")
    assert ref.rc == 0, ref.stderr[-3000:]
    ws = tmp_path / "ws"
    ckpts = ws / "checkpoints"

    # 1. all ranks: SIGTERM to the launcher (the pod's main process); torchrun forwards it to every rank
    p, log = _start(tmp_path, cfg, ws)
    _wait_for(lambda: '"progress"' in log.read_text() and len(rank_pids(p.pid)) == 2, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(240) == 75, log.read_text()[-3000:]
    summary = _summary(tmp_path)
    assert summary and summary["result"] == "preempted" and summary["checkpoint"], summary
    _consistent(ws)

    # 2. one rank SIGKILLed while the ranks write a checkpoint into their shared staging directory
    p, log = _start(tmp_path, cfg, ws)
    _wait_for(lambda: ckpts.is_dir() and any(c.name.endswith("-ranks") for c in ckpts.iterdir()), p)
    os.kill(rank_pids(p.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    assert p.wait(240) == 1, log.read_text()[-3000:]
    assert time.monotonic() - killed < KILLED_RANK_EXIT_BOUND_S
    summary = _summary(tmp_path)
    assert summary and summary["result"] == "failed" and summary["rankExitCodes"]["1"] == -9, summary
    _consistent(ws)

    # 3. rank 0 SIGKILLed mid-training
    p, log = _start(tmp_path, cfg, ws)
    _wait_for(lambda: log.read_text().count('"progress"') >= 2, p)
    os.kill(rank_pids(p.pid)[0], signal.SIGKILL)
    killed = time.monotonic()
    assert p.wait(240) == 1, log.read_text()[-3000:]
    assert time.monotonic() - killed < KILLED_RANK_EXIT_BOUND_S
    _summary(tmp_path)
    _consistent(ws)

    done = train(tmp_path, cfg, ws)
    assert done.rc == 0, done.stderr[-3000:]
    assert done.summary and done.summary["resumedFrom"] is not None
    assert max_abs_diff(tmp_path / "ref/final/model.safetensors", ws / "final/model.safetensors") <= 1e-6
    assert not [c.name for c in ckpts.iterdir() if c.name.startswith(".staging")]
