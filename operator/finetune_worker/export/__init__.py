"""`finetune-worker export`: merge, format, verify, gate and publish a training result.

Steps (each announced as a JSON progress line `{"event": "export", "stage": ...}`):
locate the result (final/ or spec.export.checkpoint) -> plan the merge (every adapter target
must exist in the base, else exit 2 with nothing written) -> stream-merge into a staging dir
(peft's merge_and_unload for adapter kinds streaming can't do, said in the log and metadata)
-> lay out the formats -> verify -> optional evaluation gate -> card + metadata -> atomic
publish to `<workspace>/export/` -> push to spec.export.push targets (push.py). A rerun on a
current, complete export does nothing but the push (so a failed push retries the push only).

SIGTERM (recorded from start-up on, see preemption.py) stops the export at the next stage or
shard boundary before the publish: its staging is removed, an export published earlier stays as
it was, and the exit code is 75 (preempted: the operator retries without consuming backoff).

Exit codes: 0 exported (or already current); 75 preempted; 2 a permanent problem with the inputs
(invalid input, a missing adapter target, an adapter that has no effect or does not fit the base,
a failed evaluation gate); 1 anything else (retried by the operator).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from finetune_operator.contract import (
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
from finetune_operator.spec import FineTuneSpec

from ..errors import InvalidInput, Preempted, TransientError
from ..preemption import PreemptionWatch, watching
from ..summary import emit, write_summary

EXIT_FAILED = 1
PAUSE_ENV = "FINETUNE_EXPORT_PAUSE_AFTER"  # test hook: sleep after this stage so a test can signal the pod
log = logging.getLogger("finetune_worker.export")


def _pause(watch: PreemptionWatch, stage: str) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        emit("export", stage="paused", after=stage)
        watch.sleep(3600)


def _stage(watch: PreemptionWatch, stage: str, **fields: Any) -> None:
    """Announce a stage; it is also a safe point where a SIGTERM stops the export (raises Preempted)."""
    emit("export", stage=stage, **fields)
    _pause(watch, stage)
    _stop_if_requested(watch, f"after the {stage!r} stage")


def _stop_if_requested(watch: PreemptionWatch, where: str) -> None:
    if watch.requested:
        raise Preempted(f"stopped by {watch.signal_name or 'SIGTERM'} {where}, before publishing")


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
        return _run_export(spec, Path(workspace), metadata, w)


def _run_export(
    spec: FineTuneSpec, workspace: Path, metadata: dict[str, Any] | None, watch: PreemptionWatch
) -> int:
    from .evaluate import GateFailed
    from .verify import InvalidAdapter, VerificationFailed

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
    stagings: list[Path] = []
    started = time.monotonic()
    try:
        from .publish import clean_stale

        removed = clean_stale(workspace)
        if removed:
            log.info("removed staging left by an interrupted export: %s", ", ".join(removed))
        meta = _export(spec, workspace, metadata or {}, stagings, watch)
        pushed = _push(spec, workspace, meta, watch)
        summary = {
            "result": RESULT_COMPLETED,
            "message": meta.pop("_message"),
            "export": str(workspace / EXPORT_DIR),
            "formats": meta.get("formats"),
            "maxDeviation": meta.get("maxDeviation"),
            "metrics": _headline(meta.get("metrics")),
            "merge": (meta.get("merge") or {}).get("method"),
            "seconds": round(time.monotonic() - started, 1),
            **({"pushed": pushed} if pushed else {}),
        }
        write_summary(summary)
        emit("export", stage="done", **{k: v for k, v in summary.items() if k != "result"})
        return EXIT_COMPLETED
    except Preempted as e:
        kept = (workspace / EXPORT_DIR / EXPORT_METADATA).is_file()
        message = f"export {e}; staging removed, " + (
            f"the previously published {EXPORT_DIR}/ is untouched" if kept else "nothing published"
        )
        write_summary({"result": RESULT_PREEMPTED, "message": message})
        emit("export", stage="preempted", message=message)
        return EXIT_PREEMPTED
    except InvalidInput as e:
        return _fail(EXIT_INVALID, RESULT_INVALID, f"export: {e}")
    except GateFailed as e:
        return _fail(EXIT_INVALID, RESULT_INVALID, str(e), metrics=_headline(e.metrics))
    except InvalidAdapter as e:
        return _fail(
            EXIT_INVALID, RESULT_INVALID, f"export verification failed (permanent, not retried): {e}"
        )
    except VerificationFailed as e:
        return _fail(EXIT_FAILED, RESULT_FAILED, f"export verification failed: {e}")
    except TransientError as e:
        return _fail(EXIT_FAILED, RESULT_FAILED, f"export: transient: {e}")
    except Exception as e:
        traceback.print_exc()
        return _fail(EXIT_FAILED, RESULT_FAILED, f"export failed: {type(e).__name__}: {e}")
    finally:
        for staging in stagings:  # published ones were renamed away; failed ones go
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _push(spec: FineTuneSpec, workspace: Path, meta: dict[str, Any], watch: PreemptionWatch) -> list[dict[str, Any]]:
    """spec.export.push, from the published export (also when it was already current: a rerun after
    a failed push only pushes)."""
    if not spec.export.push:
        return []
    from .push import push_all

    try:
        return push_all(spec.export.push, workspace / EXPORT_DIR, meta,
                        lambda where: _stop_if_requested(watch, where))  # fmt: skip
    except InvalidInput as e:
        raise InvalidInput(f"push refused (the export itself is published and verified): {e}") from None
    except TransientError as e:
        raise TransientError(f"push failed, the export itself is published and verified; a rerun only pushes: {e}") from None


def _headline(metrics: dict[str, float] | None) -> dict[str, float] | None:
    """The metrics the spec can name (the summary must stay under 4 KiB)."""
    from finetune_operator.spec import EVAL_METRICS

    return None if metrics is None else {k: round(v, 6) for k, v in metrics.items() if k in EVAL_METRICS}


def _fail(code: int, result: str, message: str, **fields: Any) -> int:
    print(f"finetune-worker: {message}", file=sys.stderr, flush=True)
    write_summary({"result": result, "message": message, **fields})
    emit("export", stage="failed", message=message, **fields)
    return code


def _export(
    spec: FineTuneSpec, workspace: Path, job: dict[str, Any], stagings: list[Path], watch: PreemptionWatch
) -> dict[str, Any]:
    from . import merge as merging
    from . import safeio
    from .card import build_metadata, model_card, write_json
    from .formats import build_adapter, build_huggingface, build_sentence_transformers, transformer_dir
    from .publish import current_export, file_sizes, new_staging, publish
    from .source import fingerprint, locate

    result = locate(spec, workspace)
    formats = list(spec.export.formats)
    if result.lora and not spec.export.merge and formats != ["adapter"]:
        raise InvalidInput(
            "spec.export.merge is false: only the 'adapter' format can be exported unmerged "
            f"(asked for {', '.join(formats)})"
        )
    if "adapter" in formats and not result.lora:
        raise InvalidInput(f"the 'adapter' format needs a LoRA result, but {result.path} holds full weights")
    fp = fingerprint(result, spec)
    current = current_export(workspace, fp)
    if current is not None:
        emit("export", stage="current", fingerprint=fp)  # done already: a SIGTERM now changes nothing
        return {**current, "_message": f"export of {result.name} is already complete and current"}
    _stage(watch, "start", source=result.name, lora=result.lora, formats=formats)
    safeio.mmap_fallbacks.clear()

    merge_info: dict[str, Any]
    reference_hf: Path
    need_weights = formats != ["adapter"]
    plan = None
    if result.lora:
        assert result.base_model is not None and result.adapter_dir is not None
        reference_hf = transformer_dir(Path(result.base_model))
        base = merging.base_tensors(reference_hf)
        config, state = merging.load_adapter(result.adapter_dir)
        merging.require_targets(state, base)  # a missing target fails here, before anything is written
        reason = merging.unsupported_reason(config, state, base)
        if reason is None:
            plan = merging.plan_merge(config, state, base)
        scaffold = Path(result.base_model)
        tokenizer_src: Path | None = result.adapter_dir
    else:
        assert result.model_dir is not None
        reason = None
        reference_hf = transformer_dir(result.model_dir)
        base = merging.base_tensors(reference_hf)
        plan = merging.MergePlan()  # a full fine-tune: re-shard and copy
        scaffold = result.model_dir
        tokenizer_src = None
    low_precision = any(t.dtype in ("BF16", "F16") for t in base.values())

    staging = new_staging(workspace)
    stagings.append(staging)
    weights = staging / "_weights"
    weights.mkdir()
    max_bytes = spec.export.max_shard_bytes
    if need_weights:
        t0 = time.monotonic()
        if plan is not None:
            index = merging.stream_merge(
                reference_hf,
                plan,
                weights,
                max_bytes,
                on_shard=lambda i, n, name: _shard_done(watch, i, n, name),
            )
            merge_info = {
                "method": "streaming" if result.lora else "copy",
                "targets": len(plan.targets),
                "modulesToSave": len(plan.replacements),
                "shards": len(set(index["weight_map"].values())),
            }
        else:
            log.warning(
                "streaming merge cannot handle this adapter (%s); falling back to peft merge_and_unload, "
                "which loads the whole model into memory",
                reason,
            )
            emit("export", stage="fallback", reason=reason)
            merging.peft_merge(reference_hf, result.adapter_dir, weights, max_bytes)  # type: ignore[arg-type]
            merge_info = {"method": "peft-merge_and_unload", "fallbackReason": reason}
        merge_info["seconds"] = round(time.monotonic() - t0, 2)
        _stage(watch, "merged", **merge_info)
    else:
        merge_info = {"method": "none (adapter only)"}

    st_info = None
    st_dir = staging / "sentence-transformers"
    hf_dir = staging / "huggingface" if "huggingface" in formats else None
    if need_weights:
        st_info = build_sentence_transformers(st_dir, scaffold, weights, spec, tokenizer_src)
    if hf_dir is not None:
        build_huggingface(hf_dir, reference_hf, weights, tokenizer_src)
    if "adapter" in formats:
        build_adapter(staging / "adapter", result.adapter_dir, tokenizer_src)  # type: ignore[arg-type]
    shutil.rmtree(weights)
    _stage(watch, "formatted", formats=formats)

    verify_info: dict[str, Any] = {}
    metrics: dict[str, float] | None = None
    if need_weights:
        from .verify import load_st, verify_export

        adapter_for_check = (staging / "adapter") if "adapter" in formats else result.adapter_dir
        verify_info = verify_export(
            st_dir,
            spec,
            reference_hf=reference_hf,
            adapter_dir=adapter_for_check if result.lora else None,
            hf_dir=hf_dir,
            low_precision=low_precision,
        )
        _stage(
            watch,
            "verified",
            maxDeviation=verify_info["maxDeviation"],
            baseDeviation=verify_info.get("baseDeviation"),
        )
        if spec.export.evaluate is not None:
            from .evaluate import gate

            metrics = gate(load_st(st_dir, spec), spec, workspace)
            _stage(watch, "evaluated", metrics=metrics)
    else:
        if spec.export.evaluate is not None:
            raise InvalidInput(
                "spec.export.evaluate needs a merged format (sentence-transformers or huggingface)"
            )
        from .verify import verify_adapter_only

        verify_info = verify_adapter_only(Path(result.base_model), staging / "adapter", spec)  # type: ignore[arg-type]
        _stage(watch, "verified", baseDeviation=verify_info["baseDeviation"])
    if not need_weights or "sentence-transformers" not in formats:
        shutil.rmtree(st_dir, ignore_errors=True)
    merge_info["mmapFallback"] = list(safeio.mmap_fallbacks)

    meta = build_metadata(
        spec,
        job,
        result,
        fingerprint=fp,
        formats=formats,
        merge=merge_info,
        verify=verify_info,
        metrics=metrics,
        st_info=st_info,
        files={},
    )
    meta["trainingCurve"] = _draw_curve(result, workspace, staging, formats, meta)
    st_card = _read_text(result.model_dir / "README.md") if result.model_dir is not None and not result.lora else None
    for fmt in formats:
        (staging / fmt / "README.md").write_text(model_card(meta, fmt, st_card))
    meta["files"] = file_sizes(staging)
    write_json(staging / EXPORT_METADATA, meta)
    _stage(watch, "publishing")  # the last safe point: past it, the publish is one rename away
    publish(staging, workspace, on_aside=lambda: _pause(watch, "aside"))
    dev = verify_info.get("maxDeviation")
    return {
        **meta,
        "_message": f"exported {result.name} as {', '.join(formats)}"
        + (f" (max deviation {dev:.2g})" if dev is not None else ""),
    }


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _draw_curve(result: Any, workspace: Path, staging: Path, formats: list[str],
                meta: dict[str, Any]) -> dict[str, Any] | None:
    """The loss (and eval) curve as a PNG beside each format's card; None without a log history."""
    from .plot import CURVE_FILE, draw_training_curve, log_history

    history = log_history(result.info, workspace)
    first = staging / formats[0] / CURVE_FILE
    shown = draw_training_curve(history, first, f"{meta.get('job') or 'fine-tune'}: {meta['training'].get('loss')}")
    if shown is None:
        return None
    for fmt in formats[1:]:
        shutil.copyfile(first, staging / fmt / CURVE_FILE)
    return {**shown, "file": CURVE_FILE}


def _shard_done(watch: PreemptionWatch, i: int, n: int, name: str) -> None:
    emit("export", stage="shard", shard=i, shards=n, file=name)
    if i < n:
        _stop_if_requested(watch, f"after shard {i} of {n}")
