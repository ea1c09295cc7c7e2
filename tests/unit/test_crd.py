"""The FineTuneJob CRD: samples are admitted, bad objects refused (by the schema and by the parser),
defaults agree with spec.py, training-defining fields are immutable, `kubectl explain` has text."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import pytest
from crdkit import admit, cel_errors, cel_rules, crd, refusals, samples, schema, version

from finetune_api.contract import GROUP, KIND, PLURAL, VERSION
from finetune_api.spec import FineTuneSpec, SpecError, parse_spec

SAMPLES = samples()
LORA = SAMPLES["finetune_v1alpha1_finetunejob_lora.yaml"]


def test_names_scope_and_subresources() -> None:
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"]) == (GROUP, KIND, PLURAL)
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["scope"] == "Namespaced"
    assert version()["name"] == VERSION
    assert version()["subresources"] == {"status": {}}


def test_printer_columns_point_at_fields_the_schema_declares() -> None:
    cols = {c["name"]: c["jsonPath"] for c in version()["additionalPrinterColumns"]}
    assert list(cols)[:5] == ["Phase", "Progress", "Checkpoint", "Restarts", "Age"]
    assert cols["Progress"] == ".status.progress.percent"
    assert cols["Checkpoint"] == ".status.checkpoint.name"
    for name, path in cols.items():
        if path.startswith(".metadata."):
            continue
        node = schema()
        for part in path.strip(".").split("."):
            assert part in node.get("properties", {}), f"column {name}: {path} is not in the schema"
            node = node["properties"][part]


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for k, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{k}")
    for k in ("items", "additionalProperties"):
        if isinstance(node.get(k), dict):
            out += _walk(node[k], f"{path}[]")
    return out


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    nodes = [(p, n) for top in ("spec", "status") for p, n in _walk(schema()["properties"][top], top)]
    missing = [p for p, n in nodes if not n.get("description") and not p.endswith("[]")]
    assert len(nodes) > 100
    assert missing == []


def test_schema_is_structural() -> None:
    """Every node has a type (or int-or-string / preserve-unknown), as a v1 CRD requires."""
    untyped = [p for p, n in _walk(schema(), "") if "type" not in n and not n.get("x-kubernetes-int-or-string")
               and not n.get("x-kubernetes-preserve-unknown-fields")]  # fmt: skip
    assert untyped == []


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_is_admitted_and_parses(name: str) -> None:
    obj = SAMPLES[name]
    assert obj["apiVersion"] == f"{GROUP}/{VERSION}" and obj["kind"] == KIND
    assert refusals(obj) == []
    parse_spec(obj["spec"])


def _without_raw(s: FineTuneSpec) -> FineTuneSpec:
    return dataclasses.replace(s, raw={})


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_schema_defaults_equal_the_parser_defaults(name: str) -> None:
    """The object as the API server stores it (defaults filled) means what the object as written means."""
    obj = SAMPLES[name]
    stored = admit(obj)
    assert stored["spec"] != obj["spec"], "the schema filled no defaults at all"
    assert _without_raw(parse_spec(stored["spec"])) == _without_raw(parse_spec(obj["spec"]))


_SPECIAL = {("export", "tolerance"): ("export", "verify", "tolerance")}
_CONDITIONAL = {("model", "base"),  # defaults to the builtin model only when fromJob is unset
                ("storage", "accessModes")}  # ReadWriteOnce for one node, ReadWriteMany for several


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def _parsed_defaults(value: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if dataclasses.is_dataclass(value):
        return [d for f in dataclasses.fields(value) if f.name != "raw"
                for d in _parsed_defaults(getattr(value, f.name), (*path, _camel(f.name)))]  # fmt: skip
    if value is None or value in ({}, ()):
        return []
    return [(_SPECIAL.get(path, path), value)]


def test_every_parser_default_is_a_schema_default() -> None:
    """With every optional section present but empty, the stored object carries each default explicitly
    (GitOps tools then see no drift), equal to the parser's value."""
    minimal = {"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}, "lora": {},
               "training": {"checkpoint": {}}, "export": {"evaluate": {}, "verify": {}}}  # fmt: skip
    stored = admit({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"}, "spec": minimal})
    parsed = parse_spec(minimal)
    checked = 0
    for path, want in _parsed_defaults(parsed, ()):
        if path in _CONDITIONAL or path[:2] == ("dataset", "inline"):
            continue
        node: Any = stored["spec"]
        for part in path:
            assert isinstance(node, dict) and part in node, f"spec.{'.'.join(path)} has no schema default (parser: {want!r})"
            node = node[part]
        got = tuple(node) if isinstance(node, list) else node
        assert got == want, f"spec.{'.'.join(path)}: schema default {node!r}, parser default {want!r}"
        checked += 1
    assert checked >= 25


def _job(**spec_changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(LORA)
    for dotted, value in spec_changes.items():
        node = obj["spec"]
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return obj


_DELETE = object()
PAIRS = [{"anchor": "q", "positive": "a"}]

# (what, spec changes, the parser's error field)
BAD = [
    ("unknown loss (enum)", {"training__loss": "TripletLoss"}, "spec.training.loss"),
    ("negative batch size", {"training__batchSize": -1}, "spec.training.batchSize"),
    ("zero learning rate", {"training__learningRate": 0}, "spec.training.learningRate"),
    ("warmup ratio above 1", {"training__warmupRatio": 1.5}, "spec.training.warmupRatio"),
    ("negative seed", {"training__seed": -1}, "spec.training.seed"),
    ("unknown precision", {"training__precision": "fp8"}, "spec.training.precision"),
    ("checkpoint every 0 steps", {"training__checkpoint": {"everySteps": 0}}, "spec.training.checkpoint.everySteps"),
    ("typo in a training field (closed schema)", {"training__epoch": 2}, "spec.training.epoch"),
    ("unknown top-level spec field", {"gpus": 1}, "spec.gpus"),
    ("unknown loss parameter", {"training__lossParams": {"temperature": 0.05}}, "spec.training.lossParams.temperature"),
    ("two dataset sources", {"dataset__path": "data/train.jsonl"}, "spec.dataset"),
    ("no dataset source", {"dataset__inline": _DELETE}, "spec.dataset"),
    ("empty inline dataset", {"dataset__inline": []}, "spec.dataset.inline"),
    ("two eval sources", {"dataset__eval": {"fraction": 0.1, "path": "data/eval.jsonl"}}, "spec.dataset.eval"),
    ("eval fraction of 1", {"dataset__eval": {"fraction": 1.0}}, "spec.dataset.eval.fraction"),
    ("unknown model-side column", {"dataset__columns": {"query": "q"}}, "spec.dataset.columns.query"),
    ("model base and fromJob", {"model__fromJob": "other-job"}, "spec.model.fromJob"),
    ("fromJob not a name", {"model": {"fromJob": "Not_A_Name"}}, "spec.model.fromJob"),
    ("model path escaping the workspace", {"model__base": "models/../../etc"}, "spec.model.base"),
    ("unknown builtin model", {"model__base": "builtin:bert-base-uncased"}, "spec.model.base"),
    ("dataset path escaping the workspace", {"dataset": {"path": "..\\secrets\\train.jsonl"}}, "spec.dataset.path"),
    ("eval path in a home directory", {"dataset__eval": {"path": "~/eval.jsonl"}}, "spec.dataset.eval.path"),
    ("LoRA rank 0", {"lora__r": 0}, "spec.lora.r"),
    ("LoRA dropout 1", {"lora__dropout": 1.0}, "spec.lora.dropout"),
    ("unknown export format", {"export__formats": ["onnx"]}, "spec.export.formats[0]"),
    ("export format twice", {"export__formats": ["adapter", "adapter"]}, "spec.export.formats"),
    ("unknown pooling", {"export__pooling": "attention"}, "spec.export.pooling"),
    ("not a shard size", {"export__maxShardSize": "big"}, "spec.export.maxShardSize"),
    ("export of a bad checkpoint name", {"export__checkpoint": "ckpt-1"}, "spec.export.checkpoint"),
    ("unknown eval metric", {"export__evaluate": {"metric": "bleu"}}, "spec.export.evaluate.metric"),
    ("negative GPUs", {"resources__gpus": -1}, "spec.resources.gpus"),
    ("memory not a quantity", {"resources__memory": "lots"}, "spec.resources.memory"),
    ("unknown reclaim policy", {"storage__reclaimPolicy": "Keep"}, "spec.storage.reclaimPolicy"),
    ("claim not a name", {"storage__claimName": "My_Claim"}, "spec.storage.claimName"),
    ("queue not a name", {"queueName": "Bad_Queue"}, "spec.queueName"),
    ("backoff limit above 100", {"backoffLimit": 101}, "spec.backoffLimit"),
    ("negative TTL", {"ttlSecondsAfterFinished": -5}, "spec.ttlSecondsAfterFinished"),
    ("suspend not a boolean", {"suspend": "yes"}, "spec.suspend"),
    ("checkpoint every 10**10 steps", {"training__checkpoint": {"everySteps": 10**10}}, "spec.training.checkpoint.everySteps"),
    ("TTL beyond int32", {"ttlSecondsAfterFinished": 2**31}, "spec.ttlSecondsAfterFinished"),
    ("GPU resource with a space", {"resources__gpuResource": "nvidia gpu"}, "spec.resources.gpuResource"),
    ("image with a newline", {"image": "worker:dev\nrm -rf /"}, "spec.image"),
    ("priority class not a name", {"priorityClassName": "High_Priority"}, "spec.priorityClassName"),
    ("storage class not a name", {"storage__storageClassName": "Fast SSD"}, "spec.storage.storageClassName"),
    ("node label value with a slash", {"nodeSelector": {"pool": "gpu/a100"}}, "spec.nodeSelector.pool"),
    ("push target escaping its prefix", {"export__push": ["s3://exports/a/../b/"]}, "spec.export.push[0]"),
    ("push target without a tag", {"export__push": ["oci://registry.example.com/team/faq"]}, "spec.export.push[0]"),
    ("secret name not a name", {"credentials": {"s3": {"secretName": "S3_Creds"}}}, "spec.credentials.s3.secretName"),
    ("s3 endpoint without a scheme", {"credentials": {"s3": {"endpoint": "minio:9000"}}}, "spec.credentials.s3.endpoint"),
    # Cross-field rules: CEL in the CRD, _cross_checks in the parser.
    ("TSDAE with LoRA", {"training__loss": "DenoisingAutoEncoderLoss", "dataset__inline": [{"text": "t"}]}, "spec.lora"),
    ("adapter export of a full fine-tune", {"lora": _DELETE}, "spec.export.formats"),
    ("fp16 on CPU", {"training__precision": "fp16"}, "spec.training.precision"),
    ("Matryoshka without dimensions", {"training__loss": "MatryoshkaLoss"}, "spec.training.lossParams.matryoshkaDims"),
    ("Matryoshka weights per dimension", {"training__loss": "MatryoshkaLoss",
                                          "training__lossParams": {"matryoshkaDims": [64, 32], "matryoshkaWeights": [1]}},
     "spec.training.lossParams.matryoshkaWeights"),
    ("unknown Matryoshka inner loss", {"training__loss": "MatryoshkaLoss",
                                       "training__lossParams": {"matryoshkaDims": [64], "innerLoss": "TripletLoss"}},
     "spec.training.lossParams.innerLoss"),
    # spec.distributed and storage.accessModes
    ("zero nodes", {"distributed": {"nodes": 0}}, "spec.distributed.nodes"),
    ("procsPerNode neither auto nor a number", {"distributed": {"procsPerNode": "many"}}, "spec.distributed.procsPerNode"),
    ("procsPerNode 0", {"distributed": {"procsPerNode": 0}}, "spec.distributed.procsPerNode"),
    ("unknown backend", {"distributed": {"backend": "mpi"}}, "spec.distributed.backend"),
    ("unknown access mode", {"storage__accessModes": ["RWX"]}, "spec.storage.accessModes[0]"),
    ("read-only workspace", {"storage__accessModes": ["ReadOnlyMany"]}, "spec.storage.accessModes"),
    ("two nodes on a ReadWriteOnce workspace", {"distributed": {"nodes": 2}, "storage__accessModes": ["ReadWriteOnce"]},
     "spec.storage.accessModes"),
    ("nccl on CPU", {"distributed": {"backend": "nccl"}, "resources__gpus": 0}, "spec.distributed.backend"),
    ("more processes than GPUs", {"distributed": {"procsPerNode": 4}, "resources__gpus": 2}, "spec.distributed.procsPerNode"),
    ("TSDAE on two processes", {"training__loss": "DenoisingAutoEncoderLoss", "dataset__inline": [{"text": "t"}],
                                "lora": _DELETE, "export__formats": ["sentence-transformers"],
                                "distributed": {"procsPerNode": 2}, "resources__gpus": 0}, "spec.training.loss"),
    ("cached MNRL on two nodes", {"training__loss": "CachedMultipleNegativesRankingLoss", "distributed": {"nodes": 2}},
     "spec.training.loss"),
    ("cached MNRL inside Matryoshka on two GPUs", {"training__loss": "MatryoshkaLoss", "resources__gpus": 2,
                                                  "training__lossParams": {"matryoshkaDims": [64],
                                                                           "innerLoss": "CachedMultipleNegativesRankingLoss"}},
     "spec.training.loss"),
    ("gather for a loss without in-batch negatives", {"training__loss": "CoSENTLoss",
                                                      "training__lossParams": {"gatherAcrossDevices": True}},
     "spec.training.lossParams.gatherAcrossDevices"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "changes", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_object_is_refused_by_the_api_server_and_by_the_operator(what: str, changes: dict[str, Any], field: str) -> None:
    obj = _job(**changes)
    assert refusals(obj), f"the CRD admits: {what}"
    with pytest.raises(SpecError) as err:
        parse_spec(obj["spec"])
    assert err.value.field == field, str(err.value)


def test_the_lora_sample_itself_passes_the_rules_the_bad_objects_break() -> None:
    """The table above is meaningful only if the unchanged base object is admitted."""
    assert refusals(_job()) == []
    parse_spec(_job()["spec"])


# (what, spec changes on update, refused?)
UPDATES = [
    ("change epochs", {"training__epochs": 3}, True),
    ("change the base model", {"model__base": "BAAI/bge-small-en-v1.5"}, True),
    ("change the data", {"dataset__inline": PAIRS}, True),
    ("change the LoRA rank", {"lora__r": 16}, True),
    ("remove lora", {"lora": _DELETE, "export__formats": ["sentence-transformers"]}, True),
    ("change the claim", {"storage__claimName": "other"}, True),
    ("scale out", {"distributed": {"nodes": 2}}, True),
    ("change the access modes", {"storage__accessModes": ["ReadWriteMany"]}, True),
    ("suspend", {"suspend": True}, False),
    ("raise backoffLimit", {"backoffLimit": 10}, False),
    ("set a TTL", {"ttlSecondsAfterFinished": 60}, False),
    ("change export formats", {"export__formats": ["huggingface"]}, False),
    ("move to other nodes", {"nodeSelector": {"pool": "gpu"}}, False),
]


@pytest.mark.parametrize(("what", "changes", "refused"), UPDATES, ids=[u[0] for u in UPDATES])
def test_training_defining_fields_are_immutable(what: str, changes: dict[str, Any], refused: bool) -> None:
    old = _job()
    new = _job(**changes)
    assert refusals(new) == [], "the new object must be valid on its own"
    errors = refusals(new, old=old)
    assert bool(errors) == refused, errors
    if refused:
        assert re.search(r"immutable|cannot be added or removed", " ".join(errors))


def test_adding_lora_after_creation_is_refused() -> None:
    old = _job(lora=_DELETE, export__formats=["sentence-transformers"])
    new = _job(export__formats=["sentence-transformers"])
    assert refusals(old) == [] and refusals(new) == []
    assert any("cannot be added or removed" in e for e in refusals(new, old=old))


def test_every_cel_rule_is_exercised() -> None:
    """Each rule compiles under cel-python and is broken by some object above: every create-time rule
    by a BAD object, every transition rule (oldSelf) by an UPDATE."""
    rules = cel_rules()
    assert len(rules) >= 10
    broken = {m for _, changes, _ in BAD for m in cel_errors(admit(_job(**changes)))}
    broken |= {m for _, changes, _ in UPDATES for m in cel_errors(admit(_job(**changes)), admit(_job()))}
    old = admit(_job(lora=_DELETE, export__formats=["sentence-transformers"]))
    broken |= set(cel_errors(admit(_job(export__formats=["sentence-transformers"])), old))
    unexercised = [(path or "<root>", rule) for path, rule, message in rules if message not in broken]
    assert unexercised == []


def test_enums_are_the_parsers_choices() -> None:
    """A value the parser accepts is never refused by the API server, and the reverse."""
    from finetune_api import spec as sp
    from finetune_api.contract import EXPORT_FORMATS

    s = schema()["properties"]["spec"]["properties"]
    t = s["training"]["properties"]
    e = s["export"]["properties"]
    assert tuple(t["loss"]["enum"]) == sp.LOSSES
    assert tuple(t["lossParams"]["properties"]["innerLoss"]["enum"]) == sp.INNER_LOSSES
    assert tuple(t["precision"]["enum"]) == sp.PRECISIONS
    assert tuple(e["formats"]["items"]["enum"]) == EXPORT_FORMATS
    assert tuple(e["pooling"]["enum"]) == sp.POOLINGS
    assert tuple(e["evaluate"]["properties"]["metric"]["enum"]) == sp.EVAL_METRICS
    assert tuple(s["storage"]["properties"]["reclaimPolicy"]["enum"]) == sp.RECLAIM_POLICIES
    columns = {c for req, opt in sp.LOSS_COLUMNS.values() for c in (*req, *opt)}
    assert set(s["dataset"]["properties"]["columns"]["properties"]) == columns
    assert s["dataset"]["properties"]["inline"]["maxItems"] == sp.MAX_INLINE_RECORDS
