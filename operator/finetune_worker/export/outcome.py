"""How an export ends: the termination summary, the last progress line and the exit code.

The one place where an export's errors become exit codes (the classes live in finetune_worker.errors):

| ending                  | exit | result    | message                                                   |
|-------------------------|------|-----------|-----------------------------------------------------------|
| published (or current)  | 0    | completed | exported <source> as <formats> (max deviation ...)        |
| Preempted (SIGTERM)     | 75   | preempted | export stopped by ...; staging removed, <what is kept>    |
| InvalidInput            | 2    | invalid   | export: <what is wrong>                                   |
| GateFailed              | 2    | invalid   | evaluation gate failed: ... (+ the metrics)               |
| InvalidAdapter          | 2    | invalid   | export verification failed (permanent, not retried): ...  |
| VerificationFailed      | 1    | failed    | export verification failed: ...                           |
| TransientError          | 1    | failed    | export: transient: ...                                    |
| anything else           | 1    | failed    | export failed: <type>: ... (traceback on stderr)          |
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from finetune_api.contract import (
    EXIT_COMPLETED,
    EXIT_INVALID,
    EXIT_PREEMPTED,
    EXPORT_DIR,
    EXPORT_METADATA,
    RESULT_COMPLETED,
    RESULT_FAILED,
    RESULT_INVALID,
    RESULT_PREEMPTED,
)
from finetune_api.spec import EVAL_METRICS

from ..errors import (
    EXIT_FAILED,
    GateFailed,
    InvalidAdapter,
    InvalidInput,
    Preempted,
    TransientError,
    VerificationFailed,
)
from ..summary import emit, write_summary


def completed(
    workspace: Path, meta: dict[str, Any], message: str, pushed: list[dict[str, Any]], seconds: float
) -> int:
    """Exit 0: the summary of a published (or already current) export, and its `done` line."""
    summary = {
        "result": RESULT_COMPLETED,
        "message": message,
        "export": str(workspace / EXPORT_DIR),
        "formats": meta.get("formats"),
        "maxDeviation": meta.get("maxDeviation"),
        "metrics": headline(meta.get("metrics")),
        "merge": (meta.get("merge") or {}).get("method"),
        "seconds": round(seconds, 1),
        **({"pushed": pushed} if pushed else {}),
    }
    write_summary(summary)
    emit("export", stage="done", **{k: v for k, v in summary.items() if k != "result"})
    return EXIT_COMPLETED


def preempted(workspace: Path, e: Preempted) -> int:
    """Exit 75: stopped at a safe point; says whether an export published earlier is still there."""
    kept = (workspace / EXPORT_DIR / EXPORT_METADATA).is_file()
    message = f"export {e}; staging removed, " + (
        f"the previously published {EXPORT_DIR}/ is untouched" if kept else "nothing published"
    )
    write_summary({"result": RESULT_PREEMPTED, "message": message})
    emit("export", stage="preempted", message=message)
    return EXIT_PREEMPTED


def failed(e: Exception) -> int:
    """Exit 2 or 1 for an error that ended the export, as the table above says."""
    code, result, message, fields = _failure(e)
    print(f"finetune-worker: {message}", file=sys.stderr, flush=True)
    write_summary({"result": result, "message": message, **fields})
    emit("export", stage="failed", message=message, **fields)
    return code


def _failure(e: Exception) -> tuple[int, str, str, dict[str, Any]]:
    """(exit code, result, message, extra summary fields) for an error (order matters: InvalidAdapter
    is a VerificationFailed)."""
    if isinstance(e, InvalidInput):
        return EXIT_INVALID, RESULT_INVALID, f"export: {e}", {}
    if isinstance(e, GateFailed):
        return EXIT_INVALID, RESULT_INVALID, str(e), {"metrics": headline(e.metrics)}
    if isinstance(e, InvalidAdapter):
        return EXIT_INVALID, RESULT_INVALID, f"export verification failed (permanent, not retried): {e}", {}
    if isinstance(e, VerificationFailed):
        return EXIT_FAILED, RESULT_FAILED, f"export verification failed: {e}", {}
    if isinstance(e, TransientError):
        return EXIT_FAILED, RESULT_FAILED, f"export: transient: {e}", {}
    traceback.print_exception(type(e), e, e.__traceback__)
    return EXIT_FAILED, RESULT_FAILED, f"export failed: {type(e).__name__}: {e}", {}


def headline(metrics: dict[str, float] | None) -> dict[str, float] | None:
    """The metrics the spec can name (the summary must stay under 4 KiB)."""
    return None if metrics is None else {k: round(v, 6) for k, v in metrics.items() if k in EVAL_METRICS}
