"""Checkpoints on the workspace: which are valid, which to resume from, atomic publishing, rotation.

A checkpoint is only ever published by renaming a complete `.staging-*` directory to
`checkpoint-N` (atomic.py), so a kill during a save leaves a staging directory (cleaned on the next start),
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

from finetune_api.contract import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    STAGING_PREFIX,
    checkpoint_name,
    checkpoint_step,
)

from .atomic import replace_dir, restore_aside

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
REQUIRED_PICKLES = ("optimizer.pt", "scheduler.pt")  # torch.save zip archives
OPTIONAL_PICKLES = ("rng_state.pth", "loss_state.pt")
FINAL_STAGING_PREFIX = f"{STAGING_PREFIX}{FINAL_DIR}-"  # where final/ is built before its rename
ASIDE_PREFIX = f"{STAGING_PREFIX}old-"  # `.staging-old-<name>-<pid>`: an older <name> during its replacement


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
    rank_states = sorted(p.name for p in path.glob("rng_state_*.pth"))  # one per rank of a distributed run
    for name in (*REQUIRED_PICKLES, *OPTIONAL_PICKLES, *rank_states, *needs):
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


def _parked(root: Path) -> set[str]:
    """Names whose older copy a replacement parked in root as `.staging-old-<name>-<pid>`."""
    if not root.is_dir():
        return set()
    return {p.name[len(ASIDE_PREFIX) :].rpartition("-")[0] for p in root.iterdir() if p.name.startswith(ASIDE_PREFIX)}


def clean_staging(workspace: Path) -> list[str]:
    """Remove leftover staging directories of training (a checkpoint save or final/ publish that was
    killed): everything `.staging-*` under checkpoints/, and `.staging-final-*` / `.staging-old-final-*`
    in the workspace. First, an older checkpoint or final/ parked aside by a replacement that was
    killed halfway is renamed back. Returns the names removed."""
    ws, ckpts = Path(workspace), checkpoints_dir(workspace)
    for name in _parked(ws) & {FINAL_DIR}:
        restore_aside(ws / name, f"{ASIDE_PREFIX}{name}-")
    for name in _parked(ckpts):
        if checkpoint_step(name) is not None:
            restore_aside(ckpts / name, f"{ASIDE_PREFIX}{name}-")
    removed = []
    for root, prefixes in ((ws, (FINAL_STAGING_PREFIX, f"{ASIDE_PREFIX}{FINAL_DIR}-")), (ckpts, (STAGING_PREFIX,))):
        if root.is_dir():
            for p in sorted(root.iterdir()):
                if p.name.startswith(prefixes):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p.name)
    return removed


def publish_dir(staging: Path, final: Path) -> None:
    """Make a complete staging directory visible under its final name (a checkpoint, or final/).

    An older `final` (a re-save of the same step) is replaced without a gap (see atomic.py); where
    the filesystem forces the two-rename fallback and a kill lands between them, the next start's
    `clean_staging` renames the older one back.
    """
    replace_dir(staging, final, final.with_name(f"{ASIDE_PREFIX}{final.name}-{os.getpid()}"))


def rotate(workspace: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints. Returns the names removed."""
    removed = []
    for p in list_checkpoints(workspace)[keep:]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def staging_for(workspace: Path, step: int, *, shared: bool = False) -> Path:
    """Where a checkpoint is built: per process, or (`shared`, distributed) one directory all ranks write into."""
    return checkpoints_dir(workspace) / f"{STAGING_PREFIX}{checkpoint_name(step)}-{'ranks' if shared else os.getpid()}"
