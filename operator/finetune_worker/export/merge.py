"""Merge a LoRA adapter into its base model, streaming shard by shard.

For each output shard: read each base tensor (pread, one at a time), add the LoRA delta
`(B @ A) * scaling` (transposed for fan_in_fan_out and for embeddings, exactly as peft's
`get_delta_weight`) to target weights, replace modules_to_save tensors, write. Untouched tensors
are copied file to file. Memory stays at one tensor plus the adapter, whatever the model size.

The output shards and `model.safetensors.index.json` follow `save_pretrained`'s rules (shards.py:
tensors in the model's state-dict order, split greedily at `max_shard_bytes`), so a streamed export
is laid out like one from peft's `merge_and_unload()` + `save_pretrained`.

Adapter kinds streaming does not cover (DoRA, LoRA bias, conv layers, target_parameters,
trainable tokens, ...) are named by `unsupported_reason`; the caller then uses `peft_merge`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from ..safeio import ShardWriter, TensorInfo, load_file, read_header, read_tensor
from .shards import INDEX_NAME, WEIGHTS_NAME, shard_layout, shard_names, state_dict_order

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
)

# Config switches that change the merge formula; streaming handles none of them.
_UNSUPPORTED_FLAGS = (
    "use_dora",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
)


@dataclass
class Target:
    module: str  # module path in the HF model, e.g. encoder.layer.0.attention.self.query
    base_key: str  # the weight's key in the base safetensors files
    a: Any
    b: Any
    scaling: float
    transpose: bool  # fan_in_fan_out, or an embedding


@dataclass
class MergePlan:
    targets: dict[str, Target] = field(default_factory=dict)  # base_key -> target
    replacements: dict[str, Any] = field(default_factory=dict)  # base_key -> tensor (modules_to_save)


def base_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a HF model directory (single file or sharded with an index)."""
    index = model_dir / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise InvalidInput(f"no safetensors weights in {model_dir} (expected {WEIGHTS_NAME} or {INDEX_NAME})")
    out: dict[str, TensorInfo] = {}
    for f in files:
        tensors, _ = read_header(model_dir / f)
        out.update(tensors)
    return out


def load_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config, state dict without the `base_model.model.` prefix)."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    weights = load_file(adapter_dir / ADAPTER_WEIGHTS)
    return config, {
        k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k: v for k, v in weights.items()
    }


def unsupported_reason(
    config: dict[str, Any], state: dict[str, Any], base: dict[str, TensorInfo]
) -> str | None:
    """Why streaming cannot merge this adapter exactly (then peft's own merge is used), or None."""
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')} (streaming merges LoRA only)"
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            return f"{flag}={config[flag]!r}"
    if config.get("bias", "none") != "none":
        return f"bias={config['bias']!r}"
    for key, t in state.items():
        if "lora_magnitude_vector" in key:
            return "DoRA magnitude vectors"
        m = _LORA_KEY.match(key)
        if m and m["kind"] == "lora_A.weight" and t.dim() != 2:
            return f"{m['mod']} is not a Linear/Embedding layer (LoRA weight of rank {t.dim()})"
        if m and m["kind"] == "lora_A.weight":
            info = _find_base_key(m["mod"] + ".weight", base)
            if info is not None and len(base[info].shape) != 2:
                return f"{m['mod']} is a convolution (weight of rank {len(base[info].shape)})"
    return None


def _find_base_key(key: str, base: dict[str, TensorInfo]) -> str | None:
    if key in base:
        return key
    hits = [k for k in base if k.endswith("." + key)]  # base saved with a model prefix, e.g. `bert.`
    if len(hits) == 1:
        return hits[0]
    return None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key, without importing peft)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def missing_targets(state: dict[str, Any], base: dict[str, TensorInfo]) -> list[str]:
    """Modules the adapter's LoRA weights (lora_A/lora_B/lora_embedding_*) name that the base lacks."""
    mods = {m["mod"] for m in map(_LORA_KEY.match, state) if m}
    return sorted(mod for mod in mods if _find_base_key(mod + ".weight", base) is None)


def require_targets(state: dict[str, Any], base: dict[str, TensorInfo]) -> None:
    missing = missing_targets(state, base)
    if missing:
        raise InvalidInput(
            f"adapter targets missing from the base model: {', '.join(missing)} "
            "(was the adapter trained on a different base model?)"
        )


def plan_merge(config: dict[str, Any], state: dict[str, Any], base: dict[str, TensorInfo]) -> MergePlan:
    """Pair every adapter tensor with a base tensor. Raises InvalidInput naming each missing target."""
    plan = MergePlan()
    lora: dict[str, dict[str, Any]] = {}
    extras: dict[str, Any] = {}
    for key, t in state.items():
        m = _LORA_KEY.match(key)
        if m:
            lora.setdefault(m["mod"], {})[m["kind"]] = t
        else:
            extras[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = t
    missing: list[str] = []
    for mod, parts in sorted(lora.items()):
        emb = "lora_embedding_A" in parts
        a = parts.get("lora_embedding_A" if emb else "lora_A.weight")
        b = parts.get("lora_embedding_B" if emb else "lora_B.weight")
        if a is None or b is None:
            raise InvalidInput(f"adapter is incomplete: {mod} has {sorted(parts)} (needs both A and B)")
        base_key = _find_base_key(mod + ".weight", base)
        if base_key is None:
            missing.append(mod)
            continue
        r = int(_pattern_value(config.get("rank_pattern") or {}, mod, config.get("r", a.shape[0])))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, mod, config.get("lora_alpha", r)))
        if a.shape[0] != r:
            raise InvalidInput(
                f"adapter rank mismatch at {mod}: weights have rank {a.shape[0]}, config says {r}"
            )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        target = Target(mod, base_key, a, b, scaling, transpose=emb or bool(config.get("fan_in_fan_out")))
        want = tuple(base[base_key].shape)
        got = (b.shape[0], a.shape[1])
        if (got[::-1] if target.transpose else got) != want:
            raise InvalidInput(f"adapter shape mismatch at {mod}: delta {tuple(got)} vs base weight {want}")
        plan.targets[base_key] = target
    for key, t in sorted(extras.items()):
        base_key = _find_base_key(key, base)
        if base_key is None:
            missing.append(key)
            continue
        if tuple(t.shape) != tuple(base[base_key].shape):
            raise InvalidInput(
                f"modules_to_save tensor {key} has shape {tuple(t.shape)}, base has {base[base_key].shape}"
            )
        plan.replacements[base_key] = t
    if missing:
        raise InvalidInput(
            f"adapter targets missing from the base model: {', '.join(missing)} "
            "(was the adapter trained on a different base model?)"
        )
    if not plan.targets and not plan.replacements:
        raise InvalidInput("the adapter holds no LoRA weights")
    return plan


def delta(target: Target) -> Any:
    """peft's get_delta_weight in fp32 (peft keeps adapter weights in fp32: autocast_adapter_dtype).

    Left in fp32: `weight += delta` on a bf16/fp16 weight then adds in fp32 and rounds once, exactly
    as peft's `base_layer.weight.data += delta_weight` does.
    """
    out = target.b.float() @ target.a.float()
    out.mul_(target.scaling)  # in place: the same rounding as `out * scaling`, one buffer less
    return out.T if target.transpose else out


def stream_merge(
    base_dir: Path,
    plan: MergePlan,
    out_dir: Path,
    max_shard_bytes: int,
    on_shard: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Write the merged weights of base_dir + plan into out_dir. Returns the shard index dict."""
    base = base_tensors(base_dir)
    keys = state_dict_order(base_dir, sorted(base))
    sizes = {k: base[k].nbytes for k in keys}
    shards = shard_layout(keys, sizes, max_shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    fds: dict[Path, int] = {}
    # one read buffer for every target weight: no fresh pages to fault in per tensor
    scratch = bytearray(max((base[k].nbytes for k in plan.targets), default=0))
    try:
        for i, (name, shard) in enumerate(zip(names, shards, strict=True)):
            writer = ShardWriter(
                out_dir / name, [(k, base[k].dtype, base[k].shape, base[k].nbytes) for k in shard]
            )
            try:
                for k in writer.order:
                    info = base[k]
                    fd = fds.get(info.file)
                    if fd is None:
                        fd = fds[info.file] = os.open(info.file, os.O_RDONLY)
                    if k in plan.replacements:
                        writer.put_tensor(k, plan.replacements[k].to(_torch_dtype(info.dtype)))
                    elif k in plan.targets:
                        w = read_tensor(info, fd, scratch)
                        w += delta(plan.targets[k])
                        writer.put_tensor(k, w)
                        del w
                    else:
                        writer.copy_from(k, info, fd)
                    weight_map[k] = name
            except BaseException:
                # the error in flight (e.g. ENOSPC) says why; close() would mask it with "never written"
                os.close(writer.fd)
                raise
            writer.close()
            if on_shard:
                on_shard(i + 1, len(shards), name)
    finally:
        for fd in fds.values():
            os.close(fd)
    index = {
        "metadata": {
            "total_size": sum(sizes.values()),
            "total_parameters": sum(math.prod(base[k].shape) for k in keys),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    if len(shards) > 1:
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _torch_dtype(name: str) -> Any:
    import torch

    from ..safeio import DTYPES

    return getattr(torch, DTYPES[name][0])


def peft_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, max_shard_bytes: int) -> None:
    """Fallback: load the whole model, merge with peft's merge_and_unload, save_pretrained."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModel

    from ..safeio import without_mmap_on_enodev

    model = without_mmap_on_enodev(
        lambda: AutoModel.from_pretrained(str(base_dir)),
        lambda: AutoModel.from_pretrained(str(base_dir), disable_mmap=True),
        base_dir,
    )
    lcfg = PeftConfig.from_pretrained(str(adapter_dir))
    pm = get_peft_model(model, lcfg)
    weights = load_file(adapter_dir / ADAPTER_WEIGHTS)
    res = set_peft_model_state_dict(pm, weights)
    if getattr(res, "unexpected_keys", None):
        raise InvalidInput(f"adapter weights do not fit the base model: {res.unexpected_keys[:5]}")
    merged = pm.merge_and_unload()
    merged.save_pretrained(str(out_dir), max_shard_size=max_shard_bytes)
