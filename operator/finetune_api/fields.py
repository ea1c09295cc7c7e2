"""Generic validation primitives for the FineTuneJob spec parser. Pure (no I/O, no kopf, no torch).

A field reader (`_Obj`) that rejects unknown keys and names every error by its path; checks for
Kubernetes names, quantities, tolerations and node selectors, sizes, workspace paths and inline
records; and a YAML loader that reads numbers as the API server does. `spec` builds the
FineTuneJob sections, their defaults and cross-checks from these.
"""

from __future__ import annotations

import builtins  # _Obj's methods are named bool/int/float/str; annotations after them need these
import difflib
import math
import re
from collections.abc import Iterable
from typing import Any

import yaml

MAX_INLINE_RECORDS = 10_000  # inline data lives in etcd; larger sets belong in a file

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Kubernetes qualified names (label keys, extended resource names): [prefix/]name
_QUALIFIED = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NO_SPACE = re.compile(r"^[^\s\x00-\x1f\x7f]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class SpecError(ValueError):
    """An invalid spec. `field` is the path of the offending field, e.g. `spec.training.epochs`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Obj:
    """A dict being read at a path; rejects unknown keys so typos never pass silently."""

    def __init__(self, value: Any, path: str) -> None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise SpecError(path, f"must be an object, got {_kind(value)}")
        self.value = value
        self.path = path
        self.seen: set[str] = set()

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.value.get(key)

    def sub(self, key: str) -> _Obj:
        return _Obj(self.get(key), f"{self.path}.{key}")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.value if k not in self.seen)
        if unknown:
            raise SpecError(self.at(unknown[0]), f"unknown field{did_you_mean(unknown[0], self.seen)} "
                                                 f"(known: {', '.join(sorted(self.seen))})")

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise SpecError(self.at(key), f"must be true or false, got {_kind(v)}")
        return v

    def int(self, key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise SpecError(self.at(key), f"must be an integer, got {_kind(v)}")
        _bounds(self.at(key), v, lo, hi)
        return v

    def float(self, key: str, default: float | None, lo: float | None = None, hi: float | None = None,
              lo_open: builtins.bool = False) -> builtins.float | None:
        v = self.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(self.at(key), f"must be a number, got {_kind(v)}")
        try:
            v = float(v)
        except OverflowError:  # YAML integers are unbounded
            v = math.inf
        if not math.isfinite(v):
            raise SpecError(self.at(key), "must be a finite number")
        if lo_open and lo is not None and v <= lo:
            raise SpecError(self.at(key), f"must be greater than {lo:g}, got {_num(v)}")
        _bounds(self.at(key), v, None if lo_open else lo, hi)
        return v

    def str(self, key: str, default: str | None, choices: tuple[str, ...] | None = None,
            max_len: builtins.int = 253) -> builtins.str | None:
        v = self.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise SpecError(self.at(key), f"must be a string, got {_kind(v)}")
        if not v.strip():
            raise SpecError(self.at(key), "must not be empty")
        if len(v) > max_len:
            raise SpecError(self.at(key), f"must be at most {max_len} characters")
        if "\x00" in v:
            raise SpecError(self.at(key), "must not contain NUL characters")
        if _CONTROL.search(v):
            raise SpecError(self.at(key), "must not contain control characters (newlines, tabs, escapes)")
        if choices is not None and v not in choices:
            raise SpecError(self.at(key), f"unknown value {_show(v)}; expected one of: "
                                          f"{', '.join(choices)}{did_you_mean(v, choices, hint=True)}")
        return v


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "null" if v is None else type(v).__name__)


def _show(v: Any, limit: int = 80) -> str:
    """repr(v) for a message, shortened: a rejected value may be megabytes long."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[: limit - 15]}...({len(text)} chars)"


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else _show(v, 40)


def _bounds(path: str, v: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and v < lo:
        raise SpecError(path, f"must be at least {lo:g}, got {_num(v)}")
    if hi is not None and v > hi:
        raise SpecError(path, f"must be at most {hi:g}, got {_num(v)}")


def parse_size(text: str, path: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000' (bytes) -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise SpecError(path, f"not a size: {_show(text)} (e.g. 5GB, 500MB, 2GiB)")
    n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    if n < 1:
        raise SpecError(path, "must be at least 1 byte")
    return n


def check_relative_path(path: str, where: str) -> str:
    """A path inside the workspace: relative, no `..` segment, no NUL. Absolute paths pass
    (they name files in the image, e.g. a bundled model), but never with `..` in them."""
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        raise SpecError(where, f"path must not contain '..' (got {_show(path)}); paths are relative to the workspace")
    if path.startswith("~"):
        raise SpecError(where, f"path must not start with '~' (got {_show(path)})")
    return path


def _records(v: Any, path: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(v, list):
        raise SpecError(path, f"must be a list of records, got {_kind(v)}")
    if not v:
        raise SpecError(path, "must hold at least one record")
    if len(v) > MAX_INLINE_RECORDS:
        raise SpecError(path, f"holds {len(v)} records; inline data is capped at {MAX_INLINE_RECORDS} "
                              "(put larger sets in a file on the workspace)")
    for i, r in enumerate(v):
        if not isinstance(r, dict) or not r:
            raise SpecError(f"{path}[{i}]", f"must be a non-empty object, got {_kind(r)}")
        for k, x in r.items():
            # a column holds text, a number or a flat list of them; nothing nested (a 1000-deep
            # object would blow the recursion limit of every JSON encoder on its way to the pod)
            items = x if isinstance(x, list) else [x]
            if not isinstance(k, str) or not all(isinstance(y, (str, int, float, bool)) or y is None for y in items):
                raise SpecError(f"{path}[{i}].{k}", "a record maps column names to text, numbers or flat lists of them")
    return tuple(v)


def _k8s_name(o: _Obj, key: str, pattern: re.Pattern[str], what: str, max_len: int = 253) -> str | None:
    v = o.str(key, None, max_len=max_len)
    if v is not None and not pattern.match(v):
        raise SpecError(o.at(key), f"not a valid {what}: {_show(v)}")
    return v


def _quantity(o: _Obj, key: str, default: str) -> str:
    v = o.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not _QUANTITY.match(str(v)):
        raise SpecError(o.at(key), f"not a Kubernetes quantity: {_show(v)} (e.g. 4, 500m, 16Gi)")
    return str(v)


def _tolerations(o: _Obj, key: str) -> list[dict[str, Any]]:
    tolerations = o.get(key) or []
    if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
        raise SpecError(o.at(key), "must be a list of toleration objects")
    for i, t in enumerate(tolerations):
        for k, v in t.items():
            if k not in TOLERATION_KEYS:
                raise SpecError(f"{o.at(key)}[{i}].{k}", f"unknown field (known: {', '.join(TOLERATION_KEYS)})")
            if isinstance(v, bool) or not isinstance(v, int if k == "tolerationSeconds" else str):
                raise SpecError(f"{o.at(key)}[{i}].{k}", "must be " + ("an integer" if k == "tolerationSeconds" else "a string"))
    return tolerations


def _node_selector(o: _Obj, key: str) -> dict[str, Any]:
    node_selector = o.get(key) or {}
    if not isinstance(node_selector, dict) or not all(isinstance(v, str) for v in node_selector.values()):
        raise SpecError(o.at(key), "must map label names to string values")
    if len(node_selector) > 64:  # the CRD's maxProperties
        raise SpecError(o.at(key), f"at most 64 labels, got {len(node_selector)}")
    for k, v in node_selector.items():
        if not isinstance(k, str) or len(k) > 316 or not _QUALIFIED.match(k) or len(v) > 63 or not _LABEL_VALUE.match(v):
            raise SpecError(f"{o.at(key)}.{k}", f"not a node label: {_show(k)}={_show(v)}")
    return node_selector


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads numbers as kubectl does (YAML 1.2): PyYAML's YAML 1.1 rules read
    `2e-5` and `5e-05` (no dot) as strings, so `learningRate: 2e-5` would be refused locally while
    the API server stores it as a number."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)  # fmt: skip


def did_you_mean(word: object, choices: Iterable[str], *, hint: bool = False) -> str:
    """'; did you mean learningRate?' (with `hint`: ' (did you mean fp16?)') for the closest choice
    (same letters in another case first, then spelling), or ''."""
    if not isinstance(word, str):
        return ""
    options = sorted(set(choices))
    same_case = [c for c in options if c.lower() == word.lower()]
    close = same_case or difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {close[0]}?)" if hint else f"; did you mean {close[0]}?"


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader subclass


def yaml_load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=YamlLoader))
