"""The config a worker pod receives in FINETUNE_CONFIG reads back as the spec the operator saw."""

from __future__ import annotations

from finetune_api.spec import load_config, parse_spec
from finetune_operator.decisions.builders import build_pod


def test_small_learning_rates_survive_the_trip_to_the_worker() -> None:
    """json.dumps writes 5e-05, which a YAML 1.1 parser reads as a string: the worker rejected every
    learningRate below 1e-4 (the continue sample's 5.0e-5, the documented 2.0e-5) with exit 2."""
    job = {"metadata": {"name": "j", "namespace": "ml"},
           "spec": {"dataset": {"inline": [{"question": "q", "answer": "a"}]},
                    "training": {"learningRate": 5.0e-5, "warmupRatio": 1e-7}}}  # fmt: skip
    pod = build_pod(job, parse_spec(job["spec"]), "train", 1)
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert "5e-05" in env["FINETUNE_CONFIG"]
    meta, spec = load_config(env["FINETUNE_CONFIG"])
    assert meta["name"] == "j" and spec.training.learning_rate == 5.0e-5 and spec.training.warmup_ratio == 1e-7
    _, from_yaml = load_config("spec:\n  dataset: {path: d.jsonl}\n  training: {learningRate: 2.0e-5}\n")
    assert from_yaml.training.learning_rate == 2.0e-5
