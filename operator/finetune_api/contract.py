"""The operator ⇄ worker contract (DESIGN.md), as constants both sides import.

Pure: no I/O, no kopf, no torch. The worker imports this module too, so the two sides
can never disagree on an exit code, a directory name or a summary field.
"""

from __future__ import annotations

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
API_VERSION = f"{GROUP}/{VERSION}"

# Exit codes of `finetune-worker train|export`.
EXIT_COMPLETED = 0
EXIT_INVALID = 2  # invalid config or data: permanent, never retried
EXIT_PREEMPTED = 75  # stopped on SIGTERM after a graceful checkpoint (EX_TEMPFAIL)

# Worker results, as written in the termination summary and in status.attempts[].result.
RESULT_COMPLETED = "completed"
RESULT_PREEMPTED = "preempted"
RESULT_EVICTED = "evicted"
RESULT_OOMKILLED = "oomkilled"
RESULT_INVALID = "invalid"
RESULT_FAILED = "failed"

# Workspace layout (the PVC mount).
DEFAULT_WORKSPACE = "/workspace"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoints/checkpoint-<step>/, HF Trainer layout
STAGING_PREFIX = ".staging-"  # never matches checkpoint-*; cleaned on start
FINAL_DIR = "final"  # checkpoints' sibling: the finished training result (adapter or full weights)
EXPORT_DIR = "export"
EXPORT_METADATA = "metadata.json"
EXPORT_FORMATS = ("sentence-transformers", "huggingface", "adapter")

# Files in the pod.
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_SUMMARY_MAX_BYTES = 4096
CONFIG_ENV = "FINETUNE_CONFIG"
# spec.model.fromJob: the pod's mount of the source job's export/ (read-only); the worker loads
# `<FINETUNE_SOURCE_EXPORT>/sentence-transformers`. Run by hand, FINETUNE_JOBS_ROOT may name a
# directory holding `<job>/export/` instead (default: the workspace's parent).
SOURCE_EXPORT_ENV = "FINETUNE_SOURCE_EXPORT"
JOBS_ROOT_ENV = "FINETUNE_JOBS_ROOT"
CONFIG_MOUNT = "/etc/finetune/config.yaml"

# Progress lines on stdout are JSON objects with this key set to PROGRESS_EVENT, e.g.
# {"event": "progress", "step": 10, "totalSteps": 100, "epoch": 0.1, "loss": 1.2,
#  "samplesPerSecond": 55.0, "checkpoint": "checkpoint-10"}
PROGRESS_KEY = "event"
PROGRESS_EVENT = "progress"
CHECKPOINT_EVENT = "checkpoint"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(name: str) -> int | None:
    """Step number of a `checkpoint-N` directory name, or None for anything else."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = name[len(CHECKPOINT_PREFIX) :]
    # ASCII only: str.isdigit() also accepts full-width and superscript digits, which int() reads or refuses; neither is ours
    return int(tail) if tail.isascii() and tail.isdigit() else None
