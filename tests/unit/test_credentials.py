"""spec.credentials, export.push and s3:// URLs: parsed strictly, handed to pods by reference only,
and a missing Secret or key keeps the job Pending with a reason that names it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from finetune_api.spec import SpecError, parse_spec
from finetune_operator.decisions.builders import build_pod
from finetune_operator.decisions.observe import Observed
from finetune_operator.decisions.reconcile import Settings, reconcile
from finetune_operator.local.executor import LocalPodExecutor

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
CREDS = {
    "huggingface": {"secretName": "hf", "key": "hf-token"},
    "s3": {"secretName": "s3", "endpoint": "http://minio.storage:9000", "region": "eu-west-1"},
    "registry": {"secretName": "regcred"},
}
SPEC: dict[str, Any] = {
    "model": {"base": "s3://models/minilm/"},
    "dataset": {"path": "s3://data/train.jsonl", "eval": {"path": "s3://data/eval.parquet"}},
    "credentials": CREDS,
    "export": {"push": ["s3://exports/faq/", "oci://registry.example.com:5000/team/faq:v1"]},
    "resources": {"gpus": 0},
}


def _job(spec: dict[str, Any] = SPEC, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "faq", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": spec, "status": status or {}}  # fmt: skip


def test_credentials_push_and_s3_urls_parse() -> None:
    s = parse_spec(SPEC)
    assert s.credentials.huggingface and s.credentials.huggingface.key == "hf-token"
    assert s.credentials.s3 and s.credentials.s3.endpoint == "http://minio.storage:9000"
    assert s.export.push == ("s3://exports/faq/", "oci://registry.example.com:5000/team/faq:v1")
    assert parse_spec({"dataset": {"path": "x.jsonl"}, "credentials": {"huggingface": {"secretName": "hf"}}}
                      ).credentials.huggingface.key == "token"  # type: ignore[union-attr]  # fmt: skip


@pytest.mark.parametrize(("patch", "field"), [
    ({"credentials": {"huggingface": {"secretName": "hf", "token": "hf_abc"}}}, "spec.credentials.huggingface.token"),
    ({"credentials": {"huggingface": {}}}, "spec.credentials.huggingface.secretName"),
    ({"credentials": {"s3": {"secretName": "s3", "accessKey": "AKIA"}}}, "spec.credentials.s3.accessKey"),
    ({"credentials": {"s3": {"endpoint": "minio:9000"}}}, "spec.credentials.s3.endpoint"),
    ({"credentials": {"registry": {"secretName": "Bad_Name"}}}, "spec.credentials.registry.secretName"),
    ({"dataset": {"path": "s3://data/"}}, "spec.dataset.path"),
    ({"dataset": {"path": "s3://A/x.jsonl"}}, "spec.dataset.path"),
    ({"dataset": {"path": "s3://data/../x.jsonl"}}, "spec.dataset.path"),
    ({"export": {"push": ["https://example.com/x"]}}, "spec.export.push[0]"),
    ({"export": {"push": ["oci://registry.example.com/team/faq"]}}, "spec.export.push[0]"),
    ({"export": {"push": ["s3://bk1/x/", "s3://bk1/x/"]}}, "spec.export.push"),
])  # fmt: skip
def test_bad_credentials_and_targets_are_refused_naming_the_field(patch: dict[str, Any], field: str) -> None:
    spec = {**SPEC, **patch}
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert e.value.field == field


def test_pods_get_secrets_by_reference_only() -> None:
    s = parse_spec(SPEC)
    train, export = (build_pod(_job(), s, role, 1)["spec"] for role in ("train", "export"))
    env = {e["name"]: e for e in train["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "hf-token"}}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000" and env["AWS_REGION"]["value"] == "eu-west-1"
    assert "DOCKER_CONFIG" not in env and len(train["volumes"]) == 1  # training pushes nothing
    eenv = {e["name"]: e for e in export["containers"][0]["env"]}
    assert eenv["DOCKER_CONFIG"]["value"] == "/var/run/secrets/finetune.dev/registry"
    vol = next(v for v in export["volumes"] if "secret" in v)
    assert vol["secret"]["secretName"] == "regcred"
    assert vol["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    mount = next(m for m in export["containers"][0]["volumeMounts"] if m["name"] == vol["name"])
    assert mount["readOnly"] is True and mount["mountPath"] == eenv["DOCKER_CONFIG"]["value"]
    secret_vars = {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert all("value" not in e for e in [*env.values(), *eenv.values()] if e["name"] in secret_vars)


def _plan(secrets: dict[str, frozenset[str]] | None, status: dict[str, Any] | None = None) -> Any:
    return reconcile(_job(status=status), Observed(claim_exists=True, secrets=secrets), T0, Settings())


@pytest.mark.parametrize(("secrets", "says"), [
    ({}, "Secret hf (spec.credentials.huggingface.secretName) does not exist"),
    ({"hf": frozenset({"token"})}, "Secret hf (spec.credentials.huggingface.secretName) has no key hf-token"),
    ({"hf": frozenset({"hf-token"}), "s3": frozenset({"AWS_ACCESS_KEY_ID"}), "regcred": frozenset({".dockerconfigjson"})},
     "Secret s3 (spec.credentials.s3.secretName) has no key AWS_SECRET_ACCESS_KEY"),
    ({"hf": frozenset({"hf-token"}), "s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})},
     "Secret regcred (spec.credentials.registry.secretName) does not exist"),
])  # fmt: skip
def test_a_missing_secret_or_key_keeps_the_job_pending_naming_it(secrets: dict[str, Any], says: str) -> None:
    plan = _plan(secrets)
    assert plan.create == [] and plan.status["phase"] == "Pending" and plan.status["reason"] == "SecretMissing"
    assert says in plan.status["message"] and plan.requeue_after == Settings().pending_interval
    assert [e["reason"] for e in plan.events] == ["SecretMissing"]


def test_the_job_starts_once_the_secrets_exist_and_the_local_runner_does_not_check() -> None:
    found = {"hf": frozenset({"hf-token"}), "s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}),
             "regcred": frozenset({".dockerconfigjson"})}  # no AWS_SESSION_TOKEN: it is optional
    for secrets in (found, None):  # None: not looked at (the local runner has no Secrets)
        plan = _plan(secrets)
        assert [o["kind"] for o in plan.create] == ["Pod"] and plan.status["reason"] == "PodStarting"


def test_local_executor_passes_the_users_environment_not_an_unmounted_secret(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_user")
    monkeypatch.setenv("DOCKER_CONFIG", "/home/user/.docker")
    pod = build_pod(_job(), parse_spec(SPEC), "export", 1)
    pod["spec"]["containers"][0]["command"] = ["python3", "-c", "import json, os; print(json.dumps(dict(os.environ)))"]

    def run(ex: LocalPodExecutor) -> dict[str, str]:
        ex.start(pod)
        assert ex.wait("faq-export-1", 30)
        env: dict[str, str] = json.loads(ex.logs("faq-export-1", None).splitlines()[-1])
        ex.close()
        return env

    local = run(LocalPodExecutor(tmp_path / "local"))
    assert local["HF_TOKEN"] == "hf_from_the_user" and local["DOCKER_CONFIG"] == "/home/user/.docker"
    data = {"hf-token": b"hf_from_the_secret", ".dockerconfigjson": b'{"auths": {}}'}
    kubelet = run(LocalPodExecutor(tmp_path / "kubelet", secrets=lambda ns, name: data if ns == "ml" else None))
    assert kubelet["HF_TOKEN"] == "hf_from_the_secret"
    assert (Path(kubelet["DOCKER_CONFIG"]) / "config.json").read_bytes() == b'{"auths": {}}'


def test_status_export_lists_the_pushed_targets_from_the_export_summary() -> None:
    from finetune_operator.decisions.observe import PodObservation

    pushed = [{"target": "s3://exports/faq/", "digest": "etag:abc", "bytes": 10},
              {"target": "oci://registry.example.com:5000/team/faq:v1", "digest": "sha256:" + "0" * 64, "bytes": 10}]
    summary = {"result": "completed", "export": "/workspace/export", "formats": ["sentence-transformers"], "pushed": pushed}
    ended = [PodObservation(name="faq-train-1", role="train", attempt=1, phase="Succeeded", result="completed", exit_code=0),
             PodObservation(name="faq-export-1", role="export", attempt=1, phase="Succeeded", result="completed",
                            exit_code=0, summary=summary)]  # fmt: skip
    status = {"attempts": [{"pod": "faq-train-1", "role": "train", "attempt": 1},
                           {"pod": "faq-export-1", "role": "export", "attempt": 1}]}  # fmt: skip
    plan = reconcile(_job(status=status), Observed(pods=tuple(ended), claim_exists=True), T0, Settings())
    assert plan.status["phase"] == "Succeeded" and plan.status["export"]["pushed"] == pushed
