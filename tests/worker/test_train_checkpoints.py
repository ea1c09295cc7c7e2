"""Resume picks the newest *valid* checkpoint: damaged ones are skipped with a reason, never crashed on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worker.trainkit import (
    checkpoint_names,
    pair_spec,
    train,
    train_and_sigterm_while_loading_torch,
    write_config,
)

pytestmark = pytest.mark.worker


def _truncate(p: Path, keep: float = 0.5) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _break_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8:12] = b"\xff\xfe{["
    p.write_bytes(bytes(data))


DAMAGE = {
    "optimizer truncated": (lambda d: _truncate(d / "optimizer.pt"), "optimizer.pt: not a complete torch archive"),
    "optimizer bit flip": (lambda d: _flip_byte(d / "optimizer.pt"), "optimizer.pt: member"),
    "scheduler missing": (lambda d: (d / "scheduler.pt").unlink(), "scheduler.pt missing"),
    "weights header broken": (lambda d: _break_header(d / "model.safetensors"), "model.safetensors: unreadable header"),
    "weights truncated": (lambda d: _truncate(d / "model.safetensors", 0.9), "model.safetensors: truncated"),
    "trainer state garbage": (lambda d: (d / "trainer_state.json").write_text('{"global_st'),
                              "trainer_state.json does not parse"),
    "trainer state missing": (lambda d: (d / "trainer_state.json").unlink(), "trainer_state.json missing"),
    "rng state truncated": (lambda d: _truncate(d / "rng_state.pth"), "rng_state.pth: not a complete torch archive"),
}


@pytest.fixture(scope="module")
def interrupted(_tiny_model_master: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A workspace killed at step 11 of 12 holding checkpoints 2, 4, 6, 8 and 10 (and its config)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    cfg = write_config(tmp, pair_spec(_tiny_model_master, every=2, keep=5))
    run = train(tmp, cfg, tmp / "ws", fault="kill-at-step:11")
    assert run.rc == -9, run.stderr[-2000:]
    assert checkpoint_names(tmp / "ws") == [f"checkpoint-{n}" for n in (10, 2, 4, 6, 8)]
    return cfg, tmp / "ws"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_kind_of_damage_is_named(damage: str, interrupted: tuple[Path, Path], tmp_path: Path) -> None:
    from finetune_worker.checkpoints import checkpoint_problem, resolve_resume_checkpoint

    ws = tmp_path / "ws"
    shutil.copytree(interrupted[1], ws)
    newest = ws / "checkpoints/checkpoint-10"
    assert checkpoint_problem(newest) is None
    hurt, reason = DAMAGE[damage]
    hurt(newest)
    assert reason in (checkpoint_problem(newest) or "")
    chosen, skipped = resolve_resume_checkpoint(ws)
    assert chosen == ws / "checkpoints/checkpoint-8"
    assert [name for name, _ in skipped] == ["checkpoint-10"]


def test_resume_skips_damaged_checkpoints_and_completes(interrupted: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, src = interrupted
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    cps = ws / "checkpoints"
    _truncate(cps / "checkpoint-10/optimizer.pt")
    (cps / "checkpoint-8/scheduler.pt").unlink()
    _break_header(cps / "checkpoint-6/model.safetensors")
    (cps / "checkpoint-4/trainer_state.json").write_text("not json")
    (cps / ".staging-checkpoint-12-999").mkdir()  # a save that was killed
    (cps / ".staging-checkpoint-12-999/model.safetensors").write_bytes(b"partial")

    run = train(tmp_path, cfg, ws)
    assert run.rc == 0, run.stderr[-2000:]
    assert run.summary and run.summary["result"] == "completed" and run.summary["resumedFrom"] == "checkpoint-2"
    skipped = {e["name"]: e["reason"] for e in run.events("checkpointSkipped")}
    assert list(skipped) == ["checkpoint-10", "checkpoint-8", "checkpoint-6", "checkpoint-4"]
    assert "optimizer.pt" in skipped["checkpoint-10"] and "scheduler.pt missing" in skipped["checkpoint-8"]
    assert "model.safetensors" in skipped["checkpoint-6"] and "trainer_state.json" in skipped["checkpoint-4"]
    assert [e["name"] for e in run.events("cleaned")] == [".staging-checkpoint-12-999"]
    assert run.events("progress")[0]["step"] == 3
    # the damaged ones were replaced by good saves as training passed their steps again
    from finetune_worker.checkpoints import checkpoint_problem

    assert all(checkpoint_problem(p) is None for p in cps.iterdir())
    assert checkpoint_names(ws) == [f"checkpoint-{n}" for n in (10, 12, 4, 6, 8)]
    assert json.loads((ws / "final/training.json").read_text())["steps"] == 12


def test_empty_and_missing_workspace_start_fresh(tmp_path: Path) -> None:
    from finetune_worker.checkpoints import resolve_resume_checkpoint

    assert resolve_resume_checkpoint(tmp_path / "absent") == (None, [])
    (tmp_path / "ws/checkpoints/checkpoint-x").mkdir(parents=True)  # not a step number: ignored
    (tmp_path / "ws/checkpoints/.staging-checkpoint-3-1").mkdir()
    (tmp_path / "ws/checkpoints/checkpoint-\uff11\uff12").mkdir()  # full-width "12": not ours, never skipped+removed
    assert resolve_resume_checkpoint(tmp_path / "ws") == (None, [])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/<pid>/maps (Linux)")
def test_sigterm_during_startup_exits_75_and_loses_no_checkpoint(interrupted: tuple[Path, Path], tmp_path: Path) -> None:
    from finetune_worker.checkpoints import checkpoint_problem

    cfg, src = interrupted
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    before = {p.name: sorted(f.name for f in p.iterdir()) for p in (ws / "checkpoints").iterdir()}
    run = train_and_sigterm_while_loading_torch(tmp_path, cfg, ws)  # before the handler of old was installed
    assert run.rc == 75, f"exit {run.rc}\n{run.stderr[-2000:]}"
    assert run.summary is not None and run.summary["result"] == "preempted", run.summary
    assert run.summary["step"] is None and "before training began" in run.summary["message"]
    assert run.summary["checkpoint"] in (None, "checkpoint-10")  # nothing trained: nothing new to name
    assert [e["signal"] for e in run.events("preemption")] == ["SIGTERM"]
    assert not run.events("progress") and not (ws / "final").exists()  # never claims completion
    after = {p.name: sorted(f.name for f in p.iterdir()) for p in (ws / "checkpoints").iterdir()}
    assert after == before and all(checkpoint_problem(ws / "checkpoints" / n) is None for n in after)


def test_the_cli_module_loads_no_ml_library() -> None:
    """main() installs the SIGTERM watch first thing; importing the CLI must not pull in torch before it."""
    import subprocess
    import sys

    code = ("import sys, finetune_worker.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers', 'peft', 'datasets') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_finished_run_started_again_removes_a_damaged_newest_checkpoint(interrupted: tuple[Path, Path], tmp_path: Path) -> None:
    """Found by the chaos suite (seed 20261201): checkpoint-12 damaged after the run had finished;
    the rerun said "already trained" and left it, newer than every good checkpoint."""
    cfg, src = interrupted
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    assert train(tmp_path, cfg, ws).rc == 0  # resumes from checkpoint-10 and finishes: final/, checkpoint-12
    _truncate(ws / "checkpoints" / "checkpoint-12" / "model.safetensors", 0.9)
    again = train(tmp_path, cfg, ws)
    assert again.rc == 0 and again.summary and again.summary["message"] == "already trained: final/ exists"
    assert [e["name"] for e in again.events("checkpointSkipped")] == ["checkpoint-12"]
    assert "checkpoint-12" not in checkpoint_names(ws) and "checkpoint-10" in checkpoint_names(ws)


def test_a_sigterm_while_the_process_shuts_down_does_not_change_its_exit_code(tmp_path: Path) -> None:
    """Found by the chaos suite (seed 20261201): a SIGTERM after the run had finished, while the
    interpreter was shutting down, killed it with -15 (the watch was uninstalled on return), so a
    completed attempt looked failed. The console script keeps the watch to the end."""
    import subprocess
    import sys

    code = ("import atexit, os, signal; from finetune_worker import cli; "
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM)); "
            "cli.run()")  # fmt: skip
    argv = [sys.executable, "-c", code, "train", "--config", str(tmp_path / "missing.yaml"), "--workspace", str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "log")})  # fmt: skip
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])  # the config is missing: invalid, not killed


def test_a_killed_replacement_puts_the_older_checkpoint_and_final_back(tmp_path: Path) -> None:
    """The two-rename fallback of publish_dir killed between its renames leaves the older copy parked
    as `.staging-old-<name>-<pid>`; the next start renames it back instead of deleting it as staging."""
    from finetune_worker.checkpoints import clean_staging

    ws = tmp_path / "ws"
    for parked in (ws / "checkpoints" / ".staging-old-checkpoint-8-4242", ws / ".staging-old-final-4242"):
        parked.mkdir(parents=True)
        (parked / "marker").write_text(parked.name)
    (ws / "checkpoints" / ".staging-checkpoint-10-4242").mkdir()  # an unfinished save: goes
    removed = clean_staging(ws)
    assert (ws / "checkpoints" / "checkpoint-8" / "marker").read_text() == ".staging-old-checkpoint-8-4242"
    assert (ws / "final" / "marker").read_text() == ".staging-old-final-4242"
    assert removed == [".staging-checkpoint-10-4242"]
    assert sorted(p.name for p in ws.rglob(".staging-*")) == []
