"""What the API server does with a FineTuneJob, offline: prune nulls, default, validate, run CEL.

The order is the API server's: null values of non-nullable fields are dropped, schema defaults are
filled, the object is checked against the structural schema (converted to JSON Schema draft 4,
with unknown fields refused as `kubectl apply`'s strict field validation does), then every
`x-kubernetes-validations` rule is evaluated with cel-python; rules naming `oldSelf` (transition
rules) run only on updates where the old value exists.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]
CRD_PATH = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
SAMPLES_DIR = ROOT / "manifests" / "samples"


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `2e-05` (no dot, as kustomize writes floats) is a string; the API
    server reads YAML 1.2, where it is a number. This loader reads floats as YAML 1.2 does."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_all(text: str) -> list[Any]:
    """Every non-empty document of a multi-document YAML text, read as the API server reads it."""
    return [d for d in yaml.load_all(text, Loader=Yaml12Loader) if d]  # Yaml12Loader is a SafeLoader


@cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def version() -> dict[str, Any]:
    return next(v for v in crd()["spec"]["versions"] if v["storage"])


def schema() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def samples() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(SAMPLES_DIR.glob("finetune_v1alpha1_finetunejob_*.yaml"))}


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """The structural schema as a JSON Schema (draft 4) a jsonschema validator understands."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "default", "description"):
            continue
        if k == "properties":
            out[k] = {name: to_jsonschema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = to_jsonschema(v)
        else:
            out[k] = copy.deepcopy(v)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):  # fmt: skip
        out["additionalProperties"] = False
    if node.get("nullable"):
        out["type"] = [*([out["type"]] if isinstance(out.get("type"), str) else out.get("type", [])), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def prune_nulls(value: Any, node: dict[str, Any]) -> Any:
    """Drop null values of fields that are not nullable (the API server does, before defaulting)."""
    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        return {k: prune_nulls(v, props.get(k, {})) for k, v in value.items()
                if not (v is None and not props.get(k, {}).get("nullable"))}  # fmt: skip
    if isinstance(value, list) and "items" in node:
        return [prune_nulls(v, node["items"]) for v in value]
    return value


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Fill schema defaults as the API server does (a defaulted object gets its children's defaults)."""
    if isinstance(value, dict):
        value = dict(value)
        for k, sub in node.get("properties", {}).items():
            if k not in value and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
            if k in value:
                value[k] = apply_defaults(value[k], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            value = {k: apply_defaults(v, extra) if k not in node.get("properties", {}) else v for k, v in value.items()}
        return value
    if isinstance(value, list) and "items" in node:
        return [apply_defaults(v, node["items"]) for v in value]
    return value


def admit(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as stored after pruning and defaulting (no validation)."""
    return apply_defaults(prune_nulls(obj, schema()), schema())  # type: ignore[no-any-return]


def schema_errors(obj: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft4Validator(to_jsonschema(schema()))
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj))


@cache
def _program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_rules(node: dict[str, Any] | None = None, path: str = "") -> list[tuple[str, str, str]]:
    """(path, rule, message) of every CEL rule in the schema."""
    node = schema() if node is None else node
    out = [(path, r["rule"], f"{path}: {r.get('message', r['rule'])}") for r in node.get("x-kubernetes-validations", [])]
    for k, sub in node.get("properties", {}).items():
        out += cel_rules(sub, f"{path}.{k}")
    for k in ("items", "additionalProperties"):
        if isinstance(node.get(k), dict):
            out += cel_rules(node[k], f"{path}[]")
    return out


def cel_errors(new: Any, old: Any = None, node: dict[str, Any] | None = None, path: str = "") -> list[str]:
    """Messages of the CEL rules `new` breaks (`old`: the stored object on an update)."""
    import celpy

    node = schema() if node is None else node
    if new is None:
        return []
    out = []
    for r in node.get("x-kubernetes-validations", []):
        act = {"self": celpy.json_to_cel(new)}
        if "oldSelf" in r["rule"]:
            if old is None:
                continue
            act["oldSelf"] = celpy.json_to_cel(old)
        result = _program(r["rule"]).evaluate(act)
        if isinstance(result, Exception) or not isinstance(result, (bool, celpy.celtypes.BoolType)):
            raise AssertionError(f"CEL rule at {path or '<root>'} did not evaluate to a bool: {r['rule']!r} -> {result!r}")
        if not result:
            out.append(f"{path}: {r.get('message', r['rule'])}")
    if isinstance(new, dict):
        for k, sub in node.get("properties", {}).items():
            if k in new:
                out += cel_errors(new[k], old.get(k) if isinstance(old, dict) else None, sub, f"{path}.{k}")
    if isinstance(new, list) and isinstance(node.get("items"), dict):
        for i, v in enumerate(new):
            out += cel_errors(v, None, node["items"], f"{path}[{i}]")
    return out


def refusals(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Why the API server (with kubectl's strict field validation) refuses `obj`; [] when admitted."""
    stored = admit(obj)
    errors = schema_errors(stored)
    if errors:
        return errors
    return cel_errors(stored, admit(old) if old is not None else None)
