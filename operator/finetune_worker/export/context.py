"""ExportRun: what the stages of one export share (pipeline.py fills it in top to bottom), and its
safe points, where a SIGTERM stops the export before the publish (raises Preempted).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneSpec

from ..errors import Preempted
from ..preemption import PreemptionWatch
from ..summary import emit
from .merge import MergePlan
from .source import TrainingResult

PAUSE_ENV = "FINETUNE_EXPORT_PAUSE_AFTER"  # test hook: sleep after this stage so a test can signal the pod


@dataclass
class ExportRun:
    """One export: what its stages share, each filling in what the next ones read."""

    spec: FineTuneSpec
    workspace: Path
    job: dict[str, Any]  # the FineTuneJob's metadata (its name and namespace go into the card)
    watch: PreemptionWatch
    started: float = field(default_factory=time.monotonic)
    stagings: list[Path] = field(default_factory=list)  # removed at the end unless published (renamed away)
    # locate
    result: TrainingResult = field(init=False)
    formats: list[str] = field(init=False)
    fingerprint: str = field(init=False)
    # prepare the merge
    reference_hf: Path = field(init=False)  # the HF weights the export must reproduce (base, or trained model)
    scaffold: Path = field(init=False)  # the ST (or HF) model dir whose modules the ST format copies
    tokenizer_src: Path | None = None  # LoRA: the adapter dir, which holds the tokenizer training saved
    plan: MergePlan | None = None  # None: streaming cannot merge this adapter (fallback_reason)
    fallback_reason: str | None = None
    low_precision: bool = False  # bf16/fp16 base weights: verified by cosine
    # merge, formats, verify, gate
    staging: Path = field(init=False)
    merge_info: dict[str, Any] = field(default_factory=dict)
    st_info: dict[str, Any] | None = None
    verify_info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] | None = None
    # card, publish
    meta: dict[str, Any] = field(init=False)
    message: str = ""

    @property
    def need_weights(self) -> bool:
        return self.formats != ["adapter"]

    @property
    def weights(self) -> Path:
        return self.staging / "_weights"

    @property
    def st_dir(self) -> Path:  # built whenever there are weights: verification loads it
        return self.staging / "sentence-transformers"

    @property
    def hf_dir(self) -> Path | None:
        return self.staging / "huggingface" if "huggingface" in self.formats else None

    # -- safe points ---------------------------------------------------------------------------

    def stage(self, stage: str, **fields: Any) -> None:
        """Announce a stage; it is also a safe point where a SIGTERM stops the export (raises Preempted)."""
        emit("export", stage=stage, **fields)
        self.pause(stage)
        self.stop_if_requested(f"after the {stage!r} stage")

    def shard_done(self, i: int, n: int, name: str) -> None:
        emit("export", stage="shard", shard=i, shards=n, file=name)
        if i < n:
            self.stop_if_requested(f"after shard {i} of {n}")

    def stop_if_requested(self, where: str) -> None:
        if self.watch.requested:
            raise Preempted(f"stopped by {self.watch.signal_name or 'SIGTERM'} {where}, before publishing")

    def pause(self, stage: str) -> None:
        if os.environ.get(PAUSE_ENV) == stage:
            emit("export", stage="paused", after=stage)
            self.watch.sleep(3600)
