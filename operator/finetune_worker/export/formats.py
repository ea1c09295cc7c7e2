"""Lay out the export formats from merged weights: sentence-transformers, huggingface, adapter.

Weight files are hard-linked between formats (copied where links are impossible), so a second
format costs no space. The sentence-transformers directory is the base (or fully fine-tuned)
model's module scaffolding with the Transformer module at the root, its Pooling module set to
`spec.export.pooling` when given (the base model's own pooling otherwise) and a Normalize module
present exactly when `spec.export.normalize` is true.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneSpec

from .merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .shards import INDEX_NAME, WEIGHTS_NAME

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
WEIGHT_FILES = (WEIGHTS_NAME, INDEX_NAME, "pytorch_model.bin", "pytorch_model.bin.index.json")
_SKIP = {
    "README.md",
    ".gitattributes",
    "training.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
}
POOLING_TYPE = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"
TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"


def read_modules(model_dir: Path) -> list[dict[str, Any]] | None:
    p = model_dir / "modules.json"
    return json.loads(p.read_text()) if p.exists() else None


def transformer_dir(model_dir: Path) -> Path:
    """Where the HF model (config + weights) of a sentence-transformers or HF model dir lives."""
    modules = read_modules(model_dir)
    for m in modules or []:
        if m.get("type", "").endswith("Transformer"):
            return model_dir / m.get("path", "")
    return model_dir


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def weight_files(weights_dir: Path) -> list[Path]:
    return sorted(p for p in weights_dir.iterdir() if p.name == INDEX_NAME or p.suffix == ".safetensors")


def _copy_model_files(src: Path, dst: Path, *, include_st: bool) -> None:
    """Copy the non-weight files of a model dir (config, tokenizer; ST files when include_st)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if not p.is_file() or p.name in _SKIP or p.name in WEIGHT_FILES or p.suffix == ".safetensors":
            continue
        if p.name in ST_FILES and not include_st:
            continue
        shutil.copy2(p, dst / p.name)


def build_huggingface(out: Path, hf_src: Path, weights_dir: Path, tokenizer_src: Path | None = None) -> None:
    """A plain HF model dir: config.json (+ generation config), safetensors weights, tokenizer."""
    _copy_model_files(hf_src, out, include_st=False)
    if tokenizer_src is not None:
        for p in tokenizer_src.iterdir():
            if p.is_file() and (
                p.name.startswith(("tokenizer", "special_tokens"))
                or p.name in ("vocab.txt", "merges.txt", "vocab.json")
            ):
                shutil.copy2(p, out / p.name)
    for w in weight_files(weights_dir):
        link_or_copy(w, out / w.name)


def build_sentence_transformers(
    out: Path, scaffold: Path, weights_dir: Path, spec: FineTuneSpec, tokenizer_src: Path | None = None
) -> dict[str, Any]:
    """A sentence-transformers dir. scaffold: the base (LoRA) or trained (full) ST/HF model dir.

    Returns {"pooling": mode, "normalize": bool, "modules": [...]} for the card and metadata.
    """
    modules = read_modules(scaffold)
    hf_src = transformer_dir(scaffold)
    build_huggingface(out, hf_src, weights_dir, tokenizer_src)
    if modules is None:  # a plain HF base: Transformer at the root, pooling from the spec (mean by default)
        modules = _modules_for_plain_hf(out, spec)
    else:
        modules = _modules_from_scaffold(out, scaffold, hf_src, modules, spec)
    if spec.export.normalize:
        n = len(modules)
        (out / f"{n}_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": NORMALIZE_TYPE})
    for i, m in enumerate(modules):
        m["idx"] = i
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    if spec.training.max_seq_length and (out / "sentence_bert_config.json").exists():
        cfg = json.loads((out / "sentence_bert_config.json").read_text())
        cfg["max_seq_length"] = spec.training.max_seq_length
        (out / "sentence_bert_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {
        "pooling": pooling_mode(out),
        "normalize": spec.export.normalize,
        "modules": [m["type"] for m in modules],
    }


def _modules_for_plain_hf(out: Path, spec: FineTuneSpec) -> list[dict[str, Any]]:
    """The sentence-transformers files for a plain HF model: its Transformer at the root, then Pooling."""
    sbert = {"max_seq_length": spec.training.max_seq_length} if spec.training.max_seq_length else {}
    (out / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2) + "\n")
    (out / "config_sentence_transformers.json").write_text(
        json.dumps({"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"}, indent=2) + "\n"
    )
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE}]
    dim = json.loads((out / "config.json").read_text()).get("hidden_size")
    modules.append(_pooling_module(out, 1, dim, spec.export.pooling or "mean"))
    return modules


def _modules_from_scaffold(
    out: Path, scaffold: Path, hf_src: Path, modules: list[dict[str, Any]], spec: FineTuneSpec
) -> list[dict[str, Any]]:
    """The scaffold's modules, its Transformer moved to the root, its Pooling replaced when the spec
    names one, its Normalize dropped (added back per spec.export.normalize); the other modules copied."""
    for name in ST_FILES:
        if (hf_src / name).exists() and not (out / name).exists():
            shutil.copy2(hf_src / name, out / name)
        elif (scaffold / name).exists():
            shutil.copy2(scaffold / name, out / name)
    kept = []
    for m in modules:
        path = m.get("path", "")
        if m.get("type", "").endswith("Transformer"):
            m = {**m, "path": ""}
        elif m.get("type", "").endswith("Normalize"):
            continue  # re-added by the caller per spec.export.normalize
        elif m.get("type", "").endswith("Pooling") and spec.export.pooling:
            dim = _pooling_dim(scaffold / path) or json.loads((out / "config.json").read_text()).get(
                "hidden_size"
            )
            m = _pooling_module(out, len(kept), dim, spec.export.pooling, name=m.get("name"), path=path)
        elif path:
            src = scaffold / path
            if src.is_dir():
                shutil.copytree(src, out / path, dirs_exist_ok=True)
            else:
                (out / path).mkdir(parents=True, exist_ok=True)
        kept.append(m)
    return kept


def _pooling_dim(pooling_dir: Path) -> int | None:
    p = pooling_dir / "config.json"
    if not p.exists():
        return None
    cfg = json.loads(p.read_text())
    return cfg.get("embedding_dimension") or cfg.get("word_embedding_dimension")


def _pooling_module(
    out: Path, idx: int, dim: int, mode: str, name: str | None = None, path: str | None = None
) -> dict[str, Any]:
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    path = path or f"{idx}_Pooling"
    target = out / path
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    Pooling(dim, pooling_mode=mode).save(str(target))
    return {"idx": idx, "name": name or str(idx), "path": path, "type": POOLING_TYPE}


def pooling_mode(st_dir: Path) -> str | None:
    """The pooling mode of a sentence-transformers dir (legacy boolean configs included)."""
    for m in read_modules(st_dir) or []:
        if m.get("type", "").endswith("Pooling"):
            p = st_dir / m.get("path", "") / "config.json"
            if not p.exists():
                return None
            cfg = json.loads(p.read_text())
            if "pooling_mode" in cfg:
                mode = cfg["pooling_mode"]
                return mode if isinstance(mode, str) else "+".join(mode)
            legacy = {
                "pooling_mode_cls_token": "cls",
                "pooling_mode_mean_tokens": "mean",
                "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean",
                "pooling_mode_lasttoken": "lasttoken",
            }
            return "+".join(v for k, v in legacy.items() if cfg.get(k)) or None
    return None


def build_adapter(out: Path, adapter_dir: Path, tokenizer_src: Path | None = None) -> None:
    """The adapter as peft saved it (adapter_config.json + adapter_model.safetensors) + tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        link_or_copy(adapter_dir / name, out / name)
    for src in (adapter_dir, tokenizer_src):
        if src is None:
            continue
        for p in src.iterdir():
            if (
                p.is_file()
                and not (out / p.name).exists()
                and (
                    p.name.startswith(("tokenizer", "special_tokens"))
                    or p.name in ("vocab.txt", "merges.txt", "vocab.json")
                )
            ):
                shutil.copy2(p, out / p.name)
