"""Where the operator's API client connects, and the paths it requests."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from finetune_operator import kube


def test_plain_server_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_KUBE_SERVER", "http://127.0.0.1:8001/")
    cfg = kube.load_config()
    assert cfg.server == "http://127.0.0.1:8001" and cfg.token is None and cfg.ssl_context() is False


def test_kubeconfig_current_context_with_inline_ca_and_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FINETUNE_KUBE_SERVER", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    doc = {
        "current-context": "b",
        "contexts": [{"name": "a", "context": {"cluster": "ca", "user": "ua"}},
                     {"name": "b", "context": {"cluster": "cb", "user": "ub"}}],
        "clusters": [{"name": "ca", "cluster": {"server": "https://a:6443"}},
                     {"name": "cb", "cluster": {"server": "https://b:6443/",
                                                "certificate-authority-data": base64.b64encode(b"PEM").decode()}}],
        "users": [{"name": "ub", "user": {"token": "s3cret"}}],
    }  # fmt: skip
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("KUBECONFIG", str(path))
    cfg = kube.load_config()
    assert cfg.server == "https://b:6443" and cfg.token == "s3cret"
    assert cfg.ca_file is not None and Path(cfg.ca_file).read_bytes() == b"PEM"


def test_no_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FINETUNE_KUBE_SERVER", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="FINETUNE_KUBE_SERVER"):
        kube.load_config()


def test_resource_paths() -> None:
    assert (
        kube.resource_path("v1", "pods", "ml", "j-train-1", "log")
        == "/api/v1/namespaces/ml/pods/j-train-1/log"
    )
    assert kube.resource_path("finetune.dev/v1alpha1", "finetunejobs", "ml", "j", "status") == (
        "/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/j/status"
    )
    assert kube.resource_path("v1", "namespaces") == "/api/v1/namespaces"
