"""Table tests for the emulator's pure API semantics: merge/JSON patches and selectors."""

from __future__ import annotations

from typing import Any

import pytest
from kube_patches import PatchError, field_selector_matches, json_patch, label_selector_matches, merge_patch


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}}, {"a": 1, "b": {"d": 3, "e": 4}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),  # lists replace
        ({"a": 1}, {"a": {"b": 2}}, {"a": {"b": 2}}),
        ({"a": {"b": 1}}, {"a": None}, {}),
    ],
)
def test_merge_patch(target: dict[str, Any], patch: dict[str, Any], expected: dict[str, Any]) -> None:
    assert merge_patch(target, patch) == expected


def test_json_patch_ops_and_failures() -> None:
    doc = {"metadata": {"resourceVersion": "7", "finalizers": ["a", "b"]}, "spec": {}}
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
        {"op": "add", "path": "/metadata/finalizers/-", "value": "c"},
        {"op": "add", "path": "/metadata/annotations", "value": {"x/y": "1"}},
        {"op": "replace", "path": "/metadata/annotations/x~1y", "value": "2"},
        {"op": "copy", "from": "/metadata/annotations", "path": "/spec/copied"},
        {"op": "move", "from": "/spec/copied", "path": "/spec/moved"},
    ]
    out = json_patch(doc, ops)
    assert out["metadata"]["finalizers"] == ["b", "c"]
    assert out["metadata"]["annotations"] == {"x/y": "2"}
    assert out["spec"] == {"moved": {"x/y": "2"}}
    assert doc["metadata"]["finalizers"] == ["a", "b"]  # the input is untouched
    with pytest.raises(PatchError) as e:
        json_patch(doc, [{"op": "test", "path": "/metadata/resourceVersion", "value": "6"}])
    assert e.value.status == 422
    with pytest.raises(PatchError) as e:
        json_patch(doc, [{"op": "replace", "path": "/status/phase", "value": "x"}])
    assert e.value.status == 422
    with pytest.raises(PatchError) as e:
        json_patch(doc, [{"op": "frobnicate", "path": "/x"}])
    assert e.value.status == 400


LABELS = {"app": "finetune", "role": "train", "attempt": "2"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("app=finetune", True),
        ("app==finetune,role=train", True),
        ("app=finetune,role=export", False),
        ("role!=export", True),
        ("role!=train", False),
        ("attempt", True),
        ("!attempt", False),
        ("!missing", True),
        ("role in (train, export)", True),
        ("role notin (train,export)", False),
        ("app=finetune,role in (export)", False),
    ],
)
def test_label_selectors(selector: str, matches: bool) -> None:
    assert label_selector_matches(selector, LABELS) is matches


@pytest.mark.parametrize(
    ("selector", "matches"),
    [("metadata.name=p1", True), ("metadata.name!=p1", False), ("status.phase=Running", True), ("status.phase=Failed", False),
     ("metadata.namespace=default,status.phase==Running", True), ("spec.nodeName=", True)],
)  # fmt: skip
def test_field_selectors(selector: str, matches: bool) -> None:
    pod = {"metadata": {"name": "p1", "namespace": "default"}, "status": {"phase": "Running"}, "spec": {}}
    assert field_selector_matches(selector, pod) is matches
