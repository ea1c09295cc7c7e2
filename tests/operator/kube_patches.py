"""Pure pieces of API-server semantics the emulator needs: patches and selectors.

RFC 7386 merge patch (also used for strategic-merge patches, which differ only for lists of
objects with merge keys — no test may rely on that), RFC 6902 JSON patch, label selectors
(equality- and set-based) and the field selectors the API server supports for every resource.
"""

from __future__ import annotations

import copy
import re
from typing import Any


class PatchError(Exception):
    """A patch that cannot apply; `status` is the HTTP status the API server answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, `None` deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}", 400)
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PatchError(f"path {path!r} does not exist") from None
    return node


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 on a deep copy of `doc`; a failed `test` or a missing path raises PatchError (422)."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations", 400)
    result = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            if _get(result, path) != op.get("value"):
                raise PatchError(f"test failed: {path} is not {op.get('value')!r}")
        elif kind in ("add", "replace"):
            if kind == "replace":
                _get(result, path)  # must exist
            result = _set(result, path, copy.deepcopy(op.get("value")), insert=kind == "add")
        elif kind == "remove":
            _remove(result, path)
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_get(result, op.get("from", "")))
            if kind == "move":
                _remove(result, op["from"])
            result = _set(result, path, value, insert=True)
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}", 400)
    return result


def _get(doc: Any, path: str) -> Any:
    node = doc
    for part in _pointer(path):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PatchError(f"path {path!r} does not exist") from None
    return node


def _set(doc: Any, path: str, value: Any, *, insert: bool) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _parent(doc, parts, path)
    key = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if key == "-" else int(key)
        if index > len(parent):
            raise PatchError(f"index out of range in {path!r}")
        if insert:
            parent.insert(index, value)
        else:
            parent[index] = value
    elif isinstance(parent, dict):
        parent[key] = value
    else:
        raise PatchError(f"path {path!r} does not exist")
    return doc


def _remove(doc: Any, path: str) -> None:
    parts = _pointer(path)
    parent = _parent(doc, parts, path)
    try:
        if isinstance(parent, list):
            del parent[int(parts[-1])]
        else:
            del parent[parts[-1]]
    except (KeyError, IndexError, ValueError, TypeError):
        raise PatchError(f"path {path!r} does not exist") from None


_SET_EXPR = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str | None, labels: dict[str, str] | None) -> bool:
    """Does a `labelSelector` (k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)) match `labels`?"""
    labels = labels or {}
    for req in _split_selector(selector or ""):
        m = _SET_EXPR.match(req)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            ok = labels.get(key) in values if op == "in" else labels.get(key) not in values
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            ok = labels.get(key) != value
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            ok = labels.get(key) == value
        elif req.startswith("!"):
            ok = req[1:].strip() not in labels
        else:
            ok = req in labels
        if not ok:
            return False
    return True


def field_selector_matches(selector: str | None, obj: dict[str, Any]) -> bool:
    """Equality field selectors on dotted paths (metadata.name, metadata.namespace, status.phase, ...)."""
    for req in _split_selector(selector or ""):
        negate = "!=" in req
        path, value = (s.strip() for s in req.replace("==", "=").replace("!=", "=").split("=", 1))
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        actual = "" if node is None else str(node)
        if (actual == value) == negate:
            return False
    return True
