"""Every status field the operator writes is declared in the CRD's status schema.

A structural CRD prunes unknown fields silently: a status key missing from the schema would be
dropped by a real API server (the emulator does no pruning), and `kubectl get`/Argo CD would
never see it. This walks a status built by reconcile through a whole lifecycle.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_reconcile import T0, job, pod
from test_reconcile import step as _step

CRD = Path(__file__).parents[2] / "crds" / "finetune.dev_finetunejobs.yaml"


def lifecycle_statuses() -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def step(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        j, plan = _step(*args, **kwargs)
        seen.append(copy.deepcopy(j["status"]))
        return j, plan

    j, _ = step(job(), [], claim=False)
    prog = {"step": 5, "totalSteps": 20, "epoch": 0.25, "loss": 0.5, "samplesPerSecond": 10.0}
    j, _ = step(j, [pod("faq-train-1", progress=prog, checkpoint={"name": "checkpoint-4", "step": 4})])
    j, _ = step(j, [pod("faq-train-1", "Failed", "failed", exit_code=1, message="boom")])  # nextAttemptAfter
    later = T0 + dt.timedelta(seconds=30)
    j, _ = step(j, [pod("faq-train-1", "Failed", "failed", exit_code=1)], later)
    done = pod("faq-train-2", "Succeeded", "completed", exit_code=0,
               summary={"step": 20, "checkpoint": "checkpoint-20", "resumedFrom": "checkpoint-4"})  # fmt: skip
    j, _ = step(j, [pod("faq-train-1", "Failed", "failed", exit_code=1), done], later)
    summary = {"export": "/workspace/export", "formats": ["sentence-transformers"], "maxDeviation": 1e-7,
               "metrics": {"ndcg@10": 0.4}}  # fmt: skip
    j, _ = step(j, [done, pod("faq-export-1", "Failed", "failed", exit_code=1)], later)
    j["status"]["attempts"][0]["suspended"] = True  # written when a suspend stops an attempt
    j, _ = step(j, [done, pod("faq-export-1", "Failed", "failed", exit_code=1),
                    pod("faq-export-2", "Succeeded", "completed", exit_code=0, summary=summary)],
                later + dt.timedelta(seconds=60))  # fmt: skip
    assert j["status"]["phase"] == "Succeeded"
    j, _ = step(job({"training": {"learningRate": -1}}), [], claim=False)  # Failed: InvalidSpec
    j, _ = step(job({"suspend": True}), [], claim=False)  # Suspended
    assert any("nextAttemptAfter" in s for s in seen)
    return seen


def missing(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = []
        for k, v in value.items():
            if props is not None and k in props:
                out += missing(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += missing(v, extra, f"{path}.{k}")
            elif extra is not True:
                out.append(f"{path}.{k}")
        return out
    if isinstance(value, list) and "items" in schema:
        return [m for i, v in enumerate(value) for m in missing(v, schema["items"], f"{path}[{i}]")]
    return []


def test_every_status_field_is_in_the_crd_schema() -> None:
    if not CRD.is_file():
        pytest.skip(f"{CRD} not in this checkout yet")
    crd = next(
        d for d in yaml.safe_load_all(CRD.read_text()) if d and d.get("kind") == "CustomResourceDefinition"
    )
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    gaps = sorted({m for st in lifecycle_statuses() for m in missing(st, schema, "status")})
    assert gaps == [], f"status fields the CRD would prune: {gaps}"
