"""Checkpoints on the workspace: which are valid, which to resume from, atomic publishing, rotation.

A checkpoint is only ever published by renaming a complete `.staging-*` directory to
`checkpoint-N`, so a kill during a save leaves a staging directory (cleaned on the next start),
never a `checkpoint-N` that looks valid and is not. Validation still checks every file, because
disks fill up, copies get truncated and people edit workspaces by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

from finetune_operator.contract import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    STAGING_PREFIX,
    checkpoint_name,
    checkpoint_step,
)

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
REQUIRED_PICKLES = ("optimizer.pt", "scheduler.pt")  # torch.save zip archives
OPTIONAL_PICKLES = ("rng_state.pth", "loss_state.pt")
FINAL_STAGING_PREFIX = f"{STAGING_PREFIX}{FINAL_DIR}-"  # where final/ is built before its rename


def checkpoints_dir(workspace: Path) -> Path:
    return Path(workspace) / CHECKPOINTS_DIR


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is broken (bad header, truncated data), or None when it is sound."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "shorter than a header"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                return f"header length {n} exceeds the file"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({e})"
    if not isinstance(header, dict):
        return "header is not an object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"tensor {name!r} has no data offsets"
    if size < 8 + n + end:
        return f"truncated: {size} bytes, header promises {8 + n + end}"
    return None


def _zip_problem(path: Path) -> str | None:
    """Why a torch.save archive is unusable: truncated (no central directory) or a member failing its CRC.

    Reading every member costs one pass over the file, which also warms the page cache for torch.load."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"not a complete torch archive ({e})"
    return f"member {bad} fails its CRC check" if bad else None


def checkpoint_problem(path: Path, needs: Iterable[str] = ()) -> str | None:
    """Why a `checkpoint-N` directory cannot be resumed from, or None when it can.

    Args:
        path: the checkpoint directory.
        needs: extra files this run requires (e.g. the TSDAE loss state).
    """
    step = checkpoint_step(path.name)
    if step is None or not path.is_dir():
        return "not a checkpoint directory"
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{TRAINER_STATE} missing"
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE} does not parse ({e})"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"{TRAINER_STATE} is for step {state.get('global_step') if isinstance(state, dict) else '?'}, not {step}"
    weights = [path / w for w in WEIGHT_FILES if (path / w).exists()]
    if not weights:
        return f"no weights ({' or '.join(WEIGHT_FILES)})"
    for w in weights:
        why = safetensors_problem(w)
        if why:
            return f"{w.name}: {why}"
    for name in REQUIRED_PICKLES:
        if not (path / name).exists():
            return f"{name} missing"
    for name in (*REQUIRED_PICKLES, *OPTIONAL_PICKLES, *needs):
        p = path / name
        if name in needs and not p.exists():
            return f"{name} missing"
        if p.exists():
            why = _zip_problem(p)
            if why:
                return f"{name}: {why}"
    return None


def list_checkpoints(workspace: Path) -> list[Path]:
    """`checkpoint-N` directories, newest (highest step) first."""
    root = checkpoints_dir(workspace)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted(((s, p) for s, p in found if s is not None), reverse=True)]


def resolve_resume_checkpoint(workspace: Path, needs: Iterable[str] = ()) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest valid checkpoint (None for a fresh start) and the (name, reason) of each skipped one."""
    skipped: list[tuple[str, str]] = []
    needs = tuple(needs)
    for p in list_checkpoints(workspace):
        why = checkpoint_problem(p, needs)
        if why is None:
            return p, skipped
        skipped.append((p.name, why))
    return None, skipped


def clean_staging(workspace: Path) -> list[str]:
    """Remove leftover staging directories of training (a checkpoint save or final/ publish that was
    killed): everything `.staging-*` under checkpoints/, and `.staging-final-*` in the workspace.
    Returns their names."""
    removed = []
    for root, prefix in ((Path(workspace), FINAL_STAGING_PREFIX), (checkpoints_dir(workspace), STAGING_PREFIX)):
        if root.is_dir():
            for p in sorted(root.iterdir()):
                if p.name.startswith(prefix):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p.name)
    return removed


def fsync_tree(path: Path) -> None:
    """Flush every file under path, and the directories, to disk (a rename is only as durable as its contents)."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(staging: Path, final: Path) -> None:
    """Atomically make a complete staging directory visible under its final name.

    An existing `final` (a re-save of the same step, or an older result) is moved aside first and
    removed after the rename, so there is never a moment where neither is complete.
    """
    fsync_tree(staging)
    old = None
    if final.exists():
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rotate(workspace: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints. Returns the names removed."""
    removed = []
    for p in list_checkpoints(workspace)[keep:]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def staging_for(workspace: Path, step: int) -> Path:
    return checkpoints_dir(workspace) / f"{STAGING_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
