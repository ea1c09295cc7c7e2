"""Fuzzed CRD: objects generated from the CRD's own openAPIV3Schema, admitted (or not) the way the
API server would (crdkit: prune, default, validate, CEL). Whatever the API server admits,
parse_spec accepts or rejects naming a real field: it never crashes, and reconcile turns a
rejection into a Failed condition without creating a pod. Specs the parser accepts are admitted
by the CRD, so a user can always apply what the worker would run.

Admitted-but-rejected cases are gaps where a user learns of a mistake from status instead of from
`kubectl apply`; the known ones are listed in GAPS (the parser checks them, the schema cannot
express them); a new gap fails the test so the schema and the parser stay in step.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from typing import Any

import pytest
from crdkit import admit, refusals, schema
from fuzzkit import FUZZ, NASTY_STRINGS, VALID_SPECS, field_resolves
from hypothesis import event, given, settings
from hypothesis import strategies as st

from finetune_api.spec import SpecError, parse_spec
from finetune_operator.decisions.observe import Observed
from finetune_operator.decisions.reconcile import Settings, reconcile

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
FUZZ_CRD = settings(FUZZ, max_examples=300)

# Fields whose rules the schema does not (or cannot) state, so the parser is the one to refuse:
# path traversal, loss-specific parameters and columns, Kubernetes name syntax of free strings,
# values of inline records, and a hub revision's characters.
GAPS = re.compile(
    r"^spec\.(model\.base|model\.revision|dataset\.path|dataset\.eval\.path|dataset\.split|dataset\.columns\.\w+"
    r"|dataset\.(eval\.)?inline\[\d+\].*|training\.lossParams.*|lora\.targetModules|tolerations\[\d+\].*"
    # nodeSelector keys: a CEL rule over map keys risks the API server's cost limit, so the parser checks them
    r"|nodeSelector\..*|export\.maxShardSize|lora|export\.formats|training\.precision)$"
)


def _text(node: dict[str, Any]) -> st.SearchStrategy[str]:
    lo, hi = node.get("minLength", 0), min(node.get("maxLength", 40), 40)
    nasty = st.sampled_from([s for s in NASTY_STRINGS if lo <= len(s) <= node.get("maxLength", 10**9)] or ["x"])
    if "pattern" in node:
        return st.one_of(st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: lo <= len(s) <= hi + 20), nasty)
    return st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), min_size=lo, max_size=max(lo, hi)), nasty)


def _any_json() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False), st.text(max_size=10))
    return st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)),
                        max_leaves=8)  # fmt: skip


def from_schema(node: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped by a structural-schema node: mostly valid, sometimes just outside its bounds."""
    if "enum" in node:
        base: st.SearchStrategy[Any] = st.sampled_from(node["enum"])
    elif node.get("x-kubernetes-int-or-string"):
        base = st.one_of(st.integers(0, 10**6), _text(node))
    elif node.get("type") == "object":
        props = node.get("properties", {})
        if not props:
            base = st.dictionaries(st.text(min_size=1, max_size=8), _any_json(), max_size=3) \
                if node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node else st.just({})  # fmt: skip
            if isinstance(node.get("additionalProperties"), dict):
                base = st.dictionaries(st.text(min_size=1, max_size=8), from_schema(node["additionalProperties"], depth + 1),
                                       max_size=3)  # fmt: skip
        else:
            required = set(node.get("required", []))
            base = st.fixed_dictionaries({k: from_schema(v, depth + 1) for k, v in props.items() if k in required},
                                         optional={k: from_schema(v, depth + 1) for k, v in props.items() if k not in required})  # fmt: skip
    elif node.get("type") == "array":
        base = st.lists(from_schema(node.get("items", {}), depth + 1), min_size=node.get("minItems", 0),
                        max_size=max(node.get("minItems", 0), min(node.get("maxItems", 3), 3)))  # fmt: skip
    elif node.get("type") == "string":
        base = _text(node)
    elif node.get("type") == "integer":
        lo, hi = node.get("minimum"), node.get("maximum")
        base = st.one_of(st.integers(lo, hi), st.integers(lo, hi), st.integers(-(10**12), 10**12))
    elif node.get("type") == "number":
        lo, hi = node.get("minimum"), node.get("maximum")
        inside = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
        base = st.one_of(inside, inside, st.floats(allow_nan=False, allow_infinity=False))
    elif node.get("type") == "boolean":
        base = st.booleans()
    else:
        base = _any_json()
    return st.one_of(st.none(), base) if node.get("nullable") else base


SPEC_SCHEMA = schema()["properties"]["spec"]


def schema_paths(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    out = []
    for k, sub in node.get("properties", {}).items():
        out.append(((*prefix, k), sub))
        out += schema_paths(sub, (*prefix, k))
    return out


SPEC_PATHS = schema_paths(SPEC_SCHEMA)


@st.composite
def near_valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with one to three fields replaced by values drawn from their schema nodes."""
    spec = copy.deepcopy(draw(st.sampled_from(VALID_SPECS)))
    for _ in range(draw(st.integers(1, 3))):
        path, node = draw(st.sampled_from(SPEC_PATHS))
        cur = spec
        for k in path[:-1]:
            if not isinstance(cur.get(k), dict):
                cur[k] = {}
            cur = cur[k]
        cur[path[-1]] = draw(from_schema(node))
    return spec


def as_job(spec: Any) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "fz", "namespace": "ml", "uid": "u-1", "generation": 1}, "spec": spec}  # fmt: skip


@pytest.mark.parametrize("i", range(len(VALID_SPECS)))
def test_every_spec_the_parser_accepts_is_admitted_by_the_crd(i: int) -> None:
    spec = copy.deepcopy(VALID_SPECS[i])
    assert refusals(as_job(spec)) == []
    assert parse_spec(admit(as_job(spec))["spec"]).raw  # and the defaults the schema adds parse too


@FUZZ_CRD
@given(st.one_of(from_schema(SPEC_SCHEMA), near_valid_specs(), near_valid_specs()))
def test_whatever_the_crd_admits_is_parsed_or_rejected_naming_a_field(spec: dict[str, Any]) -> None:
    obj = as_job(spec)
    try:
        refused = refusals(obj)
        if refused:
            event("refused by the CRD: " + refused[0].split(":")[0])
            return  # `kubectl apply` refuses it: the operator never sees it
    except (TypeError, ValueError, RecursionError):  # cel-python on values it cannot convert
        return
    stored = admit(obj)
    try:
        parse_spec(copy.deepcopy(stored["spec"]))
        event("admitted and parsed")
    except SpecError as e:
        event(f"admitted, rejected by the parser at {re.sub(r'[0-9]+', 'N', e.field)}")
        assert field_resolves(stored["spec"], e.field), f"{e.field!r} not a path into the spec: {e}"
        assert GAPS.match(e.field), f"the CRD admits what the parser rejects (close the gap in the schema): {e}"
        plan = reconcile(stored | {"status": {}}, Observed(), T0, Settings())
        assert plan.create == [] and plan.status is not None and plan.status["phase"] == "Failed"
        assert e.field in plan.status["message"]
