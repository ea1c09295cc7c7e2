"""The FineTuneJob CRD on a real kube-apiserver: what users see from `kubectl`.

The same samples and bad objects as tests/unit/test_crd.py (which checks them offline with
crdkit), here admitted or refused by the real server: structural schema, defaults, CEL rules,
transition rules on update, printer columns, `kubectl explain` and `kubectl wait`.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from controlplane import ApiError
from realenv import Env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from crdkit import samples
from test_crd import BAD, UPDATES, _job

from finetune_api import contract

SAMPLES = samples()
REPO = Path(__file__).resolve().parents[2]


def _create(env: Env, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("namespace", None)
    return env.api.create(obj, env.ns, plural=contract.PLURAL, dry_run=dry_run)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_is_accepted_and_defaulted(env: Env, name: str) -> None:
    created = _create(env, SAMPLES[name])
    spec = created["spec"]
    # server-side defaults (from the schema) are there, so GitOps sees no drift
    assert isinstance(spec["backoffLimit"], int) and spec["suspend"] is False
    assert spec["storage"]["reclaimPolicy"] in ("Retain", "Delete") and spec["training"]["checkpoint"]["everySteps"] > 0
    assert created["metadata"]["generation"] == 1


def test_samples_apply_with_kubectl_kustomize(env: Env) -> None:
    out = env.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(REPO / "manifests" / "samples"), "-o", "name").stdout
    assert len(out.split()) == len(SAMPLES), out


@pytest.mark.parametrize(("what", "changes", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_object_is_refused_by_the_server(env: Env, what: str, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as err:
        _create(env, _job(**changes), dry_run=True)
    e = err.value
    # 422 Invalid from the schema and CEL; 400 from strict field validation (an unknown field)
    assert (e.status, e.reason) in ((422, "Invalid"), (400, "BadRequest")), f"{what}: {e}"
    section = ".".join(field.split(".")[:2])  # e.g. spec.training: the server names the field or its parent
    assert section.split("[")[0] in e.message, f"{what}: the server's message does not name {section}: {e.message}"


def test_unknown_field_is_refused_by_strict_field_validation(env: Env) -> None:
    obj = _job()
    obj["spec"]["trainng"] = {"epochs": 2}
    with pytest.raises(ApiError) as err:
        _create(env, obj, dry_run=True)
    assert 'unknown field "spec.trainng"' in err.value.message


@pytest.mark.parametrize(("what", "changes", "refused"), UPDATES, ids=[u[0] for u in UPDATES])
def test_transition_rules_on_update(env: Env, what: str, changes: dict[str, Any], refused: bool) -> None:
    name = f"upd-{abs(hash(what)) % 10**8}"
    old = _job()
    old["metadata"] = {"name": name}
    created = _create(env, old)
    new = _job(**changes)
    new["metadata"] = {"name": name, "resourceVersion": created["metadata"]["resourceVersion"]}
    path = f"/apis/{contract.API_VERSION}/namespaces/{env.ns}/{contract.PLURAL}/{name}"
    if refused:
        with pytest.raises(ApiError) as err:
            env.api.request("PUT", path, new)
        assert err.value.status == 422, err.value
        assert "immutable" in err.value.message or "cannot be added or removed" in err.value.message, err.value
    else:
        updated = env.api.request("PUT", path, new)
        assert updated["metadata"]["generation"] == 2


def test_printer_columns_and_wait(env: Env) -> None:
    obj = copy.deepcopy(SAMPLES["finetune_v1alpha1_finetunejob_lora.yaml"])
    obj["metadata"] = {"name": "columns"}
    _create(env, obj)
    status = {"phase": "Succeeded", "progress": {"percent": 100.0}, "checkpoint": {"name": "checkpoint-40", "step": 40},
              "restarts": 1, "message": "exported to /workspace/export",
              "conditions": [{"type": "Succeeded", "status": "True", "reason": "Exported", "message": "done",
                              "lastTransitionTime": "2026-01-01T00:00:00Z"}]}  # fmt: skip
    env.patch_job("columns", {"status": status}, subresource="status")
    out = env.kubectl("get", "ftj", "columns", "-o", "wide").stdout.splitlines()
    header, row = out[0].split(), out[1].split()
    assert header[:6] == ["NAME", "PHASE", "PROGRESS", "CHECKPOINT", "RESTARTS", "AGE"], out[0]
    assert "MESSAGE" in header and row[:5] == ["columns", "Succeeded", "100", "checkpoint-40", "1"], out[1]
    waited = env.kubectl("wait", "--for=condition=Succeeded", "ftj/columns", "--timeout=10s")
    assert "condition met" in waited.stdout
    # the short name and the category-free plural both work; the status subresource kept spec apart
    got = json.loads(env.kubectl("get", "finetunejobs", "columns", "-o", "json").stdout)
    assert got["metadata"]["generation"] == 1 and got["status"]["phase"] == "Succeeded"


def test_status_is_a_subresource(env: Env) -> None:
    obj = copy.deepcopy(SAMPLES["finetune_v1alpha1_finetunejob_lora.yaml"])
    obj["metadata"] = {"name": "sub"}
    obj["status"] = {"phase": "Succeeded"}
    created = _create(env, obj)
    assert "status" not in created or not created["status"].get("phase")  # status on create is dropped


def test_kubectl_explain_teaches_the_fields(env: Env) -> None:
    out = env.kubectl("explain", "finetunejob.spec").stdout
    for field in ("model", "dataset", "training", "lora", "export", "resources", "storage", "backoffLimit", "suspend"):
        assert f"{field}\t" in out or f"  {field} " in out or f"{field} <" in out, f"{field} missing:\n{out}"
    deep = env.kubectl("explain", "finetunejob.spec.training.checkpoint.everySteps").stdout
    assert "DESCRIPTION" in deep and len(deep.split("DESCRIPTION", 1)[1].strip()) > 20, deep
