"""LoRA on the training side: the adapter spec.lora describes, put on the model, and saved in
peft's layout (`adapter/` in final/, which the export merges).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneSpec

from .errors import InvalidInput


def add_lora(model: Any, spec: FineTuneSpec) -> None:
    """Put the adapter spec.lora describes on the model (its default targets: peft's for the architecture)."""
    from peft import LoraConfig, TaskType
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    lo = spec.lora
    assert lo is not None
    hf = model.transformers_model
    targets: Any = list(lo.target_modules) if lo.target_modules else DEFAULTS.get(hf.config.model_type, "all-linear")
    names = {n.rsplit(".", 1)[-1] for n, _ in hf.named_modules()}
    if lo.target_modules:
        unknown = [t for t in lo.target_modules if t not in names and not any(n.endswith(t) for n, _ in hf.named_modules())]
        if unknown:
            raise InvalidInput(f"spec.lora.targetModules: {unknown} not in the model ({hf.config.model_type}); "
                               f"linear layers include: {', '.join(sorted(_linear_names(hf))[:12])}")
    config = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=targets,
                        use_rslora=lo.use_rslora, task_type=TaskType.FEATURE_EXTRACTION)
    model.add_adapter(config)


def _linear_names(hf: Any) -> set[str]:
    import torch

    return {n.rsplit(".", 1)[-1] for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}


def save_adapter(model: Any, out: Path, base: str) -> None:
    """peft's standard adapter layout (keys `base_model.model.<HF model path>`), plus the tokenizer."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    hf = model.transformers_model
    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(hf)
    state = {(k if k.startswith("base_model.model.") else f"base_model.model.{k}"): v.detach().cpu().contiguous()
             for k, v in state.items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = hf.peft_config["default"]
    config.base_model_name_or_path = base
    config.save_pretrained(str(out))
    model.tokenizer.save_pretrained(str(out))
