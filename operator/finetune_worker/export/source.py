"""Find what to export: the training result (final/ or a named checkpoint) and its base model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api.contract import CHECKPOINTS_DIR, FINAL_DIR
from finetune_api.spec import FineTuneSpec

from ..errors import InvalidInput
from .formats import read_modules, transformer_dir
from .merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .shards import INDEX_NAME, WEIGHTS_NAME


@dataclass
class TrainingResult:
    name: str  # "final" or "checkpoint-N"
    path: Path
    adapter_dir: Path | None  # LoRA: where adapter_config.json + adapter_model.safetensors live
    model_dir: Path | None  # full fine-tune: the trained sentence-transformers (or HF) model dir
    base_model: str | None  # resolved base model (a local dir), needed for LoRA
    info: dict[str, Any] = field(default_factory=dict)  # training.json (or what a checkpoint tells)

    @property
    def lora(self) -> bool:
        return self.adapter_dir is not None


def locate(spec: FineTuneSpec, workspace: Path) -> TrainingResult:
    """The training result to export. Raises InvalidInput with what is missing and where."""
    name = spec.export.checkpoint or FINAL_DIR
    path = workspace / FINAL_DIR if name == FINAL_DIR else workspace / CHECKPOINTS_DIR / name
    if not path.is_dir():
        what = "training has not completed" if name == FINAL_DIR else "no such checkpoint"
        raise InvalidInput(f"nothing to export: {path} does not exist ({what})")
    info = _read_json(path / "training.json") if (path / "training.json").exists() else _checkpoint_info(path)
    adapter_dir = _find_adapter(path)
    if adapter_dir is not None:
        base = info.get("baseModel") or _resolve_base(spec, workspace, adapter_dir)
        return TrainingResult(name, path, adapter_dir, None, _local_model_dir(base, spec), info)
    if (
        (path / WEIGHTS_NAME).exists()
        or (path / INDEX_NAME).exists()
        or (transformer_dir(path) / WEIGHTS_NAME).exists()
        or (transformer_dir(path) / INDEX_NAME).exists()
    ):
        return TrainingResult(name, path, None, path, info.get("baseModel"), info)
    raise InvalidInput(
        f"{path} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor model weights ({WEIGHTS_NAME})"
    )


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"unreadable {p}: {e}") from None


def _checkpoint_info(path: Path) -> dict[str, Any]:
    """What a Trainer checkpoint tells about itself (trainer_state.json)."""
    p = path / "trainer_state.json"
    if not p.exists():
        return {}
    state = _read_json(p)
    losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
    return {
        "steps": state.get("global_step"),
        "epochs": state.get("epoch"),
        "trainLoss": losses[-1] if losses else None,
        "checkpoint": path.name,
    }


def _find_adapter(path: Path) -> Path | None:
    candidates = [path / "adapter", path]
    if read_modules(path) is not None:
        candidates.append(transformer_dir(path))
    for c in candidates:
        if (c / ADAPTER_CONFIG).exists():
            if not (c / ADAPTER_WEIGHTS).exists():
                raise InvalidInput(f"{c} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (incomplete adapter)")
            return c
    return None


def _resolve_base(spec: FineTuneSpec, workspace: Path, adapter_dir: Path) -> str:
    try:
        from ..modelsrc import resolve_base_model
    except ImportError:
        resolve_base_model = None
    if resolve_base_model is not None:
        return str(resolve_base_model(spec, workspace))
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise InvalidInput(
            f"cannot tell the base model of {adapter_dir} (no training.json, no base_model_name_or_path)"
        )
    return str(base)


def _local_model_dir(base: str, spec: FineTuneSpec) -> str:
    """A local directory for the base model (the streaming merge reads its files)."""
    if Path(base).is_dir():
        return str(Path(base).resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(base, revision=spec.model.revision)
    except Exception as e:
        raise InvalidInput(
            f"base model {base!r} is not a local directory and could not be fetched: {e}"
        ) from None


def fingerprint(result: TrainingResult, spec: FineTuneSpec) -> str:
    """Changes when the input or the export settings change: an export with the same one is current."""
    h = hashlib.sha256()
    raw = spec.raw
    h.update(
        json.dumps({k: raw.get(k) for k in ("model", "lora", "export")}, sort_keys=True, default=str).encode()
    )
    h.update(str(result.base_model).encode())
    h.update(json.dumps(result.info, sort_keys=True, default=str).encode())
    for p in sorted(result.path.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json"):
            st = p.stat()
            h.update(f"{p.relative_to(result.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]
