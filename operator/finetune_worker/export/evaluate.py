"""The optional evaluation gate: score the export on the eval data, refuse to publish below `min`.

Ranking metrics (ndcg@10, mrr@10, map@100, accuracy@1, recall@10) run sentence-transformers'
InformationRetrievalEvaluator with anchors as queries and positives as the corpus; spearman and
pearson run EmbeddingSimilarityEvaluator on (anchor, positive, score) rows. The eval rows come
from `spec.dataset.eval` (inline, a file in the workspace, or a fraction of the training data
split with the training seed).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneSpec

from ..errors import GateFailed, InvalidInput

SIMILARITY_METRICS = ("spearman", "pearson")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        return list(ds["train"] if hasattr(ds, "keys") and "train" in ds else ds)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    raise InvalidInput(
        f"{path}: unsupported data file type {suffix!r} (jsonl, json, csv, parquet, or a datasets dir)"
    )


def _workspace_file(workspace: Path, rel: str, field: str) -> Path:
    p = Path(rel) if Path(rel).is_absolute() else workspace / rel
    if not p.exists():
        raise InvalidInput(f"{field}: {p} does not exist")
    return p


def eval_rows(spec: FineTuneSpec, workspace: Path) -> list[dict[str, Any]]:
    """The eval records, with file-side column names."""
    ev = spec.dataset.eval
    if ev is None:
        raise InvalidInput(
            "spec.export.evaluate needs eval data: set spec.dataset.eval (fraction, path or inline)"
        )
    if ev.inline is not None:
        return [dict(r) for r in ev.inline]
    if ev.path is not None:
        return _read_rows(_workspace_file(workspace, ev.path, "spec.dataset.eval.path"))
    # a fraction of the training data: exactly the rows the training worker held out
    from ..data import read_training_rows, split_eval_fraction

    raw, _ = read_training_rows(spec, workspace)
    _, held_out = split_eval_fraction(raw, ev.fraction, spec.training.seed)
    return list(held_out)


def _column(rows: list[dict[str, Any]], spec: FineTuneSpec, model_side: str, position: int) -> list[Any]:
    name = spec.dataset.columns.get(model_side, model_side)
    if rows and name not in rows[0]:
        keys = list(rows[0])
        if model_side in spec.dataset.columns or position >= len(keys):
            raise InvalidInput(f"eval data has no column {name!r} (columns: {', '.join(keys)})")
        name = keys[position]
    return [r[name] for r in rows]


def evaluate(model: Any, spec: FineTuneSpec, workspace: Path) -> dict[str, float]:
    """All metrics of the configured evaluator on the eval rows (e.g. {"ndcg@10": 0.41, ...})."""
    assert spec.export.evaluate is not None
    metric = spec.export.evaluate.metric
    rows = eval_rows(spec, workspace)
    if not rows:
        raise InvalidInput("the eval data is empty")
    anchors = [str(x) for x in _column(rows, spec, "anchor", 0)]
    positives = [str(x) for x in _column(rows, spec, "positive", 1)]
    if metric in SIMILARITY_METRICS:
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

        try:
            scores = [float(x) for x in _column(rows, spec, "score", 2)]
        except (TypeError, ValueError):
            raise InvalidInput("the eval data's score column must hold numbers") from None
        ev = EmbeddingSimilarityEvaluator(anchors, positives, scores, name="eval", show_progress_bar=False)
        raw = ev(model)
        return {k: float(raw[f"eval_{k}_cosine"]) for k in SIMILARITY_METRICS if f"eval_{k}_cosine" in raw}
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    corpus_ids: dict[str, str] = {}
    for p in positives:
        corpus_ids.setdefault(p, f"d{len(corpus_ids)}")
    queries = {f"q{i}": a for i, a in enumerate(anchors)}
    relevant = {f"q{i}": {corpus_ids[p]} for i, p in enumerate(positives)}
    ev = InformationRetrievalEvaluator(
        queries,
        {v: k for k, v in corpus_ids.items()},
        relevant,
        name="eval",
        show_progress_bar=False,
        batch_size=32,
    )
    raw = ev(model)
    out = {}
    for key, value in raw.items():
        if key.startswith("eval_cosine_"):
            out[key[len("eval_cosine_") :]] = float(value)
    return out


def gate(model: Any, spec: FineTuneSpec, workspace: Path) -> dict[str, float]:
    """Evaluate and compare with spec.export.evaluate.min. Raises GateFailed below it."""
    assert spec.export.evaluate is not None
    want = spec.export.evaluate
    metrics = evaluate(model, spec, workspace)
    if want.metric not in metrics:
        raise InvalidInput(
            f"the evaluator did not report {want.metric!r} (got: {', '.join(sorted(metrics))})"
        )
    value = metrics[want.metric]
    if value < want.min:
        raise GateFailed(
            f"evaluation gate failed: {want.metric} = {value:.4f} < min {want.min:g}; not publishing", metrics
        )
    return metrics
