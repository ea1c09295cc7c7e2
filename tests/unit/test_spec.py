"""spec.py: defaults, and every invalid value gets an error naming its field."""

from __future__ import annotations

import pytest

from finetune_api.spec import SpecError, load_config, parse_spec

MINIMAL = {"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}}


def test_defaults_fill_the_design_sketch() -> None:
    s = parse_spec(MINIMAL)
    assert s.model.base == "builtin:all-MiniLM-L6-v2"
    assert s.training.loss == "MultipleNegativesRankingLoss"
    assert (s.training.epochs, s.training.batch_size, s.training.learning_rate) == (1, 32, 2.0e-5)
    assert s.training.checkpoint.every_steps == 100 and s.training.checkpoint.keep == 3
    assert s.lora is None
    assert s.export.formats == ("sentence-transformers",) and s.export.tolerance == 1.0e-5
    assert s.export.max_shard_bytes == 5 * 10**9
    assert s.backoff_limit == 3 and s.storage.reclaim_policy == "Retain"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"training": {"loss": "TripletLossX"}}, "spec.training.loss"),
        ({"training": {"learningRate": 0}}, "spec.training.learningRate"),
        ({"training": {"learningRate": -1e-5}}, "spec.training.learningRate"),
        ({"training": {"batchSize": 0}}, "spec.training.batchSize"),
        ({"training": {"epochs": "two"}}, "spec.training.epochs"),
        ({"training": {"lernRate": 1}}, "spec.training.lernRate"),
        ({"lora": {"r": 0}}, "spec.lora.r"),
        ({"lora": {"r": -4}}, "spec.lora.r"),
        ({"model": {"base": "../../etc/passwd"}}, "spec.model.base"),
        ({"model": {"base": "builtin:nope"}}, "spec.model.base"),
        ({"model": {"base": "x", "fromJob": "y"}}, "spec.model.fromJob"),
        ({"dataset": {"path": "a.jsonl", "inline": [{"anchor": "a"}]}}, "spec.dataset"),
        ({"dataset": {"path": "../x.jsonl"}}, "spec.dataset.path"),
        ({"dataset": {"inline": [{"anchor": "a"}], "columns": {"query": "q"}}}, "spec.dataset.columns.query"),
        ({"training": {"loss": "MatryoshkaLoss", "lossParams": {}}}, "spec.training.lossParams.matryoshkaDims"),
        ({"training": {"loss": "MatryoshkaLoss", "lossParams": {"matryoshkaDims": [8], "innerLoss": "MatryoshkaLoss"}}},
         "spec.training.lossParams.innerLoss"),
        ({"export": {"formats": ["onnx"]}}, "spec.export.formats[0]"),
        ({"export": {"maxShardSize": "lots"}}, "spec.export.maxShardSize"),
        ({"export": {"formats": ["adapter"]}}, "spec.export.formats"),
        ({"resources": {"memory": "sixteen"}}, "spec.resources.memory"),
        ({"storage": {"reclaimPolicy": "Recycle"}}, "spec.storage.reclaimPolicy"),
        ({"backoffLimit": -1}, "spec.backoffLimit"),
    ],
)
def test_invalid_values_name_their_field(patch: dict, field: str) -> None:
    spec = {**MINIMAL, **patch}
    if "dataset" in patch:
        spec["dataset"] = patch["dataset"]
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert e.value.field == field, str(e.value)


def test_load_config_accepts_whole_object_or_spec_yaml_or_json() -> None:
    whole = "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: a}\nspec:\n  dataset: {inline: [{anchor: a, positive: b}]}\n"
    meta, s = load_config(whole)
    assert meta["name"] == "a" and s.dataset.inline
    meta2, s2 = load_config('{"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}}')
    assert meta2 == {} and s2.dataset.inline == s.dataset.inline
    with pytest.raises(SpecError, match="kind"):
        load_config("kind: Pod\nspec: {}\n")


def test_yaml_numbers_read_as_kubectl_reads_them() -> None:
    """PyYAML's YAML 1.1 reads `2e-5` as a string; kubectl (YAML 1.2) as a number. A job file given
    to `finetune-operator local` or `--config` must mean what it means to the API server."""
    from finetune_api.spec import load_config, yaml_load

    assert yaml_load("a: 2e-5\nb: 5e-05\nc: 1.0e-4\nd: 3\ne: '2e-5'\nf: v1.2e3") == {
        "a": 2e-5, "b": 5e-5, "c": 1e-4, "d": 3, "e": "2e-5", "f": "v1.2e3"}  # fmt: skip
    _, spec = load_config("dataset: {inline: [{anchor: q, positive: a}]}\ntraining: {learningRate: 2e-5}\n")
    assert spec.training.learning_rate == 2e-5
