"""Verify an export before it is published.

LoRA: the merged model's embeddings on probe texts must match the unmerged model (base weights
+ the adapter applied by peft, through the same pooling/normalize pipeline) within the tolerance
(fp32: max |Δ| ≤ tolerance; bf16/fp16 weights: cosine ≥ 0.999), and must differ from the base
model's. An adapter that has no effect on the base (or does not load into it) is a permanent
problem with the inputs (InvalidAdapter, exit 2); a merge that silently wrote the base weights
although the adapter does change them is a failure of the export (VerificationFailed, exit 1).
Full fine-tune: the re-formatted model must embed exactly like the trained one.
Every format is reloaded the way users load it: `SentenceTransformer(dir)`,
`transformers.AutoModel.from_pretrained(dir)`, and peft for the adapter.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneSpec

from ..errors import InvalidAdapter, VerificationFailed
from ..safeio import load_file, without_mmap_on_enodev

log = logging.getLogger(__name__)

PROBES = (
    "how do i reset my password",
    "the invoice for my order never arrived",
    "Can I change the shipping address after the package left the store?",
    "battery drains fast after the latest update",
    "two factor code not working",
    "What are your support hours on weekends?",
    "refund",
    "A longer probe sentence that mentions privacy, security settings, data backup and restore, "
    "and asks whether the subscription plan can be downgraded without losing anything.",
)
LOW_PRECISION_MIN_COSINE = 0.999


def load_st(path: Path, spec: FineTuneSpec) -> Any:
    """SentenceTransformer(path) on CPU; retried without mmap where mmap fails with errno 19."""
    from sentence_transformers import SentenceTransformer

    kwargs = {"device": "cpu", "trust_remote_code": spec.model.trust_remote_code}
    return without_mmap_on_enodev(
        lambda: SentenceTransformer(str(path), **kwargs),
        lambda: SentenceTransformer(str(path), model_kwargs={"disable_mmap": True}, **kwargs),
        path,
    )


def load_hf(path: Path, spec: FineTuneSpec) -> Any:
    """transformers.AutoModel.from_pretrained(path), with the same errno 19 fallback."""
    from transformers import AutoModel

    kwargs = {"trust_remote_code": spec.model.trust_remote_code}
    model = without_mmap_on_enodev(
        lambda: AutoModel.from_pretrained(str(path), **kwargs),
        lambda: AutoModel.from_pretrained(str(path), disable_mmap=True, **kwargs),
        path,
    )
    return model.eval()


def attach_adapter(hf_model: Any, adapter_dir: Path) -> Any:
    """Apply a saved peft adapter to hf_model in place (weights read without mmap on errno 19)."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    pm = get_peft_model(hf_model, config)
    result = set_peft_model_state_dict(pm, load_file(adapter_dir / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise InvalidAdapter(
            f"adapter weights do not fit the base model (keys with no place in it: {result.unexpected_keys[:5]})"
        )
    return pm.eval()


def _encode(st: Any) -> Any:
    import torch

    with torch.no_grad():
        return st.encode(
            list(PROBES), convert_to_tensor=True, batch_size=len(PROBES), show_progress_bar=False
        ).float()


def _compare(a: Any, b: Any) -> tuple[float, float]:
    """(max abs difference, min cosine similarity) between two embedding matrices."""
    import torch

    dev = float((a - b).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
    return dev, cos


def _within(dev: float, cos: float, tolerance: float, low_precision: bool) -> bool:
    return cos >= LOW_PRECISION_MIN_COSINE if low_precision else dev <= tolerance


def _hidden(model: Any, tokenizer: Any) -> Any:
    import torch

    enc = tokenizer(list(PROBES), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state.float()


def _no_effect_check(e_adapted: Any, e_base: Any, tolerance: float) -> float:
    """max |Δ| the adapter makes to the base's embeddings; raises InvalidAdapter when it is within tolerance."""
    dev, _ = _compare(e_adapted, e_base)
    if dev <= tolerance:
        raise InvalidAdapter(
            f"the adapter has no effect: the base model with the adapter applied embeds like the base alone "
            f"(max |Δ| {dev:.3g} ≤ tolerance {tolerance:g}); its LoRA weights are zero or too small to matter "
            "(was it trained? is it the adapter of this base model?)"
        )
    return dev


def verify_export(
    st_dir: Path,
    spec: FineTuneSpec,
    *,
    reference_hf: Path,
    adapter_dir: Path | None,
    hf_dir: Path | None,
    low_precision: bool,
) -> dict[str, Any]:
    """Run every check; return the figures for metadata. Raises VerificationFailed.

    reference_hf: the HF weights the export must reproduce (the base for LoRA, the trained
    model for a full fine-tune); adapter_dir: the adapter applied on top of it (LoRA only).
    """
    tol = spec.export.tolerance
    st = load_st(st_dir, spec)  # the export as users load it
    e_merged = _encode(st)
    tokenizer = st.tokenizer
    h_merged = _hidden(st[0].model, tokenizer)
    report: dict[str, Any] = {"probes": len(PROBES), "tolerance": tol, "lowPrecision": low_precision}
    e_ref = _reference_embeddings(st, spec, reference_hf, adapter_dir, e_merged, report)
    del st
    gc.collect()
    dev, cos = _compare(e_merged, e_ref)
    report.update(maxDeviation=dev, minCosine=cos)
    if not _within(dev, cos, tol, low_precision):
        want = f"cosine ≥ {LOW_PRECISION_MIN_COSINE}" if low_precision else f"max |Δ| ≤ {tol:g}"
        what = "base+adapter" if adapter_dir is not None else "the trained model"
        raise VerificationFailed(
            f"merged model deviates from {what}: max |Δ| {dev:.3g}, min cosine {cos:.6f} (need {want})"
        )
    _check_automodel_reloads(
        (("sentence-transformers dir", st_dir), ("huggingface dir", hf_dir)), spec, tokenizer, h_merged, low_precision
    )
    report["reloaded"] = ["SentenceTransformer", "AutoModel"] + (["peft"] if adapter_dir is not None else [])
    return report


def _reference_embeddings(
    st: Any, spec: FineTuneSpec, reference_hf: Path, adapter_dir: Path | None, e_merged: Any, report: dict[str, Any]
) -> Any:
    """The probes' embeddings through the export's own pipeline (pooling, normalize) over the reference
    weights, with the adapter applied by peft for LoRA; one model in memory at a time. For LoRA, also
    checks that the adapter changes the base and that the merge did not simply write the base weights."""
    st[0].model = None
    gc.collect()
    st[0].model = load_hf(reference_hf, spec)
    if adapter_dir is None:
        return _encode(st)
    tol = spec.export.tolerance
    e_base = _encode(st)
    attach_adapter(st[0].model, adapter_dir)
    e_ref = _encode(st)
    _no_effect_check(e_ref, e_base, tol)
    base_dev, _ = _compare(e_merged, e_base)
    report["baseDeviation"] = base_dev
    if base_dev <= tol:
        raise VerificationFailed(
            f"the merged model embeds exactly like the base model (max |Δ| {base_dev:.3g} ≤ {tol:g}) "
            "although the adapter changes it: the merge wrote the base weights"
        )
    return e_ref


def _check_automodel_reloads(
    dirs: tuple[tuple[str, Path | None], ...], spec: FineTuneSpec, tokenizer: Any, h_merged: Any, low_precision: bool
) -> None:
    """transformers.AutoModel on each exported dir must give the export's own hidden states."""
    tol = spec.export.tolerance
    for label, d in dirs:
        if d is None:
            continue
        hf = load_hf(d, spec)
        hdev, hcos = _compare(_hidden(hf, tokenizer).flatten(0, 1), h_merged.flatten(0, 1))
        del hf
        gc.collect()
        if not _within(hdev, hcos, tol, low_precision):
            raise VerificationFailed(
                f"transformers.AutoModel on the {label} disagrees with the export: max |Δ| {hdev:.3g}"
            )


def verify_adapter_only(base_model: Path, adapter_dir: Path, spec: FineTuneSpec) -> dict[str, Any]:
    """An unmerged export: the adapter must load onto the base with peft and change its embeddings."""
    st = load_st(base_model, spec)
    e_base = _encode(st)
    attach_adapter(st[0].model, adapter_dir)
    base_dev = _no_effect_check(_encode(st), e_base, spec.export.tolerance)
    return {"probes": len(PROBES), "baseDeviation": base_dev, "maxDeviation": None, "reloaded": ["peft"]}
