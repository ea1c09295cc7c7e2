"""Hostile input: path traversal, absurd sizes, huge or deep values, unicode and control
characters. Each is refused with a message naming the field, and nothing runs: the parser
raises SpecError, reconcile fails the job without creating a pod, the worker exits 2 having
written nothing to its workspace.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.spec import MAX_INLINE_RECORDS, SpecError, load_config, parse_spec
from finetune_operator.decisions.observe import Observed
from finetune_operator.decisions.reconcile import Settings, reconcile

OK = {"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}, "resources": {"gpus": 0}}
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
REPO = Path(__file__).resolve().parents[2]


def with_(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of base (default OK) with the dotted path set to value."""
    spec = copy.deepcopy(OK if base is None else base)
    keys = path.split(".")
    cur = spec
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    if path in ("dataset.path", "dataset.hub"):
        spec["dataset"].pop("inline", None)
    return spec


def rejected(spec: Any) -> SpecError:
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    return e.value


TRAVERSALS = ["../x", "../../etc/passwd", "data/../../outside.jsonl", "a/b/../../../c", "..", "..\\..\\x",
              "./../x", "~/x", "~root/.ssh/id_rsa", "x\x00/y", "data/\n../x"]  # fmt: skip
PATH_FIELDS = ["model.base", "dataset.path", "dataset.eval.path", "export.checkpoint"]


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("value", TRAVERSALS)
def test_path_traversal_in_every_path_field_is_refused_naming_the_field(field: str, value: str) -> None:
    err = rejected(with_(field, value))
    assert err.field == "spec." + field, err
    assert "\x00" not in str(err) and "\n" not in str(err)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("training.epochs", 10**9), ("training.batchSize", 10**7), ("training.maxSteps", 10**12),
        ("training.maxSeqLength", 10**9), ("training.learningRate", 1e6), ("training.warmupRatio", 7),
        ("training.seed", -1), ("training.checkpoint.keep", 10**6), ("training.checkpoint.everySteps", 0),
        ("lora.r", 10**6), ("lora.alpha", 10**9), ("lora.dropout", 1.0), ("resources.gpus", 10**4),
        ("backoffLimit", 10**6), ("ttlSecondsAfterFinished", 10**30), ("export.verify.tolerance", 1e9),
        ("export.maxShardSize", "0.0000001B"), ("export.maxShardSize", "9" * 300 + "TB"),
        ("resources.memory", "-16Gi"), ("storage.size", "1e9999"),
    ],
)  # fmt: skip
def test_absurd_sizes_are_refused_naming_the_field(field: str, value: Any) -> None:
    err = rejected(with_(field, value))
    assert err.field == "spec." + field, err
    assert len(str(err)) < 400


NUMBER_FIELDS = ["training.epochs", "training.maxSteps", "training.batchSize", "training.learningRate",
                 "training.warmupRatio", "training.seed", "training.maxSeqLength", "training.checkpoint.everySteps",
                 "training.checkpoint.keep", "lora.r", "lora.alpha", "lora.dropout", "resources.gpus",
                 "backoffLimit", "ttlSecondsAfterFinished", "export.verify.tolerance", "export.evaluate.min",
                 "dataset.eval.fraction"]  # fmt: skip


@pytest.mark.parametrize("field", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [10**400, -(10**400), float("inf"), float("nan")])
def test_unbounded_yaml_numbers_are_refused_not_crashing(field: str, value: Any) -> None:
    """Regression: float(10**400) raised OverflowError out of parse_spec (found by the fuzzer)."""
    err = rejected(with_(field, value))
    assert err.field == "spec." + field, err
    assert len(err.message) < 200, err.message


STRING_FIELDS = ["model.base", "model.revision", "dataset.path", "dataset.hub", "dataset.split", "dataset.eval.path",
                 "training.loss", "training.precision", "export.pooling", "export.maxShardSize", "export.checkpoint",
                 "export.evaluate.metric", "resources.gpuResource", "resources.cpu", "resources.memory", "image",
                 "priorityClassName", "queueName", "storage.claimName", "storage.storageClassName", "storage.size",
                 "storage.reclaimPolicy", "model.fromJob"]  # fmt: skip


@pytest.mark.parametrize("field", STRING_FIELDS)
def test_megabyte_strings_are_refused_with_a_short_message(field: str) -> None:
    spec = with_(field, "x" * 1_000_000)
    if field == "model.fromJob":
        spec["model"].pop("base", None)
    err = rejected(spec)
    assert err.field == "spec." + field, err
    assert len(str(err)) < 400


@pytest.mark.parametrize("field", STRING_FIELDS)
@pytest.mark.parametrize("value", ["name\x00", "line\nbreak", "esc\x1b[31m", "\t"])
def test_control_characters_are_refused_in_every_string_field(field: str, value: str) -> None:
    spec = with_(field, value)
    if field == "model.fromJob":
        spec["model"].pop("base", None)
    err = rejected(spec)
    assert err.field == "spec." + field, err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model.fromJob", "jöb"), ("queueName", "Team-A"), ("storage.claimName", "ws/../x"),
        ("priorityClassName", "höch"), ("storage.storageClassName", "fast ssd"),
        ("resources.gpuResource", "nvidia.com/gpu 1"), ("resources.gpuResource", "🤖"), ("image", "worker:1 --privileged"),
        ("dataset.hub", "org/../x"), ("dataset.hub", "组织/数据"), ("model.base", "builtin:all-MiniLM-L6-v2\u202e"),
        ("export.checkpoint", "checkpoint-\uff11\uff12"), ("training.loss", "MultipleNegativesRankingLoss\u200b"),
    ],
)  # fmt: skip
def test_unicode_look_alikes_in_names_are_refused(field: str, value: str) -> None:
    spec = with_(field, value)
    if field == "model.fromJob":
        spec["model"].pop("base", None)
    err = rejected(spec)
    assert err.field == "spec." + field, err


def test_unicode_where_text_belongs_is_accepted() -> None:
    s = parse_spec(with_("dataset.inline", [{"anchor": "日本語の質問 🤖", "positive": "réponse"}]))
    assert s.dataset.inline is not None and s.dataset.inline[0]["anchor"].startswith("日本語")
    s = parse_spec(with_("dataset.columns", {"anchor": "質問", "positive": "答え"}))
    assert s.dataset.columns["anchor"] == "質問"


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("nodeSelector", {"pool name": "gpu"}, "spec.nodeSelector.pool name"),
        ("nodeSelector", {"pool": "a" * 64}, "spec.nodeSelector.pool"),
        ("nodeSelector", {"pool": "x\ny"}, "spec.nodeSelector.pool"),
        ("tolerations", [{"key": "gpu", "effect": {"deep": 1}}], "spec.tolerations[0].effect"),
        ("tolerations", [{"key": "gpu", "privileged": True}], "spec.tolerations[0].privileged"),
        ("lora.targetModules", ["query key"], "spec.lora.targetModules"),
        ("lora.targetModules", ["q\x00"], "spec.lora.targetModules"),
    ],
)
def test_pod_fragments_are_checked_before_they_reach_a_pod(field: str, value: Any, where: str) -> None:
    assert rejected(with_(field, value)).field == where


def test_inline_datasets_over_the_cap_are_refused() -> None:
    rec = {"anchor": "a", "positive": "b"}
    err = rejected(with_("dataset.inline", [rec] * (MAX_INLINE_RECORDS + 1)))
    assert err.field == "spec.dataset.inline" and "file" in err.message
    err = rejected(with_("dataset.eval", {"inline": [rec] * (MAX_INLINE_RECORDS + 1)}))
    assert err.field == "spec.dataset.eval.inline"


def test_deeply_nested_records_are_refused() -> None:
    """Regression: a 3000-deep record passed parse_spec, then reconcile died with RecursionError."""
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(3000):
        cur["a"] = {}
        cur = cur["a"]
    err = rejected(with_("dataset.inline", [{"anchor": "a", "positive": deep}]))
    assert err.field == "spec.dataset.inline[0].positive"
    plan = reconcile(job(with_("dataset.inline", [{"anchor": "a", "positive": deep}])), Observed(), T0, Settings())
    assert plan.create == [] and plan.status is not None and plan.status["phase"] == "Failed"
    assert "spec.dataset.inline[0].positive" in plan.status["message"]


def test_yaml_alias_bombs_are_refused_quickly() -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        levels.append(f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    anchors = "\n".join("  " + line for line in levels)
    text = f"x-anchors:\n{anchors}\ndataset:\n  inline:\n    - {{anchor: q, positive: *i}}\n"
    with pytest.raises(SpecError) as e:
        load_config(text)
    assert e.value.field in ("spec.x-anchors", "spec.dataset.inline[0].positive")


def job(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "evil", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": spec, "status": status or {}}  # fmt: skip


def test_a_huge_inline_dataset_fails_the_job_without_creating_a_pod() -> None:
    spec = with_("dataset.inline", [{"anchor": "q" * 2000, "positive": "a" * 2000}] * 60)
    plan = reconcile(job(spec), Observed(), T0, Settings())
    assert plan.create == []
    assert plan.status is not None and plan.status["phase"] == "Failed"
    assert "spec.dataset.inline" in plan.status["message"] and plan.permanent_error


@pytest.mark.parametrize("value", ["../../etc", "x" * 100_000])
def test_a_hostile_spec_fails_the_job_naming_the_field_and_creates_nothing(value: str) -> None:
    plan = reconcile(job(with_("dataset.path", value)), Observed(), T0, Settings())
    assert plan.create == [] and plan.status is not None
    assert plan.status["phase"] == "Failed" and "spec.dataset.path" in plan.status["message"]
    assert len(plan.status["message"]) < 1000


def test_a_huge_ttl_edited_after_the_job_finished_does_not_crash_reconcile() -> None:
    """Regression: reconcile read spec.ttlSecondsAfterFinished raw for a finished job, and
    timedelta(seconds=10**30) raised OverflowError on every pass."""
    status = {"phase": "Succeeded", "completionTime": "2026-01-01T11:00:00Z", "observedGeneration": 1}
    plan = reconcile(job(with_("ttlSecondsAfterFinished", 10**30), status), Observed(), T0, Settings())
    assert not plan.delete_job and plan.requeue_after is not None


# ----------------------------------------------------------------------------- the worker CLI


def run_worker(tmp_path: Path, config: str, command: str = "train") -> tuple[int, dict[str, Any], Path]:
    ws = tmp_path / "ws"
    ws.mkdir()
    cfg = tmp_path / "job.yaml"
    cfg.write_text(config, encoding="utf-8")
    log = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(log), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "finetune_worker.cli", command, "--config", str(cfg),
                           "--workspace", str(ws)], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    summary = json.loads(log.read_text()) if log.exists() else {}
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, summary, ws


@pytest.mark.parametrize(
    ("command", "patch", "field"),
    [
        ("train", ("dataset.path", "../../../etc/passwd"), "spec.dataset.path"),
        ("train", ("model.base", "models/../../../root"), "spec.model.base"),
        ("export", ("export.checkpoint", "checkpoint-1/../../../x"), "spec.export.checkpoint"),
        ("train", ("training.epochs", 10**400), "spec.training.epochs"),
    ],
)
def test_the_worker_refuses_hostile_configs_with_exit_2_and_writes_nothing(
    tmp_path: Path, command: str, patch: tuple[str, Any], field: str
) -> None:
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "evil"},
           "spec": with_(*patch)}  # fmt: skip
    code, summary, ws = run_worker(tmp_path, yaml.safe_dump(doc), command)
    assert code == 2
    assert summary["result"] == "invalid" and field in summary["message"]
    assert list(ws.iterdir()) == []
