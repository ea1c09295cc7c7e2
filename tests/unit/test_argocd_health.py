"""The Argo CD health check for FineTuneJob, run under Lua 5.1 (Argo CD's gopher-lua is 5.1)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from crdkit import ROOT, schema

from finetune_operator.decisions import status as status_module

ARGOCD = ROOT / "manifests" / "argocd"
LUA = (ARGOCD / "health.lua").read_text()
KEY = "resource.customizations.health.finetune.dev_FineTuneJob"

lupa = pytest.importorskip("lupa", reason="lupa runs the Lua health check: run `make dev`")


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run health.lua as Argo CD does: `obj` global, the script's body returns the health table."""
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"

    def to_lua(v: Any) -> Any:
        if isinstance(v, dict):
            return lua.table_from({k: to_lua(x) for k, x in v.items()})
        if isinstance(v, list):
            return lua.table_from([to_lua(x) for x in v])
        return v

    lua.globals().obj = to_lua(obj)
    hs = lua.execute(LUA)
    return {"status": hs["status"], "message": hs["message"]}


def job(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                           "metadata": {"name": "faq", "namespace": "ml", "generation": generation},
                           "spec": {"dataset": {"path": "data/train.jsonl"}}}  # fmt: skip
    if status is not None:
        obj["status"] = status
    return obj


PHASES = {
    "Pending": "Progressing",
    "Training": "Progressing",
    "Exporting": "Progressing",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
    "Suspended": "Suspended",
}


def test_table_covers_every_phase_of_the_crd() -> None:
    """Every phase the operator writes, and every phase the CRD admits, has a health."""
    assert set(PHASES) == set(status_module.PHASES)
    assert set(PHASES) == set(schema()["properties"]["status"]["properties"]["phase"]["enum"])


@pytest.mark.parametrize(("phase", "want"), PHASES.items())
def test_every_phase_maps_to_its_health(phase: str, want: str) -> None:
    hs = health(job({"phase": phase, "message": f"the job is {phase.lower()}", "observedGeneration": 1}))
    assert hs["status"] == want
    if phase != "Training":
        assert hs["message"] == f"the job is {phase.lower()}"


def test_no_status_is_progressing() -> None:
    assert health(job())["status"] == "Progressing"
    assert health(job({}))["status"] == "Progressing"
    assert health(job({"conditions": []}))["status"] == "Progressing"


def test_failed_says_why() -> None:
    hs = health(job({"phase": "Failed", "observedGeneration": 1,
                     "message": "training failed 4 times (backoffLimit 3): exit code 1"}))  # fmt: skip
    assert hs == {"status": "Degraded", "message": "training failed 4 times (backoffLimit 3): exit code 1"}


def test_training_reports_progress_and_restarts() -> None:
    hs = health(job({"phase": "Training", "observedGeneration": 1, "restarts": 2,
                     "progress": {"step": 84, "totalSteps": 200, "percent": 42.0}}))  # fmt: skip
    assert hs == {"status": "Progressing", "message": "Training: 42.0% (step 84/200), restarts: 2"}


def test_a_status_older_than_the_spec_is_progressing() -> None:
    """After a `suspend: false` commit, the old Suspended status must not be reported as current."""
    hs = health(job({"phase": "Suspended", "observedGeneration": 1}, generation=2))
    assert hs["status"] == "Progressing"
    assert "generation 2" in hs["message"]


def test_a_phase_without_message_still_has_one() -> None:
    assert health(job({"phase": "Succeeded", "observedGeneration": 1}))["message"] == "Succeeded"


def test_an_unknown_phase_is_unknown() -> None:
    assert health(job({"phase": "Exploding", "observedGeneration": 1}))["status"] == "Unknown"


def test_configmap_patch_registers_exactly_this_script() -> None:
    cm = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert (cm["kind"], cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("ConfigMap", "argocd-cm", "argocd")
    assert cm["data"] == {KEY: LUA}
    assert KEY in (ARGOCD / "README.md").read_text()


def test_application_example_installs_the_default_overlay() -> None:
    apps = [d for d in yaml.safe_load_all((ARGOCD / "application.yaml").read_text()) if d]
    assert all(a["kind"] == "Application" and a["apiVersion"] == "argoproj.io/v1alpha1" for a in apps)
    paths = {a["spec"]["source"]["path"] for a in apps}
    assert "manifests/default" in paths
    for p in paths:
        assert (ROOT / p).is_dir(), p
