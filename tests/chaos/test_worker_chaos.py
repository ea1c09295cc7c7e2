"""Kill the real training and export workers anywhere, then resume: nothing is lost.

Training trials (full fine-tune and LoRA in turn): one or two interrupted runs, each stopped with
SIGKILL or SIGTERM at a drawn point — during start-up (imports, model load), mid-step, while a checkpoint is being
written (watched on the file system, or through the worker's kill-in-save hook), right after a
checkpoint is published (during rotation), while final/ is published — sometimes followed by
corrupting the newest checkpoint on purpose. A last run completes. Checked:
- each interrupted run exits as promised (SIGKILL -9; SIGTERM 75 with a valid checkpoint named in
  its summary, or 0 when it had finished — never 143/-15, even during start-up) and leaves no invalid checkpoint newer than a valid one;
- each run resumes from the newest checkpoint that is actually valid (checked independently);
- the final weights equal an uninterrupted run's (max abs diff <= 1e-6), nothing is left in
  staging, every remaining checkpoint is valid and rotation kept `keep` of them.

Export trials: an export stopped with SIGKILL or SIGTERM at a stage boundary (the worker's pause
hook), mid-shard-write or mid-publish (watched on the file system), or after a random delay,
sometimes while replacing an older export; then rerun. Checked: SIGTERM exits 75 (preempted, its
staging removed, the older export untouched) or 0; `export/` is at every observed moment absent or
one complete export; after the rerun there is exactly one complete export, equal to an
uninterrupted export, and nothing in staging.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import time
from pathlib import Path
from random import Random
from typing import Any

import pytest
from workerkit import (
    SIGNALS,
    Worker,
    checkpoint_fault,
    checkpoints,
    export_fault,
    export_weights,
    final_weights,
    max_abs_diff,
    newest_valid,
    staging_left,
)

from conftest import TRIALS, Baseline, Ledger, trial_rng

pytestmark = [pytest.mark.worker, pytest.mark.slow]
TOLERANCE = 1e-6
TRAIN_POINTS = ("startup", "mid-step", "mid-save", "after-publish", "final-publish", "hook:kill-in-save")
CORRUPTIONS = ("truncate-weights", "header-lie", "drop-optimizer", "truncate-optimizer", "garbage-state",
               "wrong-step", "emptied")  # fmt: skip


def corrupt(ckpt: Path, kind: str) -> None:
    weights = next(p for p in (ckpt / "model.safetensors", ckpt / "adapter_model.safetensors") if p.exists())
    if kind == "truncate-weights":
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif kind == "header-lie":
        with weights.open("r+b") as f:
            f.write((2**40).to_bytes(8, "little"))
    elif kind == "drop-optimizer":
        (ckpt / "optimizer.pt").unlink()
    elif kind == "truncate-optimizer":
        opt = ckpt / "optimizer.pt"
        with opt.open("r+b") as f:
            f.truncate(int(opt.stat().st_size * 0.6))
    elif kind == "garbage-state":
        (ckpt / "trainer_state.json").write_text("{not json")
    elif kind == "wrong-step":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state["global_step"] += 1
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    elif kind == "emptied":
        for p in ckpt.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (SigCgt in /proc; True where there is no /proc).
    No program can honour a SIGTERM that comes before that: the interpreter's own start-up is the floor."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    caught = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), None)
    return caught is None or bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def signal_at_startup(w: Worker, sig: int, rng: Random, upto: float) -> bool:
    time.sleep(rng.uniform(0.2, upto))
    if sig == signal.SIGTERM and not w.wait_path(lambda: handles_sigterm(w.proc.pid), timeout=30):
        return False
    return w.signal(sig)


def aim(w: Worker, point: str, sig: int, rng: Random, spec: dict[str, Any], done: int) -> bool:
    """Wait for `point` in w's run (which resumes after step `done`) and send sig there. True when the
    signal was sent at the point."""
    t = spec["training"]
    every, steps = t["checkpoint"]["everySteps"], t["maxSteps"]
    ckpts = w.ws / "checkpoints"
    if point == "startup":
        return signal_at_startup(w, sig, rng, 5.0)
    if point == "mid-step":
        target = rng.randint(min(done + 1, steps - 1), steps - 1)
        ev = w.wait_event(lambda e: e.get("event") in ("progress", "checkpoint") and (e.get("step") or 0) >= target)
        if ev is None:
            return False
        time.sleep(rng.uniform(0.0, 0.35))
        return w.signal(sig)
    if point in ("mid-save", "after-publish"):
        step = rng.choice([s for s in range(every, steps + 1, every) if s > done] or [steps])
        if point == "mid-save":
            prefix = f".staging-checkpoint-{step}-"
            reached = w.wait_path(lambda: ckpts.is_dir() and any(p.name.startswith(prefix) for p in ckpts.iterdir()))
            if reached:
                time.sleep(rng.uniform(0.0, 0.03))
        else:
            reached = w.wait_path(lambda: (ckpts / f"checkpoint-{step}").is_dir())
        return reached and w.signal(sig)
    if point == "final-publish":
        reached = w.wait_path(lambda: any(p.name.startswith(".staging-final-") for p in w.ws.iterdir()))
        if reached:
            time.sleep(rng.uniform(0.0, 0.02))
        return reached and w.signal(sig)
    raise AssertionError(point)


def check_resumed_from(w: Worker, expected: str | None) -> None:
    for start in w.event("start")[:1]:
        assert start.get("resumeFrom") == expected, (
            f"resumed from {start.get('resumeFrom')}, but the newest valid checkpoint was {expected}; "
            f"skipped: {w.event('checkpointSkipped')}")  # fmt: skip


def check_interrupted(w: Worker, code: int, signame: str, hit: bool, corrupted: set[str]) -> None:
    ws = w.ws
    summary = w.summary()
    if hit and signame == "SIGKILL":
        assert code in (-9, 0), f"SIGKILL: exit {code}\n{w.stderr()}"
    if hit and signame == "SIGTERM":
        assert code in (75, 0), f"SIGTERM: exit {code} (expected 75 preempted or 0 done)\n{w.stderr()}"
        if code == 75:
            assert summary.get("result") == "preempted", summary
            named = summary.get("checkpoint")
            if named is not None:
                assert checkpoint_fault(ws / "checkpoints" / named) is None, f"summary names a bad checkpoint {named}"
                assert named == newest_valid(ws), f"summary names {named}, newest valid is {newest_valid(ws)}"
                if summary.get("step") is not None:
                    assert named == f"checkpoint-{summary['step']}", summary
    valid = [p for p in checkpoints(ws) if checkpoint_fault(p) is None]
    for p in checkpoints(ws):
        if p.name in corrupted or p in valid:
            continue
        # A kill during rotation may leave an older checkpoint half-deleted; never a newer one half-written.
        assert valid and int(p.name[11:]) < int(valid[0].name[11:]), \
            f"{p.name} is invalid ({checkpoint_fault(p)}) and not older than a valid one: {[v.name for v in valid]}"  # fmt: skip
    final = ws / "final"
    if final.exists():
        assert (final / "training.json").is_file(), "final/ published without training.json"


@pytest.mark.parametrize("trial", range(TRIALS))
def test_training_killed_anywhere_resumes_to_identical_weights(
    trial: int, baselines: dict[bool, Baseline], tmp_path: Path, ledger: Ledger, request: pytest.FixtureRequest
) -> None:
    rng = trial_rng(request.node.nodeid, trial)
    lora = trial % 2 == 1
    base = baselines[lora]
    spec = copy.deepcopy(base.spec)
    ws = tmp_path / "ws"
    ws.mkdir()
    corrupted: set[str] = set()
    suite = "train-lora" if lora else "train-full"
    ledger.trials[suite] += 1
    story = []
    for _ in range(rng.randint(1, 2)):
        point = rng.choice(TRAIN_POINTS)
        signame = "SIGKILL" if point.startswith("hook:") else rng.choice(("SIGKILL", "SIGTERM"))
        env = {}
        expected = newest_valid(ws)
        done = int(expected[11:]) if expected else 0
        if point == "hook:kill-in-save":
            env["FINETUNE_FAULT"] = f"kill-in-save:{rng.choice([s for s in range(2, 17, 2) if s > done] or [16])}"
        w = Worker("train", spec, ws, env=env)
        ledger.runs += 1
        hit = True if point.startswith("hook:") else aim(w, point, SIGNALS[signame], rng, spec, done)
        code = w.wait()
        if point.startswith("hook:"):
            hit = code == -9
        (ledger.points if hit else ledger.missed)[f"{suite}:{point}:{signame}"] += 1
        story.append(f"{point}/{signame} -> exit {code}{'' if hit else ' (missed)'}")
        check_resumed_from(w, expected)
        check_interrupted(w, code, signame, hit, corrupted)
        if checkpoints(ws) and rng.random() < 0.35:
            kind = rng.choice(CORRUPTIONS)
            victim = checkpoints(ws)[0]
            corrupt(victim, kind)
            corrupted.add(victim.name)
            ledger.corruptions[kind] += 1
            story.append(f"corrupted {victim.name}: {kind}")

    expected = newest_valid(ws)
    w = Worker("train", spec, ws)
    ledger.runs += 1
    code = w.wait()
    assert code == 0, f"{story}: final run exit {code}\n{w.stderr()}"
    assert w.summary().get("result") == "completed"
    check_resumed_from(w, expected)
    diff = max_abs_diff(final_weights(ws, lora), base.weights())
    assert diff <= TOLERANCE, f"{story}: final weights differ from an uninterrupted run by {diff}"
    assert staging_left(ws) == [], f"{story}: staging left: {staging_left(ws)}"
    left = checkpoints(ws)
    assert left and all(checkpoint_fault(p) is None for p in left), (story, [(p.name, checkpoint_fault(p)) for p in left])
    assert len(left) <= spec["training"]["checkpoint"]["keep"], [p.name for p in left]


# ----------------------------------------------------------------------------- export

EXPORT_POINTS = ("startup", "delay", "pause:start", "pause:merged", "pause:formatted", "pause:verified",
                 "pause:publishing", "mid-write", "mid-publish")  # fmt: skip


def aim_export(w: Worker, point: str, sig: int, rng: Random) -> bool:
    ws = w.ws
    if point == "startup":
        return signal_at_startup(w, sig, rng, 4.0)
    if point == "delay":
        if w.wait_event(lambda e: e.get("stage") == "start") is None:
            return False
        time.sleep(rng.uniform(0.0, 1.5))
        return w.signal(sig)
    if point.startswith("pause:"):
        ev = w.wait_event(lambda e: e.get("stage") == "paused")
        return ev is not None and w.signal(sig)
    if point == "mid-write":
        def writing() -> bool:
            return any(p.name.startswith(".staging-export-") and not p.name.startswith(".staging-export-retired-")
                       and any(p.rglob("*.safetensors")) for p in ws.iterdir())  # fmt: skip
        reached = w.wait_path(writing)
        if reached:
            time.sleep(rng.uniform(0.0, 0.05))
        return reached and w.signal(sig)
    if point == "mid-publish":
        reached = w.wait_path(lambda: any(p.name.startswith(".staging-export-retired-") for p in ws.iterdir())
                              or (w.event("export") and w.events[-1].get("stage") == "publishing"), poll=0.0005)  # fmt: skip
        return reached and w.signal(sig)
    raise AssertionError(point)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_export_killed_anywhere_leaves_one_complete_export_after_a_rerun(
    trial: int, baselines: dict[bool, Baseline], export_baseline: tuple[Path, dict[str, Any]], tmp_path: Path,
    ledger: Ledger, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    rng = trial_rng(request.node.nodeid, trial)
    base_ws, reference = export_baseline
    ws = tmp_path / "ws"
    shutil.copytree(baselines[True].ws, ws)
    spec = copy.deepcopy(baselines[True].spec)
    replacing = rng.random() < 0.5
    if replacing:  # an older export is in place: the rerun must replace it atomically
        shutil.copytree(base_ws / "export", ws / "export")
        spec["export"]["normalize"] = False  # other settings: the old export is not current
    ledger.trials["export-replace" if replacing else "export"] += 1
    point = rng.choice(EXPORT_POINTS)
    signame = rng.choice(("SIGKILL", "SIGTERM"))
    old = (ws / "export" / "metadata.json").read_bytes() if replacing else None
    env = {"FINETUNE_EXPORT_PAUSE_AFTER": point.split(":", 1)[1]} if point.startswith("pause:") else {}
    w = Worker("export", spec, ws, env=env)
    ledger.runs += 1
    hit = aim_export(w, point, SIGNALS[signame], rng)
    code = w.wait()
    label = f"export{'-replace' if replacing else ''}:{point}:{signame}"
    (ledger.points if hit else ledger.missed)[label] += 1
    if (ws / "export").exists():
        assert export_fault(ws) is None, f"{label}: export/ is incomplete after the kill: {export_fault(ws)}"
    if hit and signame == "SIGKILL":
        assert code in (-9, 0), f"{label}: exit {code}\n{w.stderr()}"
    if hit and signame == "SIGTERM":
        assert code in (75, 0), f"{label}: exit {code} (expected 75 preempted or 0 done)\n{w.stderr()}"
    if code == 75:  # preempted: cleaned up after itself, published nothing, kept what was there
        assert w.summary().get("result") == "preempted", w.summary()
        assert staging_left(ws) == [], f"{label}: staging left after exit 75: {staging_left(ws)}"
        now = (ws / "export" / "metadata.json").read_bytes() if (ws / "export").exists() else None
        assert now == old, f"{label}: exit 75 changed export/"

    w = Worker("export", spec, ws)
    ledger.runs += 1
    code = w.wait()
    assert code == 0, f"{label}: rerun exit {code}\n{w.stderr()}"
    assert export_fault(ws) is None, export_fault(ws)
    assert staging_left(ws) == [], staging_left(ws)
    assert [p.name for p in ws.iterdir() if p.name.startswith("export")] == ["export"]
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta.get("normalize") is (not replacing), f"{label}: export/ holds the old export's settings: {meta.get('normalize')}"
    diff = max_abs_diff(export_weights(ws), reference)
    assert diff <= TOLERANCE, f"{label}: exported weights differ from an uninterrupted export by {diff}"
