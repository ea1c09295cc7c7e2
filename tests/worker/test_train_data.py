"""Training data from every supported source, mapped to the loss's columns, with eval splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from worker.trainkit import COLUMNS

pytestmark = pytest.mark.worker

ROWS = [{"question": f"what is item {i}?", "answer": f"item {i} is a thing", "extra": i} for i in range(20)]


def _spec(dataset: dict[str, Any], loss: str = "MultipleNegativesRankingLoss") -> Any:
    from finetune_api.spec import parse_spec

    return parse_spec({"dataset": dataset, "training": {"loss": loss, "seed": 7}, "resources": {"gpus": 0}})


def _write(ws: Path, fmt: str) -> str:
    ws.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (ws / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        return "d.jsonl"
    if fmt == "csv":
        with (ws / "d.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
        return "d.csv"
    from datasets import Dataset

    ds = Dataset.from_list(ROWS)
    if fmt == "parquet":
        ds.to_parquet(str(ws / "d.parquet"))
        return "d.parquet"
    ds.save_to_disk(str(ws / "saved"))
    return "saved"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "save_to_disk"])
def test_every_file_format_reads_and_maps_columns(fmt: str, tmp_path: Path) -> None:
    from finetune_worker.data import load_training_data

    path = _write(tmp_path, fmt)
    data = load_training_data(_spec({"path": path, "columns": COLUMNS}), tmp_path)
    assert data.train.column_names == ["anchor", "positive"]  # the loss's order; 'extra' dropped
    assert data.train[3] == {"anchor": "what is item 3?", "positive": "item 3 is a thing"}
    assert data.eval is None


def test_swapped_mapping_and_optional_negative(tmp_path: Path) -> None:
    from finetune_worker.data import load_training_data

    rows = [{"a": "x", "p": "y", "n": "z"}]
    data = load_training_data(_spec({"inline": rows, "columns": {"anchor": "p", "positive": "a", "negative": "n"}}), tmp_path)
    assert data.train[0] == {"anchor": "y", "positive": "x", "negative": "z"}


def test_eval_fraction_is_seeded_and_disjoint(tmp_path: Path) -> None:
    from finetune_worker.data import load_training_data

    spec = _spec({"inline": ROWS, "columns": COLUMNS, "eval": {"fraction": 0.2}})
    a, b = load_training_data(spec, tmp_path), load_training_data(spec, tmp_path)
    assert (len(a.train), len(a.eval)) == (16, 4)
    assert a.eval["anchor"] == b.eval["anchor"]  # same seed, same split: a resumed run trains on the same rows
    assert not set(a.eval["anchor"]) & set(a.train["anchor"])


def test_eval_from_path_and_inline(tmp_path: Path) -> None:
    from finetune_worker.data import load_training_data

    path = _write(tmp_path, "jsonl")
    d1 = load_training_data(_spec({"inline": ROWS, "columns": COLUMNS, "eval": {"path": path}}), tmp_path)
    d2 = load_training_data(_spec({"inline": ROWS, "columns": COLUMNS, "eval": {"inline": ROWS[:3]}}), tmp_path)
    assert len(d1.eval) == 20 and d2.eval.column_names == ["anchor", "positive"] and len(d2.eval) == 3


def test_cosent_scores_become_floats_from_csv_text(tmp_path: Path) -> None:
    from finetune_worker.data import load_training_data

    with (tmp_path / "s.csv").open("w", newline="") as f:
        f.write("s1,s2,sim\nA cat,A feline,0.9\nA cat,A car,0\n")
    data = load_training_data(_spec({"path": "s.csv", "columns": {"anchor": "s1", "positive": "s2", "score": "sim"}},
                                    loss="CoSENTLoss"), tmp_path)
    assert data.train.features["score"].dtype == "float32"
    assert data.train["score"] == pytest.approx([0.9, 0.0])


def test_tsdae_noise_is_deterministic_and_deletes_words(tmp_path: Path) -> None:
    from finetune_worker.data import load_training_data

    texts = [{"text": " ".join(f"w{i}_{j}" for j in range(20))} for i in range(10)]
    spec = _spec({"inline": texts}, loss="DenoisingAutoEncoderLoss")
    a, b = load_training_data(spec, tmp_path), load_training_data(spec, tmp_path)
    assert a.train.column_names == ["noisy", "text"]
    assert a.train["noisy"] == b.train["noisy"]
    kept = [len(n.split()) / len(t.split()) for n, t in zip(a.train["noisy"], a.train["text"], strict=True)]
    assert 0.2 < sum(kept) / len(kept) < 0.6  # default deletes 60% of the words
