"""Staging and atomic publication of `<workspace>/export/`.

Everything is built in `<workspace>/.staging-export-<pid>-<random>/` (a name that never looks like
an export or a checkpoint), fsynced, then published as `export/` by `atomic.replace_dir`: renamed
in when there is no older export, else swapped with the older one in one step, so `export/` is
at every instant absent (never published), the old complete export, or the new complete one.
Where the filesystem cannot swap (NFS: the two-rename fallback), a kill between the renames
leaves the older export parked as `.staging-export-retired-*` and no `export/`; `clean_stale`,
which every export runs first, renames it back before removing staging. A killed export
otherwise leaves only a staging directory, which the next run removes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_api.contract import EXPORT_DIR, EXPORT_METADATA, STAGING_PREFIX

from ..atomic import replace_dir, restore_aside

STAGING = f"{STAGING_PREFIX}export-"
RETIRED = f"{STAGING_PREFIX}export-retired-"
log = logging.getLogger("finetune_worker.export")


def clean_stale(workspace: Path) -> list[str]:
    """Put back an older export that a killed publish had parked (when `export/` is missing), then
    remove staging dirs left by killed exports. Returns the names removed."""
    removed = []
    if workspace.is_dir():
        restored = restore_aside(
            workspace / EXPORT_DIR, RETIRED, complete=lambda p: export_problem(p) is None
        )
        if restored:
            log.info(
                "a publish was interrupted halfway: the previous export (%s) is back in %s/",
                restored,
                EXPORT_DIR,
            )
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


def publish(staging: Path, workspace: Path, *, on_aside: Callable[[], None] | None = None) -> Path:
    """Make the complete staging dir `<workspace>/export`, replacing an older export without a gap.

    on_aside: a test hook, called while the two-rename fallback has the older export parked.
    """
    target = workspace / EXPORT_DIR
    replace_dir(staging, target, workspace / f"{RETIRED}{secrets.token_hex(4)}", on_aside=on_aside)
    return target


def export_problem(root: Path) -> str | None:
    """Why the export directory `root` is not a complete export, or None when it is: metadata.json
    (written last) parses and every file it lists is there with the size it had when published."""
    try:
        meta = json.loads((root / EXPORT_METADATA).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {EXPORT_METADATA} ({e})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{EXPORT_METADATA} lists no files"
    for rel, size in files.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size:
            return f"{rel} is missing or not {size} bytes"
    return None


def current_export(workspace: Path, fingerprint: str) -> dict[str, Any] | None:
    """The metadata of a complete export made from the same input and settings, else None."""
    root = workspace / EXPORT_DIR
    if export_problem(root) is not None:
        return None
    meta: dict[str, Any] = json.loads((root / EXPORT_METADATA).read_text())
    return meta if meta.get("fingerprint") == fingerprint else None
