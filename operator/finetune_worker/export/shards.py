"""How `save_pretrained` lays weights out in files, so a streamed merge writes the same files.

The names (`model.safetensors`, or `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`), the order of the tensors, and the greedy split at the shard size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _dot_natural_key(s: str) -> list[tuple[Any, ...]]:
    """transformers 5's `core_model_loading.dot_natural_key` (copied: importing it costs seconds)."""
    parts: list[tuple[Any, ...]] = []
    for part in s.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
        else:
            text = part.rstrip("0123456789")
            digits = part[len(text) :]
            parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def state_dict_order(model_dir: Path, keys: list[str]) -> list[str]:
    """Keys in the order save_pretrained writes a from_pretrained-loaded model.

    transformers 5 saves through `revert_weight_conversion`, which orders keys by
    `dot_natural_key`; older releases save in the model's state-dict order (read off a meta model).
    """
    from importlib.metadata import version

    if int(version("transformers").split(".")[0]) >= 5:
        return sorted(keys, key=_dot_natural_key)
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        with torch.device("meta"):
            order = list(AutoModel.from_config(AutoConfig.from_pretrained(str(model_dir))).state_dict())
    except Exception:  # custom architectures: the files' order
        return keys
    known = set(keys)
    ordered = [k for k in order if k in known]
    seen = set(ordered)
    return ordered + [k for k in keys if k not in seen]


def shard_layout(keys: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """save_pretrained's greedy split (huggingface_hub.split_state_dict_into_shards_factory)."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_size = 0
    for k in keys:
        n = sizes[k]
        if n > max_bytes:
            shards.append([k])
            continue
        if cur_size + n > max_bytes and cur:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(k)
        cur_size += n
    if cur:
        shards.append(cur)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
