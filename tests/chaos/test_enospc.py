"""Disk full (ENOSPC injected by faultinject/sitecustomize.py, no production hook) during a
checkpoint, during the publication of final/, and during an export: the worker fails clearly
(exit 1, retried by the operator; "No space left on device" in its termination summary), the
previous checkpoint or export stays valid, nothing half-written looks complete, and a retry with
space back succeeds with the same result as a run that never failed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from workerkit import (
    FAULTINJECT,
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

from conftest import Baseline, Ledger

pytestmark = [pytest.mark.worker, pytest.mark.slow]
TOLERANCE = 1e-6


def disk_full(paths: str, budget: int) -> dict[str, str]:
    return {"PYTHONPATH": str(FAULTINJECT), "FAULT_ENOSPC_PATHS": paths, "FAULT_ENOSPC_BUDGET": str(budget)}


def assert_clear_failure(w: Worker, code: int) -> None:
    summary = w.summary()
    assert code == 1, f"disk full: exit {code} (expected 1, a retryable failure)\n{w.stderr()}"
    assert summary.get("result") == "failed", summary
    assert "No space left on device" in summary.get("message", ""), summary


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_a_retry_succeeds(
    lora: bool, baselines: dict[bool, Baseline], tmp_path: Path, ledger: Ledger
) -> None:
    base = baselines[lora]
    ws = tmp_path / "ws"
    # room for two and a half checkpoints: the third save runs out of space part-way through a file
    w = Worker("train", base.spec, ws, env=disk_full("/checkpoints/", int(base.bytes_per_checkpoint * 2.5)))
    ledger.runs += 1
    code = w.wait()
    ledger.trials["enospc"] += 1
    ledger.point("enospc", f"train-{'lora' if lora else 'full'}:checkpoint-write")
    assert_clear_failure(w, code)
    assert [e["name"] for e in w.event("checkpoint")] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in checkpoints(ws)] == ["checkpoint-4", "checkpoint-2"], "a half-written checkpoint was published"
    assert checkpoint_fault(ws / "checkpoints" / "checkpoint-4") is None
    assert not (ws / "final").exists()

    retry = Worker("train", base.spec, ws)
    ledger.runs += 1
    assert retry.wait() == 0, retry.stderr()
    assert retry.event("start")[0]["resumeFrom"] == "checkpoint-4"
    assert max_abs_diff(final_weights(ws, lora), base.weights()) <= TOLERANCE
    assert staging_left(ws) == []


def test_disk_full_while_publishing_final_keeps_the_checkpoints_and_a_retry_publishes(
    baselines: dict[bool, Baseline], tmp_path: Path, ledger: Ledger
) -> None:
    base = baselines[True]
    ws = tmp_path / "ws"
    w = Worker("train", base.spec, ws, env=disk_full("/.staging-final-", 2048))
    ledger.runs += 1
    code = w.wait()
    ledger.trials["enospc"] += 1
    ledger.point("enospc", "train-lora:final-publish")
    assert_clear_failure(w, code)
    assert not (ws / "final").exists(), "final/ published although writing it failed"
    assert newest_valid(ws) == "checkpoint-16"

    retry = Worker("train", base.spec, ws)
    ledger.runs += 1
    assert retry.wait() == 0, retry.stderr()
    assert max_abs_diff(final_weights(ws, True), base.weights()) <= TOLERANCE
    assert staging_left(ws) == []


@pytest.mark.parametrize("replacing", [False, True], ids=["first", "replacing"])
def test_disk_full_during_an_export_leaves_no_export_or_the_old_one_and_a_retry_succeeds(
    replacing: bool, baselines: dict[bool, Baseline], export_baseline: tuple[Path, dict[str, Any]],
    tmp_path: Path, ledger: Ledger,
) -> None:  # fmt: skip
    base_ws, reference = export_baseline
    ws = tmp_path / "ws"
    shutil.copytree(baselines[True].ws, ws)
    spec = copy.deepcopy(baselines[True].spec)
    if replacing:
        shutil.copytree(base_ws / "export", ws / "export")
        spec["export"]["normalize"] = False
    size = sum(json.loads((base_ws / "export" / "metadata.json").read_text())["files"].values())
    w = Worker("export", spec, ws, env=disk_full("/.staging-export-", size // 3))
    ledger.runs += 1
    code = w.wait()
    ledger.trials["enospc"] += 1
    ledger.point("enospc", f"export{'-replace' if replacing else ''}:shard-write")
    assert_clear_failure(w, code)
    if replacing:
        assert export_fault(ws) is None, "the previous export was damaged by a failed replacement"
        assert json.loads((ws / "export" / "metadata.json").read_text())["normalize"] is True
    else:
        assert not (ws / "export").exists(), "an export was published although writing it failed"
    assert staging_left(ws) == [], f"a failed export left staging behind: {staging_left(ws)}"

    retry = Worker("export", spec, ws)
    ledger.runs += 1
    assert retry.wait() == 0, retry.stderr()
    assert export_fault(ws) is None and staging_left(ws) == []
    assert max_abs_diff(export_weights(ws), reference) <= TOLERANCE
