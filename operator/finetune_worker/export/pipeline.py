"""`finetune-worker export`: merge, format, verify, gate and publish a training result.

Stages, top to bottom in this module, each a short function over one `ExportRun` and each
announced as a JSON progress line `{"event": "export", "stage": ...}`: locate the result (final/ or
spec.export.checkpoint) -> prepare the merge (every adapter target must exist in the base, else
exit 2 with nothing written) -> stream-merge into a staging dir (peft's merge_and_unload for
adapter kinds streaming can't do, said in the log and metadata) -> lay out the formats -> verify
-> optional evaluation gate -> card + metadata -> atomic publish to `<workspace>/export/` -> push
to spec.export.push targets (push.py). A rerun on a current, complete export does nothing but the
push (so a failed push retries the push only).

SIGTERM (recorded from start-up on, see preemption.py) stops the export at the next stage or
shard boundary before the publish (ExportRun's safe points, context.py): its staging is removed, an
export published earlier stays as it was, and the exit code is 75 (preempted: the operator retries
without consuming backoff).

Exit codes (outcome.py maps each error to its code): 0 exported (or already current); 75
preempted; 2 a permanent problem with the inputs (invalid input, a missing adapter target, an
adapter that has no effect or does not fit the base, a failed evaluation gate); 1 anything else
(retried by the operator).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from finetune_api.contract import EXPORT_DIR, EXPORT_METADATA
from finetune_api.spec import FineTuneSpec

from .. import safeio
from ..errors import InvalidInput, Preempted, TransientError
from ..preemption import PreemptionWatch, watching
from ..summary import emit
from . import merge as merging
from .card import build_metadata, model_card, trained_card, write_json
from .context import ExportRun
from .evaluate import gate as evaluation_gate
from .formats import build_adapter, build_huggingface, build_sentence_transformers, transformer_dir
from .outcome import completed, failed, preempted
from .plot import draw_curves, log_history
from .publish import clean_stale, current_export, file_sizes, new_staging, publish
from .push import push_all
from .source import fingerprint, locate
from .verify import load_st, verify_adapter_only, verify_export

log = logging.getLogger("finetune_worker.export")


def run_export(
    spec: FineTuneSpec,
    workspace: Path,
    metadata: dict[str, Any] | None = None,
    watch: PreemptionWatch | None = None,
) -> int:
    """Export the training result in `workspace` as spec.export says. Returns the exit code.

    watch: the SIGTERM watch the CLI installed at start-up; None installs one for this call.
    """
    with watching(watch) as w:
        return _run_export(ExportRun(spec, Path(workspace), metadata or {}, w))


def _run_export(run: ExportRun) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
    try:
        removed = clean_stale(run.workspace)
        if removed:
            log.info("removed staging left by an interrupted export: %s", ", ".join(removed))
        export(run)
        pushed = push(run)
        return completed(run.workspace, run.meta, run.message, pushed, time.monotonic() - run.started)
    except Preempted as e:
        return preempted(run.workspace, e)
    except Exception as e:
        return failed(e)
    finally:
        for staging in run.stagings:  # published ones were renamed away; failed ones go
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def export(run: ExportRun) -> None:
    """The stages up to the publish; a current export is kept as it is (only the push runs again)."""
    locate_result(run)
    current = current_export(run.workspace, run.fingerprint)
    if current is not None:
        emit("export", stage="current", fingerprint=run.fingerprint)  # done already: a SIGTERM now changes nothing
        run.meta, run.message = current, f"export of {run.result.name} is already complete and current"
        return
    run.stage("start", source=run.result.name, lora=run.result.lora, formats=run.formats)
    safeio.mmap_fallbacks.clear()
    prepare_merge(run)
    merge_weights(run)
    build_formats(run)
    verify(run)
    gate(run)
    write_card(run)
    publish_staging(run)


def locate_result(run: ExportRun) -> None:
    """The training result to export, and whether the formats asked for can be made from it."""
    run.result = result = locate(run.spec, run.workspace)
    run.formats = formats = list(run.spec.export.formats)
    if result.lora and not run.spec.export.merge and formats != ["adapter"]:
        raise InvalidInput(
            "spec.export.merge is false: only the 'adapter' format can be exported unmerged "
            f"(asked for {', '.join(formats)})"
        )
    if "adapter" in formats and not result.lora:
        raise InvalidInput(f"the 'adapter' format needs a LoRA result, but {result.path} holds full weights")
    run.fingerprint = fingerprint(result, run.spec)


def prepare_merge(run: ExportRun) -> None:
    """Pair the adapter with the base's tensors (a missing target fails here, before anything is
    written); a full fine-tune is re-sharded and copied."""
    result = run.result
    if result.lora:
        assert result.base_model is not None and result.adapter_dir is not None
        run.reference_hf = transformer_dir(Path(result.base_model))
        base = merging.base_tensors(run.reference_hf)
        config, state = merging.load_adapter(result.adapter_dir)
        merging.require_targets(state, base)
        run.fallback_reason = merging.unsupported_reason(config, state, base)
        if run.fallback_reason is None:
            run.plan = merging.plan_merge(config, state, base)
        run.scaffold = Path(result.base_model)
        run.tokenizer_src = result.adapter_dir
    else:
        assert result.model_dir is not None
        run.reference_hf = transformer_dir(result.model_dir)
        base = merging.base_tensors(run.reference_hf)
        run.plan = merging.MergePlan()  # a full fine-tune: re-shard and copy
        run.scaffold = result.model_dir
    run.low_precision = any(t.dtype in ("BF16", "F16") for t in base.values())


def merge_weights(run: ExportRun) -> None:
    """The merged weights in `<staging>/_weights`: streamed shard by shard, or peft's merge as a fallback."""
    run.staging = new_staging(run.workspace)
    run.stagings.append(run.staging)
    run.weights.mkdir()
    if not run.need_weights:
        run.merge_info = {"method": "none (adapter only)"}
        return
    t0 = time.monotonic()
    run.merge_info = _stream_merge(run) if run.plan is not None else _peft_merge(run)
    run.merge_info["seconds"] = round(time.monotonic() - t0, 2)
    run.stage("merged", **run.merge_info)


def _stream_merge(run: ExportRun) -> dict[str, Any]:
    assert run.plan is not None
    index = merging.stream_merge(
        run.reference_hf,
        run.plan,
        run.weights,
        run.spec.export.max_shard_bytes,
        on_shard=run.shard_done,
    )
    return {
        "method": "streaming" if run.result.lora else "copy",
        "targets": len(run.plan.targets),
        "modulesToSave": len(run.plan.replacements),
        "shards": len(set(index["weight_map"].values())),
    }


def _peft_merge(run: ExportRun) -> dict[str, Any]:
    reason = run.fallback_reason
    log.warning(
        "streaming merge cannot handle this adapter (%s); falling back to peft merge_and_unload, "
        "which loads the whole model into memory",
        reason,
    )
    emit("export", stage="fallback", reason=reason)
    merging.peft_merge(run.reference_hf, run.result.adapter_dir, run.weights, run.spec.export.max_shard_bytes)  # type: ignore[arg-type]
    return {"method": "peft-merge_and_unload", "fallbackReason": reason}


def build_formats(run: ExportRun) -> None:
    """Each format asked for, from the merged weights (hard-linked: a second format costs no space)."""
    if run.need_weights:
        run.st_info = build_sentence_transformers(
            run.st_dir, run.scaffold, run.weights, run.spec, run.tokenizer_src
        )
    if run.hf_dir is not None:
        build_huggingface(run.hf_dir, run.reference_hf, run.weights, run.tokenizer_src)
    if "adapter" in run.formats:
        build_adapter(run.staging / "adapter", run.result.adapter_dir, run.tokenizer_src)  # type: ignore[arg-type]
    shutil.rmtree(run.weights)
    run.stage("formatted", formats=run.formats)


def verify(run: ExportRun) -> None:
    """Every format reloaded as users load it must embed like the model it was made from."""
    result = run.result
    if run.need_weights:
        adapter_for_check = (run.staging / "adapter") if "adapter" in run.formats else result.adapter_dir
        run.verify_info = info = verify_export(
            run.st_dir,
            run.spec,
            reference_hf=run.reference_hf,
            adapter_dir=adapter_for_check if result.lora else None,
            hf_dir=run.hf_dir,
            low_precision=run.low_precision,
        )
        run.stage("verified", maxDeviation=info["maxDeviation"], baseDeviation=info.get("baseDeviation"))
        return
    if run.spec.export.evaluate is not None:  # refused before the adapter is loaded
        raise InvalidInput("spec.export.evaluate needs a merged format (sentence-transformers or huggingface)")
    base_model = Path(result.base_model)  # type: ignore[arg-type]
    run.verify_info = info = verify_adapter_only(base_model, run.staging / "adapter", run.spec)
    run.stage("verified", baseDeviation=info["baseDeviation"])


def gate(run: ExportRun) -> None:
    """spec.export.evaluate: score the export on the eval data; below `min`, nothing is published."""
    if run.spec.export.evaluate is None:
        return
    run.metrics = evaluation_gate(load_st(run.st_dir, run.spec), run.spec, run.workspace)
    run.stage("evaluated", metrics=run.metrics)


def write_card(run: ExportRun) -> None:
    """A README.md (with the training curve beside it) in each format, and metadata.json listing every file."""
    if not run.need_weights or "sentence-transformers" not in run.formats:
        shutil.rmtree(run.st_dir, ignore_errors=True)  # built for verification only
    run.merge_info["mmapFallback"] = list(safeio.mmap_fallbacks)
    meta = build_metadata(
        run.spec,
        run.job,
        run.result,
        fingerprint=run.fingerprint,
        formats=run.formats,
        merge=run.merge_info,
        verify=run.verify_info,
        metrics=run.metrics,
        st_info=run.st_info,
        files={},
    )
    meta["trainingCurve"] = draw_curves(
        log_history(run.result.info, run.workspace),
        [run.staging / fmt for fmt in run.formats],
        f"{meta.get('job') or 'fine-tune'}: {meta['training'].get('loss')}",
    )
    st_card = trained_card(run.result)
    for fmt in run.formats:
        (run.staging / fmt / "README.md").write_text(model_card(meta, fmt, st_card))
    meta["files"] = file_sizes(run.staging)
    write_json(run.staging / EXPORT_METADATA, meta)
    run.meta = meta


def publish_staging(run: ExportRun) -> None:
    """The staging dir becomes `<workspace>/export/` in one step (see publish.py)."""
    run.stage("publishing")  # the last safe point: past it, the publish is one rename away
    publish(run.staging, run.workspace, on_aside=lambda: run.pause("aside"))
    dev = run.verify_info.get("maxDeviation")
    run.message = f"exported {run.result.name} as {', '.join(run.formats)}" + (
        f" (max deviation {dev:.2g})" if dev is not None else ""
    )


def push(run: ExportRun) -> list[dict[str, Any]]:
    """spec.export.push, from the published export (also when it was already current: a rerun after
    a failed push only pushes)."""
    if not run.spec.export.push:
        return []
    try:
        return push_all(run.spec.export.push, run.workspace / EXPORT_DIR, run.meta, run.stop_if_requested)
    except InvalidInput as e:
        raise InvalidInput(f"push refused (the export itself is published and verified): {e}") from None
    except TransientError as e:
        raise TransientError(f"push failed, the export itself is published and verified; a rerun only pushes: {e}") from None
