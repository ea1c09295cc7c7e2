"""The streaming merge against peft's own merge_and_unload, adapter kind by adapter kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.worker

SHARD = 20_000  # bytes: the tiny models split into several shards


def _tensors(d: Path) -> tuple[dict, dict | None]:
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
        out = {}
        for f in sorted(set(wmap.values())):
            out.update(load_file(d / f))
        return out, wmap
    return load_file(d / "model.safetensors"), None


def _merge_both(base_dir: Path, adapter_dir: Path, tmp_path: Path) -> tuple[Path, Path, object]:
    from finetune_worker.export import merge

    base = merge.base_tensors(base_dir)
    config, state = merge.load_adapter(adapter_dir)
    assert merge.unsupported_reason(config, state, base) is None
    plan = merge.plan_merge(config, state, base)
    streamed, reference = tmp_path / "streamed", tmp_path / "peft"
    streamed.mkdir()
    reference.mkdir()
    merge.stream_merge(base_dir, plan, streamed, SHARD)
    merge.peft_merge(base_dir, adapter_dir, reference, SHARD)
    return streamed, reference, plan


def _assert_same(streamed: Path, reference: Path, base_dir: Path) -> None:
    got, got_map = _tensors(streamed)
    want, want_map = _tensors(reference)
    base, _ = _tensors(base_dir)
    assert got_map is not None and len(set(got_map.values())) > 1, "test models must be sharded"
    assert got_map == want_map  # same keys, same shard files, same index
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert (got[k] - want[k]).abs().max().item() <= 1e-6, k
    changed = [k for k in want if not (want[k] == base[k]).all()]
    assert changed, "the adapter must change some weights, or this comparison shows nothing"


@pytest.mark.parametrize("kind", ["plain", "rslora-patterns-embedding-modules_to_save"])
def test_streaming_merge_equals_peft_merge_and_unload(kind: str, tiny_model: Path, tmp_path: Path) -> None:
    from exportkit import make_adapter

    kwargs: dict = {}
    if kind != "plain":
        kwargs = {
            "target_modules": ["query", "value", "dense", "word_embeddings"],
            "use_rslora": True,
            "rank_pattern": {"layer.1.attention.self.query": 2},
            "alpha_pattern": {"value": 3},
            "modules_to_save": ["pooler.dense"],
        }
    adapter = make_adapter(tiny_model, tmp_path / "adapter", **kwargs)
    streamed, reference, plan = _merge_both(tiny_model, adapter, tmp_path)
    if kind != "plain":
        scalings = {t.module: t.scaling for t in plan.targets.values()}
        assert scalings["encoder.layer.1.attention.self.query"] == pytest.approx(
            8 / 2**0.5
        )  # rank_pattern + rsLoRA
        assert scalings["encoder.layer.0.attention.self.value"] == pytest.approx(
            3 / 2
        )  # alpha_pattern + rsLoRA
        assert plan.targets["embeddings.word_embeddings.weight"].transpose
        assert set(plan.replacements) == {"pooler.dense.weight", "pooler.dense.bias"}
    _assert_same(streamed, reference, tiny_model)


def test_fan_in_fan_out_conv1d(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights as (in, out): the delta is transposed (fan_in_fan_out)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base_dir = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=200, n_positions=32)).save_pretrained(
        base_dir
    )
    pm = get_peft_model(
        GPT2Model.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    streamed, reference, plan = _merge_both(base_dir, tmp_path / "adapter", tmp_path)
    assert all(t.transpose for t in plan.targets.values())
    _assert_same(streamed, reference, base_dir)


def test_dora_is_named_unsupported_and_rank_mismatch_refused(tiny_model: Path, tmp_path: Path) -> None:
    from exportkit import make_adapter

    from finetune_worker.export import merge

    adapter = make_adapter(tiny_model, tmp_path / "dora", use_dora=True)
    config, state = merge.load_adapter(adapter)
    assert "use_dora" in merge.unsupported_reason(config, state, merge.base_tensors(tiny_model))

    adapter = make_adapter(tiny_model, tmp_path / "plain")
    config, state = merge.load_adapter(adapter)
    with pytest.raises(merge.InvalidInput, match="rank mismatch"):
        merge.plan_merge({**config, "r": 8}, state, merge.base_tensors(tiny_model))


@pytest.fixture
def bf16_model(tiny_model: Path, tmp_path: Path) -> Path:
    from exportkit import bf16_copy

    return bf16_copy(tiny_model, tmp_path / "tiny-bf16")


def test_bf16_base_merges_like_peft(bf16_model: Path, tmp_path: Path) -> None:
    """bf16 weights: the delta is computed in fp32 and cast, as peft does on CPU, so results match exactly."""
    from exportkit import make_adapter

    from finetune_worker.export import merge

    assert {t.dtype for t in merge.base_tensors(bf16_model).values()} == {"BF16"}
    adapter = make_adapter(bf16_model, tmp_path / "adapter")
    streamed, reference, _ = _merge_both(bf16_model, adapter, tmp_path)
    _assert_same(streamed, reference, bf16_model)


def test_base_saved_with_a_model_prefix(tiny_model: Path, tmp_path: Path) -> None:
    """Checkpoints saved from a task model carry `bert.`-prefixed keys; adapter targets still resolve."""
    import shutil

    from exportkit import make_adapter
    from safetensors.torch import load_file, save_file

    prefixed = tmp_path / "prefixed"
    shutil.copytree(tiny_model, prefixed)
    sd = load_file(prefixed / "model.safetensors")
    save_file(
        {f"bert.{k}": v for k, v in sd.items()}, prefixed / "model.safetensors", metadata={"format": "pt"}
    )
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    streamed, reference, plan = _merge_both(prefixed, adapter, tmp_path)
    assert all(k.startswith("bert.") for k in plan.targets)
    got, _ = _tensors(streamed)
    want, _ = _tensors(reference)  # transformers strips the prefix on load and saves without it
    assert set(got) == {f"bert.{k}" for k in want}
    assert max((got[f"bert.{k}"] - want[k]).abs().max().item() for k in want) <= 1e-6


def test_user_space_copy_when_the_kernel_cannot(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_file_range refused (EXDEV across filesystems, or not Linux): same bytes via pread/pwrite."""
    import os

    from exportkit import make_adapter

    from finetune_worker.export import merge

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    config, state = merge.load_adapter(adapter)
    base = merge.base_tensors(tiny_model)
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.mkdir()
    slow.mkdir()
    merge.stream_merge(tiny_model, merge.plan_merge(config, state, base), fast, SHARD)

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    merge.stream_merge(tiny_model, merge.plan_merge(config, state, base), slow, SHARD)
    names = sorted(p.name for p in fast.iterdir())
    assert names == sorted(p.name for p in slow.iterdir()) and len(names) > 2
    assert all((fast / n).read_bytes() == (slow / n).read_bytes() for n in names)
