"""export.push against real servers on loopback: moto's S3 API and the CNCF distribution registry.

What a user sees: the export lands in S3 (metadata.json last) and as an OCI artifact, both load with
SentenceTransformer after a pull; a service down mid-push fails the attempt as transient and the
rerun only pushes; bad registry credentials exit 2 with the reason; a worker killed mid-push leaves
no export at the target that looks complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from exportkit import full_workspace, spec

from remotekit import (
    FaultProxy,
    docker_config,
    make_bucket,
    moto_s3,
    oci_registry,
    oras_pull,
    s3_env,
    s3fs_for,
)

pytestmark = [pytest.mark.worker, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TEXTS = ["how do i reset my password", "refund for a cancelled order"]


@pytest.fixture
def termlog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    p = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(p))
    return p


def _spec(base: Path, push: list[str]) -> dict[str, Any]:
    return spec(base, lora=None, export={"formats": ["sentence-transformers"], "push": push})


def _export(spec_dict: dict[str, Any], ws: Path, termlog: Path) -> tuple[int, dict[str, Any]]:
    from finetune_api.spec import parse_spec
    from finetune_worker.export import run_export

    rc = run_export(parse_spec(spec_dict), ws, {"name": "faq", "namespace": "ml"})
    return rc, json.loads(termlog.read_text())


def _stages(out: str) -> list[str]:
    return [json.loads(x).get("stage") for x in out.splitlines() if x.startswith('{"event":"export"')]


def _embed(model_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)


def _env(monkeypatch: pytest.MonkeyPatch, endpoint: str, docker: Path | None = None) -> None:
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    if docker is not None:
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))


def test_s3_and_oci_push_pull_back_and_load(tiny_model: Path, tmp_path: Path, termlog: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    ws = full_workspace(tmp_path / "ws", tiny_model)
    with moto_s3() as endpoint, oci_registry(tmp_path / "registry") as registry:
        s3 = s3fs_for(endpoint)
        make_bucket(endpoint, "exports")
        _env(monkeypatch, endpoint, docker_config(tmp_path / "docker", registry))
        targets = ["s3://exports/faq/v1/", f"oci://{registry}/team/faq:v1"]
        rc, summary = _export(_spec(tiny_model, targets), ws, termlog)
        assert rc == 0, summary
        local = _embed(ws / "export" / "sentence-transformers")

        pushed = {p["target"]: p for p in summary["pushed"]}
        assert list(pushed) == targets
        assert pushed[targets[0]]["digest"].startswith("etag:") and pushed[targets[1]]["digest"].startswith("sha256:")
        keys = sorted(k.split("faq/v1/", 1)[1] for k in s3.find("exports/faq/v1/"))
        assert "metadata.json" in keys and "sentence-transformers/model.safetensors" in keys
        s3.get("exports/faq/v1/", str(tmp_path / "from-s3"), recursive=True)
        assert np.allclose(_embed(tmp_path / "from-s3" / "sentence-transformers"), local, atol=1e-6)

        manifest = oras_pull(registry, f"{registry}/team/faq:v1", tmp_path / "from-oci")
        assert np.allclose(_embed(tmp_path / "from-oci" / "sentence-transformers"), local, atol=1e-6)
        assert manifest["artifactType"] == "application/vnd.finetune.dev.model.v1"
        assert manifest["config"]["mediaType"] == "application/vnd.finetune.dev.model.config.v1+json"
        notes = manifest["annotations"]
        assert notes["dev.finetune.base-model"] == str(tiny_model) and notes["dev.finetune.steps"] == "3"
        assert notes["org.opencontainers.image.version"] == "v1" and "dev.finetune.metrics" in notes
        assert json.loads((tmp_path / "from-oci" / "metadata.json").read_text())["fingerprint"] == notes["dev.finetune.fingerprint"]

        capsys.readouterr()
        rc, again = _export(_spec(tiny_model, targets), ws, termlog)  # a re-push: idempotent
        stages = _stages(capsys.readouterr().out)
        assert rc == 0 and "current" in stages and "merged" not in stages and "push-current" in stages
        assert [p["digest"] for p in again["pushed"]] == [p["digest"] for p in summary["pushed"]]


def test_s3_down_mid_push_is_transient_and_the_rerun_only_pushes(
    tiny_model: Path, tmp_path: Path, termlog: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ws = full_workspace(tmp_path / "ws", tiny_model)
    with moto_s3() as endpoint:
        s3 = s3fs_for(endpoint)
        make_bucket(endpoint, "exports")
        proxy = FaultProxy(endpoint)
        try:
            _env(monkeypatch, proxy.url)
            proxy.fail_after_puts = 2  # two files land, then the service answers 503
            rc, summary = _export(_spec(tiny_model, ["s3://exports/faq/"]), ws, termlog)
            assert rc == 1 and summary["result"] == "failed"
            assert "transient" in summary["message"] and "a rerun only pushes" in summary["message"]
            assert (ws / "export" / "metadata.json").is_file()  # published and verified on the workspace
            landed = s3.find("exports/faq/")
            assert landed and "exports/faq/metadata.json" not in landed  # nothing there looks complete

            proxy.heal()
            capsys.readouterr()
            rc, summary = _export(_spec(tiny_model, ["s3://exports/faq/"]), ws, termlog)
            stages = _stages(capsys.readouterr().out)
            assert rc == 0 and summary["pushed"][0]["target"] == "s3://exports/faq/"
            assert stages[0] == "current" and "merged" not in stages and "verified" not in stages
            assert s3.exists("exports/faq/metadata.json")
        finally:
            proxy.close()


def test_bad_registry_credentials_fail_permanently_with_the_reason(
    tiny_model: Path, tmp_path: Path, termlog: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ws = full_workspace(tmp_path / "ws", tiny_model)
    with oci_registry(tmp_path / "registry") as registry:
        monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "docker", registry, password="wrong")))
        rc, summary = _export(_spec(tiny_model, [f"oci://{registry}/team/faq:v1"]), ws, termlog)
        assert rc == 2 and summary["result"] == "invalid"
        assert "denied" in summary["message"] and "spec.credentials.registry" in summary["message"]
        assert f"oci://{registry}/team/faq:v1" in summary["message"] and "wrong" not in summary["message"]
        assert (ws / "export" / "metadata.json").is_file()


def test_a_worker_killed_mid_push_leaves_nothing_that_looks_complete(tiny_model: Path, tmp_path: Path) -> None:
    ws = full_workspace(tmp_path / "ws", tiny_model)
    with moto_s3() as endpoint:
        s3 = s3fs_for(endpoint)
        make_bucket(endpoint, "exports")
        proxy = FaultProxy(endpoint)
        try:
            cfg = tmp_path / "job.yaml"
            cfg.write_text(yaml.safe_dump({"kind": "FineTuneJob", "apiVersion": "finetune.dev/v1alpha1",
                                           "metadata": {"name": "faq"}, "spec": _spec(tiny_model, ["s3://exports/faq/"])}))
            env = {**os.environ, **s3_env(proxy.url), "HF_HUB_OFFLINE": "1",
                   "FINETUNE_TERMINATION_LOG": str(tmp_path / "term")}  # fmt: skip
            proxy.hold_put = "model.safetensors"  # the weights' upload hangs: the worker is mid-push
            proc = subprocess.Popen([sys.executable, "-m", "finetune_worker.cli", "export", "--config", str(cfg),
                                     "--workspace", str(ws)], env=env, cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                assert proxy.held.wait(180), "the push never started"
                time.sleep(0.2)
                proc.send_signal(signal.SIGKILL)  # node loss / OOM: no handler runs
                proc.wait(30)
            finally:
                proc.kill()
            proxy.heal()
            landed = s3.find("exports/faq/")
            assert landed and "exports/faq/metadata.json" not in landed
        finally:
            proxy.close()


def test_registry_503_is_transient_and_a_retry_completes_the_artifact(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_api.remote import parse_oci_ref
    from finetune_worker.errors import TransientError
    from finetune_worker.export.push import push_oci

    export = tmp_path / "export"
    (export / "adapter").mkdir(parents=True)
    (export / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (export / "metadata.json").write_text(json.dumps({"job": "faq", "fingerprint": "f1", "formats": ["adapter"]}))
    with oci_registry(tmp_path / "registry") as registry:
        proxy = FaultProxy(f"http://{registry}")
        try:
            via = proxy.url.split("://")[1]
            monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "docker", via)))
            ref = parse_oci_ref(f"oci://{via}/team/faq:v1")
            proxy.fail_after_puts = 1  # the first blob lands, then 503s
            with pytest.raises(TransientError, match="HTTP 503"):
                push_oci(export, ref, {"job": "faq"}, lambda _where: None)
            proxy.heal()
            done = push_oci(export, ref, {"job": "faq"}, lambda _where: None)
            assert done["digest"].startswith("sha256:") and done["bytes"] > 300_000
        finally:
            proxy.close()
        manifest = oras_pull(registry, f"{registry}/team/faq:v1", tmp_path / "pulled")
        assert [x["annotations"]["org.opencontainers.image.title"] for x in manifest["layers"]] == [
            "adapter/adapter_model.safetensors", "metadata.json"]
        assert (tmp_path / "pulled" / "adapter" / "adapter_model.safetensors").read_bytes() == (
            export / "adapter" / "adapter_model.safetensors").read_bytes()
