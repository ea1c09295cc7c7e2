"""export/metadata.json and the model card (README.md) written into each format."""

from __future__ import annotations

import json
import time
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.spec import FineTuneSpec

if TYPE_CHECKING:
    from .source import TrainingResult


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (
        "torch",
        "transformers",
        "sentence-transformers",
        "peft",
        "safetensors",
        "finetune-operator",
    ):
        try:
            out[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            out[name] = None
    return out


def data_summary(spec: FineTuneSpec) -> dict[str, Any]:
    d = spec.dataset
    source = d.path or d.hub or (f"inline ({len(d.inline)} records)" if d.inline else None)
    return {"source": source, "columns": dict(d.columns), "split": d.split}


def build_metadata(
    spec: FineTuneSpec,
    job: dict[str, Any],
    result: Any,
    *,
    fingerprint: str,
    formats: list[str],
    merge: dict[str, Any],
    verify: dict[str, Any],
    metrics: dict[str, float] | None,
    st_info: dict[str, Any] | None,
    files: dict[str, int],
) -> dict[str, Any]:
    info = result.info
    return {
        "job": job.get("name"),
        "namespace": job.get("namespace"),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
        "source": result.name,
        "baseModel": result.base_model,  # as resolved (a local directory)
        "baseModelSpec": spec.model.base or f"fromJob:{spec.model.from_job}",  # as the user named it
        "lora": result.lora,
        "data": data_summary(spec),
        "training": {
            "loss": info.get("loss", spec.training.loss),
            "steps": info.get("steps"),
            "epochs": info.get("epochs"),
            "seed": info.get("seed", spec.training.seed),
            "trainRows": info.get("trainRows"),
            "evalRows": info.get("evalRows"),
            "evalMetrics": info.get("evalMetrics"),
            "trainLoss": info.get("trainLoss"),
        },
        "formats": formats,
        "merge": merge,
        "pooling": (st_info or {}).get("pooling"),
        "normalize": (st_info or {}).get("normalize"),
        "maxDeviation": verify.get("maxDeviation"),
        "verify": verify,
        "metrics": metrics or {},
        "versions": {"training": info.get("versions"), "export": versions()},
        "files": files,
    }


def trained_card(result: TrainingResult) -> str | None:
    """The README.md sentence-transformers wrote into a fully fine-tuned model; None for a LoRA result
    (or when there is none to read)."""
    if result.model_dir is None or result.lora:
        return None
    try:
        return (result.model_dir / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


ST_SECTIONS = ("## Training Details", "## Citation")  # what sentence-transformers' own card says best


def st_card_sections(card: str | None) -> str:
    """The parts of the card sentence-transformers wrote when it saved a trained model (its training
    dataset samples, hyperparameters, training logs, framework versions, citations), so the export's
    card carries them instead of restating them; '' when there is no such card (a LoRA result)."""
    if not card:
        return ""
    lines, keep, out = card.splitlines(), False, []
    for line in lines:
        if line.startswith("## "):
            keep = line.startswith(ST_SECTIONS)
        if keep:
            out.append("#" + line if line.startswith("#") else line)  # one level down, under our heading
    return "\n".join(out).strip()


def model_card(meta: dict[str, Any], fmt: str, st_card: str | None = None) -> str:
    """A short README.md for one export format; for sentence-transformers, followed by the sections of
    sentence-transformers' own card that it wrote when training saved the model (`st_card`)."""
    name = meta.get("job") or "fine-tuned embedding model"
    base = meta.get("baseModelSpec") or meta.get("baseModel")
    t = meta["training"]
    load = _usage(meta, fmt, base)
    metrics = _metrics_table(meta)
    picture = _curve_section(meta)
    return f"""---
library_name: {"peft" if fmt == "adapter" else "sentence-transformers"}
base_model: {base}
tags: [sentence-transformers, feature-extraction, finetune-operator{", lora" if meta.get("lora") else ""}]
---

# {name}

Fine-tuned from `{base}` by finetune-operator ({"LoRA adapter" + (", merged" if fmt != "adapter" else "") if meta.get("lora") else "full fine-tune"}).

- Training: loss {t.get("loss")}, {t.get("steps")} steps, {t.get("epochs")} epochs, seed {t.get("seed")}, data: {meta["data"].get("source")}
- Exported from: {meta.get("source")}; merge: {meta["merge"].get("method")}
- Pooling: {meta.get("pooling")}, normalize: {meta.get("normalize")}
{picture}
## Verification

{_verified(meta)}.

## Evaluation

{metrics}

## Usage

```python
{load}
```
""" + (f"\n## From sentence-transformers' model card\n\n{st_sections}\n" if (st_sections := st_card_sections(st_card if fmt == "sentence-transformers" else None)) else "")


def _usage(meta: dict[str, Any], fmt: str, base: str | None) -> str:
    """How to load this format, as Python."""
    return {
        "sentence-transformers": (
            "from sentence_transformers import SentenceTransformer\n"
            'model = SentenceTransformer("path/to/sentence-transformers")\n'
            'embeddings = model.encode(["How do I reset my password?"])'
        ),
        "huggingface": (
            "from transformers import AutoModel, AutoTokenizer\n"
            'model = AutoModel.from_pretrained("path/to/huggingface")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/huggingface")\n'
            f"# pool token embeddings with {meta.get('pooling') or 'mean'} pooling"
            + (" and L2-normalize" if meta.get("normalize") else "")
        ),
        "adapter": (
            "from peft import PeftModel\nfrom transformers import AutoModel\n"
            f'model = PeftModel.from_pretrained(AutoModel.from_pretrained("{base}"), "path/to/adapter")'
        ),
    }[fmt]


def _curve_section(meta: dict[str, Any]) -> str:
    """The training curve's section (the PNG beside the card), or '' when none was drawn."""
    curve = meta.get("trainingCurve") or {}
    if not curve.get("file"):
        return ""
    return (
        f"\n## Training curve\n\n![training loss{' and evaluation metrics' if curve.get('evalMetrics') else ''} "
        f"over steps]({curve['file']})\n"
    )


def _metrics_table(meta: dict[str, Any]) -> str:
    """The export's evaluation gate (when spec.export.evaluate is set) and the eval split's final
    metrics from training, as one table; says so when there is neither."""
    rows = [f"| {k} (export evaluation) | {v:.4f} |" for k, v in sorted((meta.get("metrics") or {}).items())
            if isinstance(v, (int, float))]
    evals = (meta.get("training") or {}).get("evalMetrics") or {}
    rows += [f"| {k.removeprefix('eval_')} (eval split, end of training) | {v:.4f} |" for k, v in sorted(evals.items())
             if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second", "epoch"))]
    if not rows:
        return "No evaluation: the job had no eval split and no `export.evaluate` gate."
    return "| metric | value |\n|---|---|\n" + "\n".join(rows)


def _verified(meta: dict[str, Any]) -> str:
    v = meta.get("verify") or {}
    if meta.get("maxDeviation") is None:
        return f"the adapter loads with peft and changes the base model's embeddings (max |Δ| {v.get('baseDeviation', 0):.3g})"
    what = "the unmerged model (base + adapter)" if meta.get("lora") else "the trained model"
    return (
        f"embeddings of {v.get('probes')} probe texts match {what}: max |Δ| {meta['maxDeviation']:.2g}, "
        f"reloaded with {', '.join(v.get('reloaded', []))}"
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
