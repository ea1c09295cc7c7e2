"""The termination summary (<4 KiB JSON in /dev/termination-log) and JSON progress lines."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from finetune_api.contract import PROGRESS_KEY, TERMINATION_LOG, TERMINATION_SUMMARY_MAX_BYTES

TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"  # tests and the local executor point this elsewhere
RANK_SUMMARIES_ENV = "FINETUNE_RANK_SUMMARIES"  # set by launch.py: each rank's summary goes to <dir>/rank-<RANK>.json
QUIET_ON_OTHER_RANKS = ("result",)  # ranks other than 0 print only these events, and only when they failed
LOUD_RESULTS = ("failed", "invalid")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def termination_log_path() -> str:
    ranks = os.environ.get(RANK_SUMMARIES_ENV)
    if ranks:
        return os.path.join(ranks, f"rank-{_rank()}.json")
    return os.environ.get(TERMINATION_LOG_ENV, TERMINATION_LOG)


def write_summary(summary: dict[str, Any]) -> None:
    """Write the summary where the kubelet reads it; silently skip when the file can't exist."""
    path = termination_log_path()
    if os.environ.get(RANK_SUMMARIES_ENV):
        summary = {**summary, "worldSize": _world(), "rank": _rank()}
    elif path != os.environ.get(TERMINATION_LOG_ENV) and not os.path.exists(path):
        return
    data = json.dumps(summary, separators=(",", ":"), default=str)
    if len(data.encode()) > TERMINATION_SUMMARY_MAX_BYTES:
        msg = str(summary.get("message", ""))
        summary = {**summary, "message": msg[: max(0, len(msg) - (len(data.encode()) - TERMINATION_SUMMARY_MAX_BYTES) - 16)] + "…"}
        data = json.dumps(summary, separators=(",", ":"), default=str)[:TERMINATION_SUMMARY_MAX_BYTES]
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(data)
    except OSError:
        pass


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, e.g. emit("progress", step=3, totalSteps=10, loss=0.5).

    Distributed (WORLD_SIZE > 1): rank 0 speaks for the job and its lines carry worldSize; the
    other ranks stay quiet unless they fail (their failed/invalid result line, tagged with rank)."""
    world = _world()
    if world > 1:
        if _rank() != 0:
            if event not in QUIET_ON_OTHER_RANKS or fields.get("result") not in LOUD_RESULTS:
                return
            fields = {**fields, "rank": _rank()}
        fields = {**fields, "worldSize": world}
    line = {PROGRESS_KEY: event, "time": round(time.time(), 3), **fields}
    sys.stdout.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()
