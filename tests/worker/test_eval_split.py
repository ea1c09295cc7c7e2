"""The export's evaluation gate scores exactly the rows training held out (spec.dataset.eval.fraction):
never a training row, whatever the row count, file format or column mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_api.spec import parse_spec
from finetune_worker.data import load_training_data
from finetune_worker.export.evaluate import eval_rows

pytestmark = pytest.mark.worker


@pytest.mark.parametrize("rows", [45, 64, 7])  # 45 * 0.1 = 4.5: rounding and ceil used to disagree
@pytest.mark.parametrize("source", ["inline", "jsonl"])
def test_gate_rows_are_the_held_out_rows(rows: int, source: str, tmp_path: Path) -> None:
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(rows)]
    dataset: dict[str, object] = {"columns": {"anchor": "question", "positive": "answer"}, "eval": {"fraction": 0.1}}
    if source == "inline":
        dataset["inline"] = records
    else:
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        dataset["path"] = "train.jsonl"
    spec = parse_spec({"dataset": dataset, "training": {"seed": 7},
                       "export": {"evaluate": {"metric": "ndcg@10", "min": 0}}})  # fmt: skip
    data = load_training_data(spec, tmp_path)
    assert data.eval is not None
    held_out = sorted(data.eval["anchor"])
    gate = sorted(r["question"] for r in eval_rows(spec, tmp_path))
    assert gate == held_out
    assert not set(gate) & set(data.train["anchor"])
