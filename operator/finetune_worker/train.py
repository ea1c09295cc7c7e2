"""`finetune-worker train`: validate, load, train (or resume) with checkpoints, publish `final/`.

Exit codes (finetune_api.contract): 0 only after `final/` is published; 75 on SIGTERM, after a
graceful checkpoint at the next step boundary, or at once when it came before the first step (the
CLI records it from start-up on: nothing trained, nothing claimed, existing checkpoints untouched);
2 for invalid config or data (with a specific message); anything else is a failure the operator retries.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from finetune_api.contract import (
    EXIT_COMPLETED,
    EXIT_INVALID,
    EXIT_PREEMPTED,
    FINAL_DIR,
    RESULT_COMPLETED,
    RESULT_FAILED,
    RESULT_INVALID,
    RESULT_PREEMPTED,
)
from finetune_api.spec import FineTuneSpec

from . import distributed as dist
from .errors import EXIT_FAILED, InvalidInput, TransientError
from .lora import add_lora, save_adapter
from .preemption import PreemptionWatch, watching
from .summary import emit, write_summary

TRAINING_JSON = "training.json"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "sentence_transformers", "peft"):
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _finish(result: str, code: int, *, step: int | None = None, checkpoint: str | None = None,
            message: str = "", resumed_from: str | None = None) -> int:
    summary = {"result": result, "step": step, "checkpoint": checkpoint, "message": message, "resumedFrom": resumed_from}
    write_summary(summary)
    emit("result", **summary)
    if code == EXIT_INVALID:
        print(f"finetune-worker: invalid input: {message}", file=sys.stderr, flush=True)
    return code


def run_train(spec: FineTuneSpec, workspace: Path, *, metadata: dict[str, Any] | None = None,
              watch: PreemptionWatch | None = None) -> int:
    """Train (or resume) the job in `workspace`; returns the process exit code.

    Args:
        spec: the validated job spec.
        workspace: the job's workspace (checkpoints/, final/ live here).
        metadata: the FineTuneJob's metadata (unused by training; kept for logs).
        watch: the SIGTERM watch the CLI installed at start-up; None installs one for this call.
    """
    with watching(watch) as w:
        try:
            return _run(spec, Path(workspace), w)
        except InvalidInput as e:
            return _finish(RESULT_INVALID, EXIT_INVALID, message=str(e))
        except TransientError as e:  # retried by the operator: say so, no traceback
            print(f"finetune-worker: transient failure (will be retried): {e}", file=sys.stderr, flush=True)
            return _finish(RESULT_FAILED, EXIT_FAILED, message=f"transient: {e}")
        except Exception as e:
            traceback.print_exc()
            return _finish(RESULT_FAILED, EXIT_FAILED, message=f"{type(e).__name__}: {e}")
        finally:
            dist.shutdown()


def _stopped_before_training(watch: PreemptionWatch, checkpoint: str | None, resumed_from: str | None) -> int:
    """Exit 75 for a SIGTERM that came before the first step: nothing trained, nothing claimed."""
    emit("preemption", signal=watch.signal_name, step=None, saving=False)
    return _finish(RESULT_PREEMPTED, EXIT_PREEMPTED, checkpoint=checkpoint,
                   message="stopped by SIGTERM before training began"
                   + (f"; {checkpoint} is kept for the next attempt" if checkpoint else ""),
                   resumed_from=resumed_from)


def _newest_usable_checkpoint(workspace: Path, needs: tuple[str, ...]) -> Path | None:
    """The checkpoint to resume from; the damaged ones newer than it are removed (left in place they
    would outrank good ones in rotation, and nothing can use them)."""
    from .checkpoints import checkpoints_dir, resolve_resume_checkpoint

    resume, skipped = resolve_resume_checkpoint(workspace, needs)
    for name, why in skipped:
        emit("checkpointSkipped", name=name, reason=why, removed=True)
        shutil.rmtree(checkpoints_dir(workspace) / name, ignore_errors=True)
    return resume


def _run(spec: FineTuneSpec, workspace: Path, watch: PreemptionWatch) -> int:
    base, data = _prepare(spec, workspace)
    done = _completed(workspace / FINAL_DIR)
    if done is not None:  # nothing to train
        return _already_trained(spec, workspace, done)
    if dist.agree_stop(watch.requested):  # SIGTERM during start-up: don't load the model only to drop it
        return _stopped_before_training(watch, None, None)
    model, loss, resume = _load_model(spec, workspace, base)
    resumed_from = resume.name if resume is not None else None
    accumulation = _accumulation(resume)
    _announce_start(spec, base, data, model, resumed_from, accumulation)
    if dist.agree_stop(watch.requested):  # during model load: `resume` is the newest valid checkpoint
        return _stopped_before_training(watch, resumed_from, resumed_from)

    trainer = _trainer(spec, model, loss, data, workspace, watch, accumulation)
    finished = _finished_state(resume)
    if finished is not None:  # killed after the last checkpoint, before final/ was published: publish only
        trainer._load_from_checkpoint(str(resume))  # (stock resume would train one step past the end)
        step, epoch, train_loss = finished
    else:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        step, epoch, train_loss = trainer.state.global_step, float(trainer.state.epoch or 0), float(out.training_loss)
        if trainer.ft_stop.stopped_at_step is not None and step < trainer.state.max_steps:
            return _stopped_in_training(trainer, workspace, step, resumed_from)
    metrics = {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))} if data.eval is not None else {}
    history = trainer.state.log_history if finished is None else _trainer_state(resume).get("log_history", [])
    info = {"baseModel": base, "lora": spec.lora is not None, "steps": step, "epochs": epoch,
            "loss": spec.training.loss, "seed": spec.training.seed, "trainRows": len(data.train),
            "evalRows": len(data.eval) if data.eval is not None else 0, "evalMetrics": metrics,
            "trainLoss": train_loss, "versions": _versions(),
            "logHistory": [e for e in history if isinstance(e, dict)]}  # the model card's loss curve
    if dist.is_main():
        _publish_final(model, spec, workspace, info)
    dist.barrier()  # final/ is published before any rank reports completion
    return _finish(RESULT_COMPLETED, EXIT_COMPLETED, step=step, checkpoint=FINAL_DIR,
                   message=f"trained {step} steps; result in {FINAL_DIR}/", resumed_from=resumed_from)


def _prepare(spec: FineTuneSpec, workspace: Path) -> tuple[str, Any]:
    """(base model, training data): every problem with the inputs surfaces here, before the model
    loads; rank 0 tidies the shared workspace while the others wait for it."""
    from .checkpoints import clean_staging
    from .data import load_training_data
    from .modelsrc import resolve_base_model

    if spec.training.precision == "fp16" and spec.resources.gpus == 0:
        raise InvalidInput("spec.training.precision: fp16 needs a GPU")
    dist.init(spec.distributed.resolved_backend(spec.resources.gpus))  # torchrun's group; no-op alone
    base = resolve_base_model(spec, workspace)
    data = load_training_data(spec, workspace)  # every data problem surfaces before the model loads
    workspace.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        for name in clean_staging(workspace):  # first: it renames back a final/ that a killed re-publish parked
            emit("cleaned", name=name)
    dist.barrier()
    return base, data


def _already_trained(spec: FineTuneSpec, workspace: Path, done: dict[str, Any]) -> int:
    """Exit 0 at once: final/ exists. Still leaves no damaged checkpoint newer than a good one."""
    from .losses import LOSS_STATE_FILE

    if dist.is_main():
        _newest_usable_checkpoint(workspace, (LOSS_STATE_FILE,) if spec.training.loss == "DenoisingAutoEncoderLoss" else ())
    return _finish(RESULT_COMPLETED, EXIT_COMPLETED, step=done.get("steps"), checkpoint=FINAL_DIR,
                   message="already trained: final/ exists")


def _load_model(spec: FineTuneSpec, workspace: Path, base: str) -> tuple[Any, Any, Path | None]:
    """(model with its LoRA adapter, loss, the checkpoint to resume from): every rank resolves the same one."""
    from transformers import set_seed

    from .losses import LOSS_STATE_FILE, build_loss, check_loss_against_model, has_loss_state
    from .modelsrc import load_sentence_transformer

    set_seed(spec.training.seed)
    model = load_sentence_transformer(base, spec)
    check_loss_against_model(spec, model)
    if spec.lora is not None:
        add_lora(model, spec)
    loss = build_loss(spec, model, world_size=dist.world_size())
    needs = (LOSS_STATE_FILE,) if has_loss_state(loss) else ()
    if dist.is_main():  # rank 0 removes the damaged ones; then every rank resolves the same checkpoint
        _newest_usable_checkpoint(workspace, needs)
    dist.barrier()
    resume = _newest_usable_checkpoint(workspace, needs)
    if resume is not None:  # where this attempt picks up (the local runner says it on screen)
        state = _trainer_state(resume)
        emit("resume", checkpoint=resume.name, step=state.get("global_step"), totalSteps=state.get("max_steps"))
    return model, loss, resume


def _announce_start(spec: FineTuneSpec, base: str, data: Any, model: Any, resumed_from: str | None,
                    accumulation: int) -> None:
    emit("start", baseModel=base, resumeFrom=resumed_from, trainRows=len(data.train),
         evalRows=len(data.eval) if data.eval is not None else 0, device=str(model.device),
         **({"globalBatch": spec.training.batch_size * dist.world_size() * accumulation,
             "gradientAccumulationSteps": accumulation} if dist.distributed() or accumulation > 1 else {}))


def _stopped_in_training(trainer: Any, workspace: Path, step: int, resumed_from: str | None) -> int:
    """Exit 75 for a SIGTERM during training, after the graceful checkpoint at the step boundary."""
    from .checkpoints import list_checkpoints

    newest = list_checkpoints(workspace)
    cp = trainer.last_checkpoint or (newest[0].name if newest else None)
    return _finish(RESULT_PREEMPTED, EXIT_PREEMPTED, step=step, checkpoint=cp,
                   message=f"stopped by SIGTERM at step {step} of {trainer.state.max_steps}"
                   + (f"; saved {cp}" if cp and cp == trainer.last_checkpoint else ""),
                   resumed_from=resumed_from)


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state if isinstance(state, dict) else {}


def _finished_state(checkpoint: Path | None) -> tuple[int, float, float | None] | None:
    """(step, epoch, last logged loss) when a checkpoint is the run's last step, else None."""
    if checkpoint is None:
        return None
    state = _trainer_state(checkpoint)
    step, max_steps = int(state.get("global_step", 0)), int(state.get("max_steps", 0) or 0)
    if max_steps <= 0 or step < max_steps:
        return None
    losses = [e["loss"] for e in state.get("log_history", []) if isinstance(e, dict) and "loss" in e]
    return step, float(state.get("epoch") or 0), float(losses[-1]) if losses else None


def _completed(final: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((final / TRAINING_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _accumulation(resume: Path | None) -> int:
    """Gradient accumulation for this attempt: 1, or what keeps the global batch of the checkpoint's
    world size when this attempt has fewer processes (see distributed.py)."""
    previous = dist.read_world(resume)
    acc, kept = dist.accumulation_for(previous, dist.world_size())
    if previous is not None and previous[0] != dist.world_size():
        emit("worldSizeChanged", previous=previous[0], now=dist.world_size(), gradientAccumulationSteps=acc,
             globalBatchKept=kept)
    return acc


def _trainer(spec: FineTuneSpec, model: Any, loss: Any, data: Any, workspace: Path, watch: PreemptionWatch,
             accumulation: int = 1) -> Any:
    import torch
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from .callbacks import KillAtStep, Progress, StopOnPreemption
    from .checkpoints import checkpoints_dir
    from .trainer import ResumableTrainer

    t = spec.training
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints_dir(workspace)), num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio, seed=t.seed, data_seed=t.seed,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16", use_cpu=not torch.cuda.is_available(),
        save_strategy="steps", save_steps=t.checkpoint.every_steps, save_total_limit=None,
        logging_steps=max(1, min(10, t.checkpoint.every_steps)), report_to="none", disable_tqdm=True,
        # an eval split is scored at every checkpoint, so the model card can plot it over steps
        eval_strategy="steps" if data.eval is not None else "no", eval_steps=t.checkpoint.every_steps,
        dataloader_num_workers=0, remove_unused_columns=False,
        gradient_accumulation_steps=accumulation, ddp_timeout=dist.timeout_s(),
        ddp_backend=spec.distributed.resolved_backend(spec.resources.gpus) if dist.distributed() else None,
    )
    stop = StopOnPreemption(watch, t.checkpoint.on_preemption)
    trainer = ResumableTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, loss=loss,
        callbacks=[KillAtStep(), stop, Progress(t.batch_size * dist.world_size() * accumulation)],
        workspace=workspace, keep=t.checkpoint.keep, lora=spec.lora is not None,
    )
    trainer.ft_stop = stop
    return trainer


def _publish_final(model: Any, spec: FineTuneSpec, workspace: Path, info: dict[str, Any]) -> None:
    """Build `final/` in a staging directory and rename it into place (see the module docstring)."""
    from .checkpoints import FINAL_STAGING_PREFIX, publish_dir

    staging = workspace / f"{FINAL_STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if spec.lora is not None:
        save_adapter(model, staging / "adapter", info["baseModel"])
    else:
        model.save(str(staging))
    (staging / TRAINING_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")
    publish_dir(staging, workspace / FINAL_DIR)
