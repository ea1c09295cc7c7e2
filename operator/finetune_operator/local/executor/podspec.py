"""A pod spec's local meaning: memory quantities, volumes as directories and container paths
rewritten to them, executable lookup, `$(VAR)` expansion, env values, a gang's rendezvous on
127.0.0.1, and the process tree's memory in /proc.

Used by the executor's start, watch and stop; no kopf, no torch, no API client.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_memory_quantity(value: str | int | float) -> int:
    """Bytes of a Kubernetes memory quantity such as `16Gi`, `512M`, `1e9` or `1048576`.

    Raises:
        ValueError: the string is not a memory quantity.
    """
    text = str(value).strip()
    try:
        return int(float(text))  # plain numbers, including 1e9
    except ValueError:
        pass
    m = _QUANTITY.match(text)
    if not m or m.group(2) not in _SUFFIXES:
        raise ValueError(f"not a memory quantity: {value!r}")
    return int(float(m.group(1)) * _SUFFIXES[m.group(2)])


def rewrite_path(value: str, mounts: list[tuple[str, str]]) -> str:
    """Map a container path (or `--flag=PATH`) equal to or under a mount path to the local directory."""
    prefix, sep, path = value.partition("=") if value.startswith("-") else ("", "", value)
    for mount, local in mounts:
        if path == mount:
            return prefix + sep + local
        if path.startswith(mount + "/") or mount == "/":
            return prefix + sep + local + "/" + path[len(mount) :].lstrip("/")
    return value


SecretReader = Callable[[str, str], "dict[str, bytes] | None"]  # (namespace, name) -> data, or None


def volume_mounts(
    pod: dict[str, Any], container: dict[str, Any], pod_dir: Path, pvc_dir: Callable[[str], Path],
    secrets: SecretReader | None = None,
) -> list[tuple[str, str]]:
    """(mountPath, local directory) for each of the container's volumeMounts, deepest first.

    A persistentVolumeClaim maps to `pvc_dir(claimName)`; a `secret` volume to a directory holding
    its keys (its `items`) when `secrets` can read it, and is left unmounted otherwise (the local
    runner: the user's own environment carries credentials); emptyDir and every other kind to a
    fresh directory under `pod_dir/volumes/`; `subPath` is honoured. Creates the directories.
    """
    volumes: dict[str, Path] = {}
    namespace = str((pod.get("metadata") or {}).get("namespace") or "default")
    for vol in (pod.get("spec") or {}).get("volumes") or []:
        claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
        if claim:
            volumes[vol["name"]] = pvc_dir(claim)
        elif "secret" in vol:
            data = secrets(namespace, vol["secret"].get("secretName", "")) if secrets else None
            if data is None:
                continue
            path = volumes[vol["name"]] = pod_dir / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            for item in vol["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                if item["key"] in data:
                    (path / item["path"]).write_bytes(data[item["key"]])
        else:  # emptyDir; configMap/secret/... have no source here: an empty directory too
            volumes[vol["name"]] = pod_dir / "volumes" / vol["name"]
            volumes[vol["name"]].mkdir(parents=True, exist_ok=True)
    mounts = []
    for m in container.get("volumeMounts") or []:
        if m.get("name") not in volumes:
            continue
        local = volumes[m["name"]] / m["subPath"] if m.get("subPath") else volumes[m["name"]]
        local.mkdir(parents=True, exist_ok=True)
        mounts.append((m["mountPath"].rstrip("/") or "/", str(local)))
    return sorted(mounts, key=lambda mp: len(mp[0]), reverse=True)  # the deepest mount wins


def resolve_executable(command: str, bin_dir: Path) -> str:
    """The local executable for a container's `command[0]`: its name in `bin_dir` first, then the
    path itself if absolute and present, then the name on PATH.

    Raises:
        FileNotFoundError: none of those exists.
    """
    candidate = bin_dir / Path(command).name
    if os.sep not in command and candidate.is_file():
        return str(candidate)
    if os.path.isabs(command) and os.path.isfile(command):
        return command
    if candidate.is_file():  # /usr/local/bin/finetune-worker in the image -> the venv's script
        return str(candidate)
    found = shutil.which(Path(command).name)
    if found is None:
        raise FileNotFoundError(f"executable {command!r} not found in {bin_dir} or on PATH")
    return found


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion in command, args and env values (`$$` escapes; unknown refs stay)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, value)


def unmounted_secret_paths(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """mountPaths of the container's `secret` volumes (the ones left unmounted without a reader)."""
    secret_vols = {v["name"] for v in (pod.get("spec") or {}).get("volumes") or [] if "secret" in v}
    return [m["mountPath"].rstrip("/") for m in container.get("volumeMounts") or [] if m.get("name") in secret_vols]


def env_value(item: dict[str, Any], pod: dict[str, Any], secrets: SecretReader | None = None) -> str | None:
    """An env entry's value: `value`, a `fieldRef` to the pod's name/namespace/uid, or a
    `secretKeyRef` read through `secrets` (None without a reader: the host's variable stays)."""
    if "value" in item:
        return str(item["value"])
    meta = pod.get("metadata") or {}
    secret_ref = (item.get("valueFrom") or {}).get("secretKeyRef")
    if secret_ref:
        data = secrets(str(meta.get("namespace") or "default"), secret_ref.get("name", "")) if secrets else None
        value = (data or {}).get(secret_ref.get("key", ""))
        return None if value is None else value.decode()
    ref = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    if ref in ("metadata.name", "metadata.namespace", "metadata.uid"):
        return str(meta.get(ref.split(".", 1)[1], ""))
    return None


def killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (Linux /proc; 0 where unavailable)."""
    total, todo, seen = 0, [pid], set()
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


RDZV_ENDPOINT_ENV = "PET_RDZV_ENDPOINT"  # torchrun's rendezvous endpoint (a multi-node gang, gang.py)
RDZV_ID_ENV = "PET_RDZV_ID"


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_rendezvous(env: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """A gang member's rendezvous on this machine: the rank-0 pod's DNS name becomes 127.0.0.1 and
    each rendezvous id (one per attempt) its own free port, shared by the members of that attempt."""
    if RDZV_ENDPOINT_ENV not in env:
        return env
    rdzv = env.get(RDZV_ID_ENV) or env[RDZV_ENDPOINT_ENV]
    if rdzv not in ports:
        ports[rdzv] = free_port()
    return {**env, RDZV_ENDPOINT_ENV: f"127.0.0.1:{ports[rdzv]}"}
