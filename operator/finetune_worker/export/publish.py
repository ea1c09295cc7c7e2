"""Staging and atomic publication of `<workspace>/export/`.

Everything is built in `<workspace>/.staging-export-<pid>-<random>/` (a name that never looks like
an export or a checkpoint), fsynced, then renamed to `export/` in one step. An older export is
first renamed aside and removed after the new one is in place, so `export/` is at every instant
either absent, the old complete export, or the new complete export. A killed export leaves only
a staging directory, which the next run removes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from finetune_operator.contract import EXPORT_DIR, EXPORT_METADATA, STAGING_PREFIX

STAGING = f"{STAGING_PREFIX}export-"
RETIRED = f"{STAGING_PREFIX}export-retired-"


def clean_stale(workspace: Path) -> list[str]:
    """Remove staging dirs left by killed exports. Returns their names."""
    removed = []
    if workspace.is_dir():
        for p in workspace.iterdir():
            if p.name.startswith(STAGING) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def new_staging(workspace: Path) -> Path:
    workspace.mkdir(parents=True, exist_ok=True)
    p = workspace / f"{STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    p.mkdir()
    return p


def file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
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


def publish(staging: Path, workspace: Path) -> Path:
    """Atomically replace `<workspace>/export` with the staging dir."""
    _fsync_tree(staging)
    target = workspace / EXPORT_DIR
    retired = None
    if target.exists():
        retired = workspace / f"{RETIRED}{secrets.token_hex(4)}"
        os.rename(target, retired)
    os.rename(staging, target)
    _fsync_dir(workspace)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return target


def current_export(workspace: Path, fingerprint: str) -> dict[str, Any] | None:
    """The metadata of a complete export made from the same input and settings, else None.

    Complete means: metadata.json parses, its fingerprint matches, and every file it lists is
    there with the size it had when published.
    """
    meta_path = workspace / EXPORT_DIR / EXPORT_METADATA
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    root = workspace / EXPORT_DIR
    for rel, size in (meta.get("files") or {}).items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return meta if meta.get("files") else None
