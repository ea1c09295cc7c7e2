"""FineTuneJob spec: parsing, defaults and validation. Pure (no I/O, no kopf, no torch).

One parser serves every reader of a spec: the operator (an invalid object the CRD schema could
not refuse becomes a Failed condition naming the field), the worker (`--config` is validated
before any heavy work and an error exits 2), and the local runner. Every error names the field
by its path in the object (`spec.training.learningRate`), so a user knows what to fix.

Checks that need the model or the data (a Matryoshka dimension above the embedding size, a
missing column, a CoSENT score column that is not float) live in the worker, which has both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from finetune_api.contract import API_VERSION, EXPORT_FORMATS, KIND
from finetune_api.distributed import DistributedSpec, check_distributed, parse_access_modes, parse_distributed
from finetune_api.fields import (
    _DNS_LABEL,
    _DNS_SUBDOMAIN,
    _NO_SPACE,
    _QUALIFIED,
    _k8s_name,
    _kind,
    _node_selector,
    _Obj,
    _quantity,
    _show,
    _tolerations,
    did_you_mean,
)

# Re-exported (with the names of inputs and training below): the operator, the worker, the tests and the
# benches import these from `spec`.
from finetune_api.fields import MAX_INLINE_RECORDS as MAX_INLINE_RECORDS
from finetune_api.fields import SpecError as SpecError
from finetune_api.fields import parse_size as parse_size
from finetune_api.fields import yaml_load as yaml_load
from finetune_api.fields import yaml_load_all as yaml_load_all
from finetune_api.inputs import BUILTIN_MODELS as BUILTIN_MODELS
from finetune_api.inputs import BUILTIN_PREFIX as BUILTIN_PREFIX
from finetune_api.inputs import MAX_NAME_LEN as MAX_NAME_LEN
from finetune_api.inputs import DatasetSpec as DatasetSpec
from finetune_api.inputs import EvalSpec as EvalSpec
from finetune_api.inputs import ModelSpec as ModelSpec
from finetune_api.inputs import parse_dataset, parse_model
from finetune_api.remote import CredentialsSpec, parse_credentials, parse_push
from finetune_api.training import INNER_LOSSES as INNER_LOSSES
from finetune_api.training import LOSS_COLUMNS as LOSS_COLUMNS
from finetune_api.training import LOSSES as LOSSES
from finetune_api.training import PRECISIONS as PRECISIONS
from finetune_api.training import CheckpointSpec as CheckpointSpec
from finetune_api.training import LoraSpec as LoraSpec
from finetune_api.training import TrainingSpec as TrainingSpec
from finetune_api.training import parse_lora, parse_training

POOLINGS = ("mean", "cls", "max", "lasttoken")
RECLAIM_POLICIES = ("Retain", "Delete")
EVAL_METRICS = ("ndcg@10", "mrr@10", "map@100", "accuracy@1", "recall@10", "spearman", "pearson")



@dataclass(frozen=True)
class EvaluateSpec:
    metric: str = "ndcg@10"
    min: float = 0.0


@dataclass(frozen=True)
class ExportSpec:
    merge: bool = True
    formats: tuple[str, ...] = ("sentence-transformers",)
    pooling: str | None = None
    normalize: bool = True
    max_shard_size: str = "5GB"
    tolerance: float = 1.0e-5
    evaluate: EvaluateSpec | None = None
    checkpoint: str | None = None  # export a named checkpoint instead of the final result
    push: tuple[str, ...] = ()  # s3://bucket/prefix/ and oci://registry/repository:tag (finetune_api.remote)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size, "spec.export.maxShardSize")


@dataclass(frozen=True)
class ResourcesSpec:
    gpus: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "16Gi"


@dataclass(frozen=True)
class StorageSpec:
    claim_name: str | None = None
    size: str = "20Gi"
    storage_class_name: str | None = None
    reclaim_policy: str = "Retain"
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)


@dataclass(frozen=True)
class FineTuneSpec:
    model: ModelSpec
    dataset: DatasetSpec
    training: TrainingSpec
    lora: LoraSpec | None
    export: ExportSpec
    resources: ResourcesSpec
    image: str | None
    node_selector: dict[str, str]
    tolerations: tuple[dict[str, Any], ...]
    priority_class_name: str | None
    queue_name: str | None
    storage: StorageSpec
    backoff_limit: int
    suspend: bool
    ttl_seconds_after_finished: int | None
    raw: dict[str, Any]  # the spec as given, for handing to worker pods unchanged
    credentials: CredentialsSpec = field(default_factory=CredentialsSpec)  # Secret references (finetune_api.remote)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)

    @property
    def world_size(self) -> int:
        return self.distributed.world_size(self.resources.gpus)


# --------------------------------------------------------------------------- sections


def _export(o: _Obj) -> ExportSpec:
    fmts = o.get("formats")
    if fmts is None:
        fmts = ["sentence-transformers"]
    if not isinstance(fmts, list) or not fmts:
        raise SpecError(o.at("formats"), f"must be a non-empty list of: {', '.join(EXPORT_FORMATS)}")
    for i, f in enumerate(fmts):
        if f not in EXPORT_FORMATS:
            raise SpecError(f"{o.at('formats')}[{i}]", f"unknown format {_show(f)}; expected one of: {', '.join(EXPORT_FORMATS)}{did_you_mean(f, EXPORT_FORMATS, hint=True)}")
    if len(set(fmts)) != len(fmts):
        raise SpecError(o.at("formats"), "formats must be distinct")
    verify = o.sub("verify")
    tol = verify.float("tolerance", 1.0e-5, lo=0.0, hi=1.0, lo_open=True) or 1.0e-5
    verify.done()
    ev = o.get("evaluate")
    evaluate = None
    if ev is not None:
        eo = _Obj(ev, o.at("evaluate"))
        evaluate = EvaluateSpec(metric=eo.str("metric", "ndcg@10", choices=EVAL_METRICS) or "ndcg@10",
                                min=eo.float("min", 0.0, lo=-1.0, hi=1.0) or 0.0)
        eo.done()
    size = o.str("maxShardSize", "5GB") or "5GB"
    parse_size(size, o.at("maxShardSize"))
    e = ExportSpec(merge=o.bool("merge", True), formats=tuple(fmts),
                   pooling=o.str("pooling", None, choices=POOLINGS), normalize=o.bool("normalize", True),
                   max_shard_size=size, tolerance=tol, evaluate=evaluate,
                   checkpoint=o.str("checkpoint", None), push=parse_push(o.get("push"), o.at("push")))
    if e.checkpoint is not None and (e.checkpoint != "final" and not re.fullmatch(r"checkpoint-[0-9]+", e.checkpoint)):
        raise SpecError(o.at("checkpoint"), f"must be 'final' or a checkpoint name like checkpoint-100, got {_show(e.checkpoint)}")
    o.done()
    return e



def _resources(o: _Obj) -> ResourcesSpec:
    r = ResourcesSpec(gpus=o.int("gpus", 1, lo=0, hi=64) or 0,
                      gpu_resource=_k8s_name(o, "gpuResource", _QUALIFIED, "resource name (e.g. nvidia.com/gpu)")
                      or "nvidia.com/gpu",
                      cpu=_quantity(o, "cpu", "4"), memory=_quantity(o, "memory", "16Gi"))
    o.done()
    return r


def _storage(o: _Obj, nodes: int) -> StorageSpec:
    claim = o.str("claimName", None)
    if claim is not None and not _DNS_LABEL.match(claim):
        raise SpecError(o.at("claimName"), f"not a PersistentVolumeClaim name: {_show(claim)}")
    s = StorageSpec(claim_name=claim, size=_quantity(o, "size", "20Gi"),
                    storage_class_name=_k8s_name(o, "storageClassName", _DNS_SUBDOMAIN, "StorageClass name"),
                    reclaim_policy=o.str("reclaimPolicy", "Retain", choices=RECLAIM_POLICIES) or "Retain",
                    access_modes=parse_access_modes(o.get("accessModes"), o.at("accessModes"), nodes))
    o.done()
    return s


def parse_spec(spec: Any, path: str = "spec") -> FineTuneSpec:
    """Validate a FineTuneJob `spec` and fill defaults. Raises SpecError naming the field."""
    o = _Obj(spec, path)
    training = parse_training(o.sub("training"))
    lora_path = o.at("lora")
    tolerations = _tolerations(o, "tolerations")
    node_selector = _node_selector(o, "nodeSelector")
    queue = o.str("queueName", None)
    distributed = parse_distributed(o.sub("distributed"))
    if queue is not None and not _DNS_LABEL.match(queue):
        raise SpecError(o.at("queueName"), f"not a LocalQueue name: {_show(queue)}")
    s = FineTuneSpec(
        model=parse_model(o.sub("model")),
        dataset=parse_dataset(o.sub("dataset")),
        training=training,
        lora=parse_lora(o.get("lora"), lora_path),
        export=_export(o.sub("export")),
        resources=_resources(o.sub("resources")),
        image=_k8s_name(o, "image", _NO_SPACE, "container image reference", max_len=1024),
        node_selector=dict(node_selector),
        tolerations=tuple(tolerations),
        priority_class_name=_k8s_name(o, "priorityClassName", _DNS_SUBDOMAIN, "PriorityClass name"),
        queue_name=queue,
        storage=_storage(o.sub("storage"), distributed.nodes),
        backoff_limit=o.int("backoffLimit", 3, lo=0, hi=100) or 0,
        suspend=o.bool("suspend", False),
        ttl_seconds_after_finished=o.int("ttlSecondsAfterFinished", None, lo=0, hi=2**31 - 1),
        raw=dict(o.value),
        credentials=parse_credentials(o.sub("credentials")),
        distributed=distributed,
    )
    o.done()
    _cross_checks(s, path)
    return s


def _cross_checks(s: FineTuneSpec, path: str) -> None:
    inner = s.training.inner_loss
    required, optional = LOSS_COLUMNS[inner]
    for k in s.dataset.columns:
        if k not in (*required, *optional):
            raise SpecError(f"{path}.dataset.columns.{k}",
                            f"{inner} does not read a {_show(k)} column (reads: {', '.join((*required, *optional))})")
    if s.training.loss == "DenoisingAutoEncoderLoss" and s.lora is not None:
        raise SpecError(f"{path}.lora", "DenoisingAutoEncoderLoss trains a decoder tied to the encoder; use a full fine-tune (omit lora)")
    if "adapter" in s.export.formats and s.lora is None:
        raise SpecError(f"{path}.export.formats", "the 'adapter' format needs a LoRA fine-tune (spec.lora)")
    if s.training.precision == "fp16" and s.resources.gpus == 0:
        raise SpecError(f"{path}.training.precision", "fp16 training needs a GPU (resources.gpus >= 1); use fp32 or bf16 on CPU")
    check_distributed(s.distributed, gpus=s.resources.gpus, loss=s.training.loss, inner_loss=s.training.inner_loss,
                      access_modes=s.storage.access_modes, loss_params=s.training.loss_params, path=path)



def load_config(text: str) -> tuple[dict[str, Any], FineTuneSpec]:
    """Parse a config file's text: a whole FineTuneJob or just its spec, YAML or JSON.

    Returns (metadata, spec). metadata is {} when the text held only a spec.
    """
    try:  # JSON first (what the operator passes): YAML 1.1 reads JSON's 5e-05 as the string "5e-05"
        doc = json.loads(text)
    except ValueError:
        try:
            doc = yaml_load(text)
        except yaml.YAMLError as e:
            raise SpecError("config", f"neither YAML nor JSON: {e}") from None
    if not isinstance(doc, dict):
        raise SpecError("config", f"must be a FineTuneJob or its spec (an object), got {_kind(doc)}")
    if "kind" in doc or "apiVersion" in doc or "spec" in doc:
        if doc.get("kind", KIND) != KIND:
            raise SpecError("kind", f"expected {KIND}, got {_show(doc.get('kind'))}")
        if doc.get("apiVersion", API_VERSION) != API_VERSION:
            raise SpecError("apiVersion", f"expected {API_VERSION}, got {_show(doc.get('apiVersion'))}")
        meta = doc.get("metadata") or {}
        if not isinstance(meta, dict):
            raise SpecError("metadata", "must be an object")
        return meta, parse_spec(doc.get("spec"), "spec")
    return {}, parse_spec(doc, "spec")
