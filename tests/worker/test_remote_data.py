"""Training data from S3 (moto's S3 API on loopback): read once into the workspace cache, not
downloaded again by a resumed attempt, and a run whose data changed under it fails with the reason
instead of resuming on other data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remotekit import FaultProxy, make_bucket, moto_s3, s3_env, s3fs_for
from worker.trainkit import COLUMNS, checkpoint_names, pair_spec, train, write_config

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def _jsonl(seed: int) -> bytes:
    from tinymodel import pairs

    return "".join(json.dumps(r) + "\n" for r in pairs(64, seed=seed)).encode()


def test_s3_dataset_is_cached_not_downloaded_again_and_a_change_fails(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with moto_s3() as endpoint:
        make_bucket(endpoint, "data")
        s3 = s3fs_for(endpoint)
        s3.pipe_file("data/train.jsonl", _jsonl(0))
        proxy = FaultProxy(endpoint)
        try:
            for k, v in s3_env(proxy.url).items():
                monkeypatch.setenv(k, v)
            spec = pair_spec(tiny_model, steps=8, every=4)
            spec["dataset"] = {"path": "s3://data/train.jsonl", "columns": dict(COLUMNS)}
            cfg = write_config(tmp_path, spec)
            ws = tmp_path / "ws"
            downloads = lambda: [p for p in proxy.gets if p.startswith("/data/train.jsonl")]  # noqa: E731

            killed = train(tmp_path, cfg, ws, fault="kill-at-step:6")
            assert killed.rc == -9 and checkpoint_names(ws) == ["checkpoint-4"]
            assert len(downloads()) == 1
            cached = list((ws / ".cache" / "remote").rglob("train.jsonl"))
            assert len(cached) == 1 and cached[0].read_bytes() == _jsonl(0)

            s3.pipe_file("data/train.jsonl", _jsonl(1))  # the data changes under the running job
            changed = train(tmp_path, cfg, ws)
            assert changed.rc == 2 and changed.summary and changed.summary["result"] == "invalid"
            msg = changed.summary["message"]
            assert "s3://data/train.jsonl changed since this job first read it" in msg and "new FineTuneJob" in msg
            assert checkpoint_names(ws) == ["checkpoint-4"] and not (ws / "final").exists()

            s3.pipe_file("data/train.jsonl", _jsonl(0))  # restored: same content, same ETag
            resumed = train(tmp_path, cfg, ws)
            assert resumed.rc == 0, resumed.stderr[-2000:]
            assert resumed.summary and resumed.summary["resumedFrom"] == "checkpoint-4"
            assert len(downloads()) == 1  # the resumed attempts read the cache (a HEAD checks it is current)
        finally:
            proxy.close()


def test_s3_dataset_missing_or_denied_is_permanent_and_unreachable_is_transient(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from remotekit import free_port

    spec = pair_spec(tiny_model, steps=2, every=2)
    spec["dataset"] = {"path": "s3://data/nope.jsonl", "columns": dict(COLUMNS)}
    cfg = write_config(tmp_path, spec)
    with moto_s3() as endpoint:
        make_bucket(endpoint, "data")
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        missing = train(tmp_path, cfg, tmp_path / "ws")
        assert missing.rc == 2 and missing.summary
        assert "s3://data/nope.jsonl does not exist" in missing.summary["message"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    down = train(tmp_path, cfg, tmp_path / "ws")
    assert down.rc == 1 and down.summary and "unreachable" in down.summary["message"]


def test_s3_base_model_prefix_is_downloaded_once_and_loads(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from finetune_api.spec import parse_spec
    from finetune_worker.modelsrc import resolve_base_model

    with moto_s3() as endpoint:
        make_bucket(endpoint, "models")
        s3fs_for(endpoint).put(str(tiny_model) + "/", "models/tiny/", recursive=True)
        proxy = FaultProxy(endpoint)
        try:
            for k, v in s3_env(proxy.url).items():
                monkeypatch.setenv(k, v)
            spec = parse_spec({"model": {"base": "s3://models/tiny/"}, "dataset": {"path": "x.jsonl"}})
            ws = tmp_path / "ws"
            local = Path(resolve_base_model(spec, ws))
            assert local.is_relative_to(ws / ".cache" / "remote")
            texts = ["reset my password"]
            want = SentenceTransformer(str(tiny_model), device="cpu").encode(texts)
            assert np.allclose(SentenceTransformer(str(local), device="cpu").encode(texts), want, atol=1e-6)
            fetched = len(proxy.gets)
            assert resolve_base_model(spec, ws) == str(local)  # the export pod, a resumed attempt
            assert len(proxy.gets) == fetched + 1  # one listing to check it is current, no download
        finally:
            proxy.close()
