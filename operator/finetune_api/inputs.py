"""`spec.model` and `spec.dataset`: what a job trains from (a base model or a previous job's export;
a data file, hub dataset or inline records, and the eval split). Pure; spec.py's parser calls
these and re-exports the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_api.fields import (
    _DNS_LABEL,
    _HUB_ID,
    SpecError,
    _kind,
    _Obj,
    _records,
    _show,
    check_relative_path,
    did_you_mean,
)
from finetune_api.remote import check_s3_url, is_s3
from finetune_api.training import LOSS_COLUMNS

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("all-MiniLM-L6-v2",)
MAX_NAME_LEN = 63


@dataclass(frozen=True)
class ModelSpec:
    base: str | None = "builtin:all-MiniLM-L6-v2"
    from_job: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class EvalSpec:
    fraction: float | None = None
    path: str | None = None
    inline: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    path: str | None = None
    hub: str | None = None
    inline: tuple[dict[str, Any], ...] | None = None
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)  # model-side name -> file-side name
    eval: EvalSpec | None = None


def parse_model(o: _Obj) -> ModelSpec:
    base = o.str("base", None, max_len=1024)
    from_job = o.str("fromJob", None)
    if base is not None and from_job is not None:
        raise SpecError(o.at("fromJob"), "set either model.base or model.fromJob, not both")
    if base is None and from_job is None:
        base = ModelSpec.base
    if from_job is not None and (len(from_job) > MAX_NAME_LEN or not _DNS_LABEL.match(from_job)):
        raise SpecError(o.at("fromJob"), f"not a FineTuneJob name: {_show(from_job)}")
    if base is not None:
        if base.startswith(BUILTIN_PREFIX):
            if base[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
                raise SpecError(o.at("base"), f"unknown builtin model {_show(base)}; bundled: "
                                + ", ".join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS))
        elif is_s3(base):
            check_s3_url(base, o.at("base"), prefix=True)
        else:
            check_relative_path(base, o.at("base"))
    m = ModelSpec(base=base, from_job=from_job, revision=o.str("revision", None),
                  trust_remote_code=o.bool("trustRemoteCode", False))
    o.done()
    return m


def _data_path(path: str, where: str) -> None:
    """A data file on the workspace, or an object in S3 (`s3://bucket/key`)."""
    if is_s3(path):
        check_s3_url(path, where, prefix=False)
    else:
        check_relative_path(path, where)


def _eval(o: _Obj) -> EvalSpec | None:
    if not o.value:
        return None
    fraction = o.float("fraction", None, lo=0.0, hi=0.9, lo_open=True)
    path = o.str("path", None, max_len=1024)
    inline_raw = o.get("inline")
    inline = None if inline_raw is None else _records(inline_raw, o.at("inline"))
    given = [k for k, v in (("fraction", fraction), ("path", path), ("inline", inline)) if v is not None]
    if len(given) > 1:
        raise SpecError(o.path, f"set exactly one of fraction, path, inline (got {', '.join(given)})")
    if path is not None:
        _data_path(path, o.at("path"))
    o.done()
    return EvalSpec(fraction=fraction, path=path, inline=inline) if given else None


def parse_dataset(o: _Obj) -> DatasetSpec:
    path = o.str("path", None, max_len=1024)
    hub = o.str("hub", None)
    inline_raw = o.get("inline")
    inline = None if inline_raw is None else _records(inline_raw, o.at("inline"))
    given = [k for k, v in (("path", path), ("hub", hub), ("inline", inline)) if v is not None]
    if len(given) != 1:
        raise SpecError(o.path, "set exactly one of path, hub, inline"
                        + (f" (got {', '.join(given)})" if given else ""))
    if path is not None:
        _data_path(path, o.at("path"))
    if hub is not None and not _HUB_ID.match(hub):
        raise SpecError(o.at("hub"), f"not a hub dataset id: {_show(hub)}")
    cols_raw = o.get("columns") or {}
    if not isinstance(cols_raw, dict):
        raise SpecError(o.at("columns"), f"must be an object mapping model-side to file-side names, got {_kind(cols_raw)}")
    known = {c for req, opt in LOSS_COLUMNS.values() for c in (*req, *opt)}
    for k, v in cols_raw.items():
        if k not in known:
            raise SpecError(f"{o.at('columns')}.{k}", f"unknown model-side column; expected one of: {', '.join(sorted(known))}{did_you_mean(k, known, hint=True)}")
        if not isinstance(v, str) or not v:
            raise SpecError(f"{o.at('columns')}.{k}", "must be a non-empty column name")
    d = DatasetSpec(path=path, hub=hub, inline=inline, split=o.str("split", "train") or "train",
                    columns=dict(cols_raw), eval=_eval(o.sub("eval")))
    o.done()
    return d
