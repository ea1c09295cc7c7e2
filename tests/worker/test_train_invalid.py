"""Every bad config or data the issue lists: exit 2, a message naming what to fix, the summary written,
nothing written to the workspace. Runs the CLI in-process (the same code path as the pod)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.trainkit import pair_spec, write_config

pytestmark = pytest.mark.worker


def _run(tmp_path: Path, spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, Any]]:
    from finetune_worker.cli import main

    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(log))
    rc = main(["train", "--config", str(write_config(tmp_path, spec)), "--workspace", str(tmp_path / "ws")])
    return rc, json.loads(log.read_text())


def _with(spec: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    spec[section] = {**spec.get(section, {}), **values}
    return spec


def _cosent(base: Path, score: Any) -> dict[str, Any]:
    spec = pair_spec(base, loss="CoSENTLoss")
    rows = [{"question": f"q{i}", "answer": f"a{i}", "label": score} for i in range(8)]
    spec["dataset"] = {"inline": rows, "columns": {"anchor": "question", "positive": "answer", "score": "label"}}
    return spec


CASES: dict[str, tuple[Any, str]] = {
    "unknown loss": (lambda b, t: _with(pair_spec(b), "training", loss="TripletLos"),
                     "spec.training.loss: unknown value 'TripletLos'"),
    "zero learning rate": (lambda b, t: _with(pair_spec(b), "training", learningRate=0),
                           "spec.training.learningRate: must be greater than 0"),
    "negative learning rate": (lambda b, t: _with(pair_spec(b), "training", learningRate=-1e-5),
                               "spec.training.learningRate: must be greater than 0"),
    "zero batch size": (lambda b, t: _with(pair_spec(b), "training", batchSize=0),
                        "spec.training.batchSize: must be at least 1"),
    "zero lora rank": (lambda b, t: _with(pair_spec(b), "lora", r=0), "spec.lora.r: must be at least 1"),
    "matryoshka dim above embedding size": (
        lambda b, t: _with(pair_spec(b), "training", loss="MatryoshkaLoss", lossParams={"matryoshkaDims": [64, 16]}),
        "spec.training.lossParams.matryoshkaDims: [64] exceed the model's embedding size 32"),
    "cosent text score": (lambda b, t: _cosent(b, "high"),
                          "CoSENTLoss needs a float score column; column 'label' row 0 holds 'high'"),
    "cosent without score column": (
        lambda b, t: _with(pair_spec(b, loss="CoSENTLoss"), "dataset", columns={"anchor": "question", "positive": "answer"}),
        "CoSENTLoss needs column 'score'"),
    "misnamed column": (
        lambda b, t: _with(pair_spec(b), "dataset", columns={"anchor": "query", "positive": "answer"}),
        "needs column 'anchor'; no column 'query' in the data (spec.dataset.columns.anchor maps it to 'query'); "
        "columns are: answer, question"),
    "missing column": (lambda b, t: _with(pair_spec(b), "dataset", columns={"anchor": "question"}),
                       "MultipleNegativesRankingLoss needs column 'positive'"),
    "damaged parquet": (lambda b, t: _file(b, t, "train.parquet", b"PAR1 this is not parquet"),
                        "spec.dataset: cannot read"),
    "jsonl with a broken line": (lambda b, t: _file(b, t, "train.jsonl", b'{"question": "q", "answer": "a"}\n{oops\n'),
                                 "train.jsonl: line 2 is not JSON"),
    "missing data file": (lambda b, t: _with(pair_spec(b), "dataset", inline=None, path="data/none.jsonl"),
                          "spec.dataset: data file 'data/none.jsonl' not found"),
    "missing base path": (lambda b, t: _with(pair_spec(b), "model", base=str(t / "no-such-model")),
                          "spec.model.base: {t}/no-such-model does not exist"),
    "missing relative base": (lambda b, t: _with(pair_spec(b), "model", base="models/mine/v1"),
                              "spec.model.base: 'models/mine/v1' does not exist in the workspace"),
}


def _file(base: Path, tmp: Path, name: str, content: bytes) -> dict[str, Any]:
    (tmp / "ws/data").mkdir(parents=True, exist_ok=True)
    (tmp / "ws/data" / name).write_bytes(content)
    return _with(pair_spec(base), "dataset", inline=None, path=f"data/{name}")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_exits_2_with_a_specific_message(case: str, tiny_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    build, expected = CASES[case]
    spec = build(tiny_model, tmp_path)
    rc, summary = _run(tmp_path, spec, monkeypatch)
    assert rc == 2
    assert summary["result"] == "invalid"
    assert expected.replace("{t}", str(tmp_path)) in summary["message"]
    ws = tmp_path / "ws"
    assert not (ws / "checkpoints").exists() and not (ws / "final").exists()


def test_data_errors_come_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the base is a directory but not a model: had the model been loaded first, that would be the error
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    spec = _with(pair_spec(not_a_model), "dataset", columns={"anchor": "nope", "positive": "answer"})
    rc, summary = _run(tmp_path, spec, monkeypatch)
    assert rc == 2 and "no column 'nope'" in summary["message"]
    rc, summary = _run(tmp_path, pair_spec(not_a_model), monkeypatch)
    assert rc == 2 and summary["message"].startswith(f"spec.model: cannot load '{not_a_model}'")
