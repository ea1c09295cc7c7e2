"""SentenceTransformerTrainer with atomic checkpoints, loss-held weights, and exact resume.

Three changes to stock behaviour, each through the Trainer's own hooks:
- `_save_checkpoint` writes into a `.staging-*` directory and publishes it with one rename, then
  rotates (keep the last K) — a kill mid-save never leaves a `checkpoint-N` that looks valid.
- Loss-held weights (the TSDAE decoder) are saved into each checkpoint and restored on resume.
- The batch sampler reseeds its generator with seed + epoch at every epoch, so the batch order is a
  function of (seed, epoch) alone. Stock training is exact on resume today too (accelerate reseeds
  on set_epoch); this keeps it so whatever the accelerate settings.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from torch.utils.data import RandomSampler

from finetune_api.contract import checkpoint_name

from . import distributed as dist
from .callbacks import fault
from .checkpoints import checkpoints_dir, publish_dir, rotate, staging_for
from .losses import load_loss_state, save_loss_state
from .safeio import load_file, without_mmap_on_enodev
from .summary import emit


class EpochSeededBatchSampler(DefaultBatchSampler):
    """A shuffled batch sampler whose order depends only on (seed, epoch)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        if self.generator is not None and self.seed is not None:
            self.generator.manual_seed(int(self.seed) + int(self.epoch))
        return super().__iter__()


class ResumableTrainer(SentenceTransformerTrainer):
    """The worker's trainer (see module docstring)."""

    def __init__(self, *args: Any, workspace: Path, keep: int, lora: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ft_workspace = Path(workspace)
        self.ft_keep = keep
        self.ft_lora = lora
        self._ft_run_dir: Path | None = None
        self.last_checkpoint: str | None = None

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):  # type: ignore[no-untyped-def]
        return EpochSeededBatchSampler(RandomSampler(dataset, generator=generator), batch_size=batch_size,
                                       drop_last=drop_last, valid_label_columns=valid_label_columns,
                                       generator=generator, seed=seed)

    def _get_output_dir(self, trial):  # type: ignore[no-untyped-def]
        return str(self._ft_run_dir) if self._ft_run_dir is not None else super()._get_output_dir(trial)

    def _save_optimizer_and_scheduler(self, output_dir):  # type: ignore[no-untyped-def]
        if fault("kill-in-save", self.state.global_step):  # test hook: the model is written, the optimizer not yet
            emit("fault", kind="kill-in-save", step=self.state.global_step, path=str(output_dir))
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._save_optimizer_and_scheduler(output_dir)

    def _save_checkpoint(self, model, trial):  # type: ignore[no-untyped-def]
        """Every rank writes its part (rank 0 the model, optimizer and state; each rank its
        rng_state_<rank>.pth) into one staging directory; rank 0 alone publishes and rotates while the
        others wait at a barrier, so every rank leaves with the same published checkpoint."""
        step = self.state.global_step
        name = checkpoint_name(step)
        run_dir = staging_for(self.ft_workspace, step, shared=dist.distributed())
        if dist.is_main():
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
        dist.barrier()
        self._ft_run_dir = run_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._ft_run_dir = None
        dist.barrier()  # every rank's RNG state is in the staging directory
        if dist.is_main():
            built = run_dir / name
            save_loss_state(self._ft_loss(), built)
            dist.write_world(built, dist.world_size(), self.args.gradient_accumulation_steps)
            publish_dir(built, checkpoints_dir(self.ft_workspace) / name)
            shutil.rmtree(run_dir, ignore_errors=True)
            rotate(self.ft_workspace, self.ft_keep)
            emit("checkpoint", name=name, step=step)
        dist.barrier()  # published: no rank goes on (or exits) before the checkpoint is complete
        self.last_checkpoint = name

    def _load_from_checkpoint(self, checkpoint_path, model=None):  # type: ignore[no-untyped-def]
        path = Path(checkpoint_path)
        if self.ft_lora:
            load_adapter_weights(self.model, path)
        else:
            stock = super()._load_from_checkpoint
            without_mmap_on_enodev(  # errno 19: the workspace cannot mmap
                lambda: stock(checkpoint_path),
                lambda: load_full_checkpoint_without_mmap(self.model, path),
                path,
            )
        load_loss_state(self._ft_loss(), path)

    def _ft_loss(self) -> torch.nn.Module:
        loss = self.loss
        assert isinstance(loss, torch.nn.Module), "the worker trains one dataset with one loss"
        return loss


def load_adapter_weights(model: Any, checkpoint: Path) -> None:
    """Load a checkpoint's LoRA weights into the adapter already attached to the model."""
    from peft import set_peft_model_state_dict

    files = sorted(checkpoint.rglob("adapter_model.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors")
    state = load_file(files[0])  # falls back to reading into memory on errno 19
    result = set_peft_model_state_dict(model.transformers_model, state)
    missing_lora = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing_lora or unexpected:
        raise RuntimeError(f"{files[0]}: adapter keys do not match the model (missing {missing_lora[:3]}, "
                           f"unexpected {unexpected[:3]})")


def load_full_checkpoint_without_mmap(model: Any, checkpoint: Path) -> None:
    """sentence-transformers' own checkpoint reload (base/trainer.py `_load_from_checkpoint`, pinned
    6.2.0) with transformers' `disable_mmap`, for workspaces whose filesystem cannot mmap (errno 19)."""
    from sentence_transformers.base.modules import Module
    from sentence_transformers.util import fullname

    model = getattr(model, "_orig_mod", model)
    classes = {fullname(m): type(m) for m in model.modules() if isinstance(m, Module)}
    loaded = model.__class__._load_with_module_classes(
        str(checkpoint), classes, trust_remote_code=model.trust_remote_code, model_kwargs={"disable_mmap": True}
    )
    model.load_state_dict(loaded.state_dict())
