"""Training results for export tests, built offline: a tiny BERT + a real peft LoRA adapter.

Lays a workspace out exactly as the training worker does (DESIGN.md / issue 3 contract):
`final/training.json`, `final/adapter/` (peft save of the adapter on the transformers model
inside the sentence-transformers Transformer module, plus tokenizer files), or a full model in
`final/`; optionally `checkpoints/checkpoint-N/` with the adapter files at its root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LORA_SPEC = {"r": 4, "alpha": 8, "dropout": 0.0}


def spec(
    base: Path | str,
    *,
    lora: dict[str, Any] | None = LORA_SPEC,
    export: dict[str, Any] | None = None,
    eval_inline: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A FineTuneJob spec dict for `finetune_api.spec.parse_spec`."""
    from tinymodel import pairs

    s: dict[str, Any] = {
        "model": {"base": str(base)},
        "dataset": {"inline": pairs(8), "columns": {"anchor": "question", "positive": "answer"}},
        "training": {"maxSteps": 3},
        "resources": {"gpus": 0},
        "export": {"formats": ["sentence-transformers", "huggingface", "adapter"], **(export or {})},
    }
    if eval_inline is not None:
        s["dataset"]["eval"] = {"inline": eval_inline}
    if lora is not None:
        s["lora"] = dict(lora)
    else:
        s["export"]["formats"] = [f for f in s["export"]["formats"] if f != "adapter"]
    return s


def make_adapter(
    base_dir: Path, out_dir: Path, *, seed: int = 1, scale: float = 0.5, **lora_kwargs: Any
) -> Path:
    """Save a peft LoRA adapter for the HF model inside the sentence-transformers model at base_dir.

    lora_B (and lora_embedding_A) are randomized so the adapter changes the model's outputs.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(base_dir), device="cpu")
    hf = st[0].model
    kwargs = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["query", "value"],
        **lora_kwargs,
    }
    pm = get_peft_model(hf, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(t in name for t in ("lora_B", "lora_embedding_A", "lora_embedding_B", "lora_A")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(out_dir))
    st.tokenizer.save_pretrained(str(out_dir))
    return out_dir


def training_json(base: str, *, lora: bool, steps: int = 3) -> dict[str, Any]:
    return {
        "baseModel": base,
        "lora": lora,
        "steps": steps,
        "epochs": 1.0,
        "loss": "MultipleNegativesRankingLoss",
        "seed": 42,
        "trainRows": 8,
        "evalRows": 0,
        "evalMetrics": {},
        "versions": {},
    }


def lora_workspace(workspace: Path, base_dir: Path, **lora_kwargs: Any) -> Path:
    """workspace/final/{training.json, adapter/} for a LoRA result on base_dir."""
    final = workspace / "final"
    make_adapter(base_dir, final / "adapter", **lora_kwargs)
    (final / "training.json").write_text(json.dumps(training_json(str(base_dir), lora=True)))
    return workspace


def full_workspace(workspace: Path, base_dir: Path, seed: int = 3) -> Path:
    """workspace/final/ = a complete sentence-transformers model (perturbed base), as a full fine-tune leaves it."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(base_dir), device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    final = workspace / "final"
    st.save(str(final))
    (final / "training.json").write_text(json.dumps(training_json(str(base_dir), lora=False)))
    return workspace


def bf16_copy(model_dir: Path, out: Path) -> Path:
    """The same sentence-transformers model with bf16 weights."""
    import torch
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(str(model_dir), device="cpu").to(torch.bfloat16).save(str(out))
    return out
