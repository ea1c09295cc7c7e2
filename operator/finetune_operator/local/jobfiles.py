"""The files `finetune-operator local` is given: FineTuneJobs read from YAML/JSON (a whole object,
just its spec, or several `---`-separated jobs), the check that they can run together as one local
world, a warning where they ask for GPUs this machine lacks, and the inputs they name by
workspace-relative path copied next to them into the workspace."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from finetune_api.contract import API_VERSION, KIND
from finetune_api.spec import SpecError, yaml_load, yaml_load_all


def load_job(path: Path) -> dict[str, Any]:
    """A FineTuneJob object from a YAML/JSON file (a whole object, or just its spec).

    Raises:
        SpecError: not a FineTuneJob.
    """
    try:
        doc = yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(str(path), f"cannot read: {_named(e, path)}") from None
    return _job_from(doc, str(path), path.stem.replace("_", "-").lower())


def _named(e: Exception, path: Path) -> str:
    """A YAML error naming the file instead of PyYAML's "<unicode string>"."""
    return str(e).replace('"<unicode string>"', str(path)).replace("<unicode string>", str(path))


def load_jobs(path: Path) -> list[dict[str, Any]]:
    """Every FineTuneJob in a YAML/JSON file: one as `load_job` reads it, or several
    `---`-separated documents, each a whole FineTuneJob with its metadata.name.

    Raises:
        SpecError: a document is not a FineTuneJob.
    """
    try:
        docs = [d for d in yaml_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(str(path), f"cannot read: {_named(e, path)}") from None
    if len(docs) <= 1:  # as load_job reads it, without reading the file again
        return [_job_from(docs[0] if docs else None, str(path), path.stem.replace("_", "-").lower())]
    jobs = []
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict) or not (doc.get("metadata") or {}).get("name"):
            raise SpecError(f"{path} document {i}", "each of several jobs in one file needs metadata.name")
        jobs.append(_job_from(doc, f"{path} document {i}", ""))
    return jobs


def _job_from(doc: Any, where: str, default_name: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise SpecError(where, "must hold a FineTuneJob (an object)")
    if "spec" not in doc and "kind" not in doc:
        doc = {"spec": doc}
    if doc.get("kind", KIND) != KIND:
        raise SpecError("kind", f"expected {KIND}, got {doc.get('kind')!r}")
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("name", default_name)
    meta["namespace"] = meta.get("namespace") or "default"
    meta.update(uid=str(uuid.uuid4()), generation=1)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": doc.get("spec") or {},
        "status": {},
    }


def world_problem(jobs: list[dict[str, Any]]) -> str | None:
    """Why these jobs cannot run together (a duplicate name, a fromJob naming a job that is not
    among them, a fromJob cycle), or None."""
    names = [str(j["metadata"]["name"]) for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return f"two jobs are named {dupes[0]}"
    source: dict[str, str] = {}
    for j in jobs:
        src = ((j.get("spec") or {}).get("model") or {}).get("fromJob")
        if isinstance(src, str) and src != j["metadata"]["name"]:  # itself: reconcile says InvalidSpec
            source[str(j["metadata"]["name"])] = src
    for name, src in source.items():
        if src not in names:
            return (f"{name}: spec.model.fromJob names FineTuneJob {src}, which is not among the files given; "
                    f"pass its file too (finetune-operator local {src}.yaml {name}.yaml)")  # fmt: skip
        chain = [name]
        while chain[-1] in source:
            chain.append(source[chain[-1]])
            if chain[-1] in chain[:-1]:
                return f"spec.model.fromJob cycle: {' -> '.join(chain)}"
    return None


def gpu_warnings(jobs: list[dict[str, Any]], device: str = "/dev/nvidia0") -> list[str]:
    """A warning for each job that asks for GPUs on a machine that has none (its pods run on CPU)."""
    if Path(device).exists():
        return []
    out = []
    for j in jobs:
        gpus = ((j.get("spec") or {}).get("resources") or {}).get("gpus", 1)
        if isinstance(gpus, int) and gpus > 0:
            out.append(f"{j['metadata']['name']} asks for {gpus} GPU{'s' if gpus > 1 else ''} (spec.resources.gpus) but "
                       "this machine has none: it trains on CPU, much more slowly")  # fmt: skip
    return out


def stage_inputs(job: dict[str, Any], source_dirs: list[Path], workspace: Path) -> list[str]:
    """Copy files the spec names by workspace-relative path (dataset.path, dataset.eval.path,
    model.base) from next to the YAML file (or the current directory) into the workspace, as a
    user would copy them onto the PVC. Returns the paths copied; existing workspace files win."""
    spec = job.get("spec") or {}
    dataset = spec.get("dataset") or {}
    wanted = [
        dataset.get("path"),
        (dataset.get("eval") or {}).get("path"),
        (spec.get("model") or {}).get("base"),
    ]
    copied = []
    for rel in wanted:
        if (
            not isinstance(rel, str)
            or not rel
            or Path(rel).is_absolute()
            or ":" in rel
            or ".." in Path(rel).parts
        ):
            continue
        dst = workspace / rel
        src = next((d / rel for d in source_dirs if (d / rel).exists()), None)
        if src is None or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        copied.append(rel)
    return copied
