"""Tier 3 with real workers and real servers on loopback: credentials by reference, S3 data in,
S3 and OCI exports out, and a planted secret that appears nowhere a user or log reader could see it.

The job is applied before its Secrets exist: it waits in Pending (SecretMissing, naming the Secret)
with no pod, starts once they are created, trains on an s3:// dataset, exports, pushes to S3 and to
the distribution registry, and lists both in status.export.pushed. Its pods carry the credentials
only as secretKeyRef / a Secret volume (the test kubelet resolves them, as a real kubelet does).
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from harness import finetune_job

from remotekit import S3_KEYS, make_bucket, moto_s3, oci_registry, oras_pull, s3fs_for
from tinymodel import pairs

pytestmark = [pytest.mark.operator, pytest.mark.worker, pytest.mark.slow]
FAST_ENV = {"FINETUNE_RESYNC_SECONDS": "0.5", "FINETUNE_BACKOFF_SECONDS": "1", "FINETUNE_GRACE_SECONDS": "30"}
PLANTED = "planted-4c1f9e7a-secret-do-not-leak"  # the HF token, the AWS secret key and the registry password


def _secret(name: str, data: dict[str, str], type_: str = "Opaque") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"}, "type": type_,
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}  # fmt: skip


def test_secret_refs_s3_data_and_pushes_to_succeeded_without_leaking(
    kube: Any, kubelet: Any, run_operator: Any, tiny_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    for k, v in FAST_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "DOCKER_CONFIG"):
        monkeypatch.delenv(k, raising=False)  # the pods get them from the Secrets, nowhere else
    caplog.set_level(logging.DEBUG)
    with moto_s3() as endpoint, oci_registry(tmp_path / "registry", password=PLANTED) as registry:
        make_bucket(endpoint, "data")
        make_bucket(endpoint, "exports")
        s3 = s3fs_for(endpoint)
        s3.pipe_file("data/train.jsonl", "".join(json.dumps(r) + "\n" for r in pairs(32, seed=2)).encode())
        targets = ["s3://exports/faq/", f"oci://{registry}/team/faq:v1"]
        spec = {
            "model": {"base": str(tiny_model)},
            "dataset": {"path": "s3://data/train.jsonl", "columns": {"anchor": "question", "positive": "answer"}},
            "training": {"maxSteps": 4, "batchSize": 8, "learningRate": 1e-3, "checkpoint": {"everySteps": 2}},
            "export": {"formats": ["sentence-transformers"], "push": targets},
            "credentials": {"huggingface": {"secretName": "hf"},
                            "s3": {"secretName": "s3", "endpoint": endpoint, "region": "us-east-1"},
                            "registry": {"secretName": "regcred"}},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        }  # fmt: skip

        def status() -> dict[str, Any]:
            return ((kube.job("faq") or {}).get("status")) or {}

        with run_operator():
            kube.create(finetune_job("faq", spec))
            kube.wait_for(lambda: status().get("reason") == "SecretMissing", 60, what="SecretMissing")
            assert status()["phase"] == "Pending" and "Secret hf (spec.credentials.huggingface.secretName)" in status()["message"]
            assert kube.pods() == []  # never a pod stuck in CreateContainerConfigError
            auth = base64.b64encode(f"pusher:{PLANTED}".encode()).decode()
            kube.create(_secret("hf", {"token": PLANTED}))
            kube.create(_secret("s3", {"AWS_ACCESS_KEY_ID": S3_KEYS["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": PLANTED}))
            kube.create(_secret("regcred", {".dockerconfigjson": json.dumps({"auths": {registry: {"auth": auth}}})},
                                "kubernetes.io/dockerconfigjson"))  # fmt: skip
            kube.wait_for(lambda: status().get("phase") in ("Succeeded", "Failed"), 400, interval=0.1,
                          what=f"the end (phase {status().get('phase')}: {status().get('message')})")  # fmt: skip
            st = status()
            assert st["phase"] == "Succeeded", (st.get("message"), st.get("attempts"))

            pods = {p["metadata"]["name"]: p for p in kube.pods()}
            train_env = {e["name"]: e for e in pods["faq-train-1"]["spec"]["containers"][0]["env"]}
            assert train_env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
            assert train_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
            export_pod = pods["faq-export-1"]["spec"]
            assert any(v.get("secret", {}).get("secretName") == "regcred" for v in export_pod["volumes"])

            pushed = {p["target"]: p for p in st["export"]["pushed"]}
            assert list(pushed) == targets and pushed[targets[1]]["digest"].startswith("sha256:")
            assert s3.exists("exports/faq/metadata.json")
            oras_pull(registry, f"{registry}/team/faq:v1", tmp_path / "pulled", password=PLANTED)
            from sentence_transformers import SentenceTransformer

            assert SentenceTransformer(str(tmp_path / "pulled" / "sentence-transformers"), device="cpu").encode(["hi"]).shape[0] == 1

            ws = kubelet.workspace("faq-workspace")
            seen = {
                "status and spec": json.dumps(kube.job("faq")),
                "events": json.dumps(kube.events()),
                "pods (FINETUNE_CONFIG, env, termination messages)": json.dumps(list(pods.values())),
                "pod logs (progress lines)": "".join(kubelet.local_logs(n) for n in pods),
                "metadata.json": (ws / "export" / "metadata.json").read_text(),
                "model card": (ws / "export" / "sentence-transformers" / "README.md").read_text(),
                "pushed metadata.json": s3.cat_file("exports/faq/metadata.json").decode(),
                "operator logs": caplog.text,
            }
        for where, text in seen.items():
            assert PLANTED not in text and auth not in text, f"the planted secret leaked into {where}"
        assert "SecretMissing" in seen["events"] and "faq-train-1" in seen["operator logs"]
