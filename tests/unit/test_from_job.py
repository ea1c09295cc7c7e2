"""spec.model.fromJob: the decisions reconcile takes from the source job (wait, fail, mount), the
pods it builds (the source's export mounted read-only, named by FINETUNE_SOURCE_EXPORT), and the
handler's read."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from test_reconcile import apply

from finetune_api.spec import parse_spec
from finetune_operator.cluster import handlers
from finetune_operator.cluster.informer import Informer
from finetune_operator.decisions.builders import JOBS_ROOT, SourceWorkspace, build_pod
from finetune_operator.decisions.observe import Observed, PodObservation
from finetune_operator.decisions.reconcile import Plan, Settings, reconcile
from finetune_operator.decisions.status import get_condition

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SETTINGS = Settings(worker_image="worker:test", pending_interval=10, progress_interval=5)
MOUNT = f"{JOBS_ROOT}/prev/export"


def job(name: str = "next", spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    base = {"model": {"fromJob": "prev"}, "dataset": {"inline": [{"question": "q", "answer": "a"}]},
            "resources": {"gpus": 0}, "backoffLimit": 1}  # fmt: skip
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "ml", "uid": f"u-{name}", "generation": 1},
            "spec": {**base, **(spec or {})}, "status": status or {}}  # fmt: skip


def source(phase: str | None, spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    src = job("prev", {"model": {}, **(spec or {})})
    src["status"] = {"phase": phase, **status} if phase else {}
    return src


SUCCEEDED = source("Succeeded", reason="Exported",
                   export={"path": "/workspace/export", "formats": ["sentence-transformers"]})  # fmt: skip


def step(j: dict[str, Any], src: dict[str, Any] | None, pods: tuple[PodObservation, ...] = (),
         claim: bool = False, now: dt.datetime = T0) -> tuple[dict[str, Any], Plan]:  # fmt: skip
    plan = reconcile(j, Observed(pods=pods, claim_exists=claim, source_job=src), now, SETTINGS)
    return apply(j, plan), plan


def events(plan: Plan) -> list[tuple[str, str]]:
    return [(e["type"], e["reason"]) for e in plan.events]


def mounts_and_env(pod: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    c = pod["spec"]["containers"][0]
    return c["volumeMounts"], {e["name"]: e["value"] for e in c["env"]}


@pytest.mark.parametrize(("src", "said"), [
    (None, "it does not exist in namespace ml"),
    (source(None), "it is not started"),
    (source("Training", reason="Training"), "it is Training (Training)"),
    (source("Pending", reason="WaitingForSourceJob"), "it is Pending (WaitingForSourceJob)"),  # a chain
])  # fmt: skip
def test_a_missing_or_unfinished_source_is_waited_for_without_creating_anything(
    src: dict[str, Any] | None, said: str
) -> None:
    j, plan = step(job(), src)
    st = j["status"]
    assert plan.create == [] and st["phase"] == "Pending" and st["reason"] == "WaitingForSourceJob"
    assert st["message"].startswith("waiting for FineTuneJob prev (spec.model.fromJob)") and said in st["message"]
    assert get_condition(st, "Succeeded")["reason"] == "NotStarted" and get_condition(st, "Failed")["status"] == "False"
    assert plan.requeue_after == SETTINGS.pending_interval and plan.permanent_error is None
    assert events(plan) == [("Normal", "WaitingForSourceJob")]
    _, again = step(j, src, now=T0 + dt.timedelta(seconds=10))  # the timer looks again: nothing new
    assert again.status is None and again.events == [] and again.requeue_after == SETTINGS.pending_interval


def test_a_job_that_was_waiting_starts_once_the_source_succeeded_with_its_export_mounted() -> None:
    j, _ = step(job(), source("Training", reason="Training"))
    j, plan = step(j, SUCCEEDED)
    assert [(o["kind"], o["metadata"]["name"]) for o in plan.create] == [
        ("PersistentVolumeClaim", "next-workspace"), ("Pod", "next-train-1")]  # fmt: skip
    assert j["status"]["reason"] == "PodStarting" and ("Normal", "Started") in events(plan)
    pod = plan.create[1]
    mounts, env = mounts_and_env(pod)
    assert {"name": "source-workspace", "mountPath": MOUNT, "subPath": "export", "readOnly": True} in mounts
    assert {"name": "workspace", "mountPath": "/workspace"} in mounts and env["FINETUNE_SOURCE_EXPORT"] == MOUNT
    assert pod["spec"]["volumes"] == [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": "next-workspace"}},
        {"name": "source-workspace", "persistentVolumeClaim": {"claimName": "prev-workspace", "readOnly": True}},
    ]


def test_the_source_claim_name_comes_from_the_source_spec() -> None:
    named = source("Succeeded", {"storage": {"claimName": "team-models"}},
                   export={"formats": ["sentence-transformers"]})  # fmt: skip
    _, plan = step(job(), named, claim=True)
    vols = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in plan.create[0]["spec"]["volumes"]}
    assert vols == {"workspace": "next-workspace", "source-workspace": "team-models"}


def test_a_failed_source_fails_the_job_with_its_reason() -> None:
    failed = source("Failed", reason="BackoffLimitExceeded", message="training failed 4 times")
    j, plan = step(job(), failed)
    st = j["status"]
    assert st["phase"] == "Failed" and st["reason"] == "SourceJobFailed" and plan.create == []
    assert st["message"] == "source job prev (spec.model.fromJob) failed (BackoffLimitExceeded): training failed 4 times"
    assert get_condition(st, "Failed")["status"] == "True" and st["completionTime"]
    assert events(plan) == [("Warning", "SourceJobFailed")]
    _, again = step(j, SUCCEEDED)  # terminal: a later success of the source does not revive it
    assert again.create == [] and again.status is None


@pytest.mark.parametrize("src", [
    source("Succeeded", {"export": {"formats": ["huggingface"]}}, export={"formats": ["huggingface"]}),
    source("Succeeded", {"export": {"formats": ["huggingface"]}}),  # no status.export: its spec says
])  # fmt: skip
def test_a_source_that_succeeded_without_a_sentence_transformers_export_fails_the_job(src: dict[str, Any]) -> None:
    j, plan = step(job(), src)
    st = j["status"]
    assert st["phase"] == "Failed" and st["reason"] == "SourceExportMissing" and plan.create == []
    assert "succeeded without a sentence-transformers export (it exported huggingface)" in st["message"]
    assert "add sentence-transformers to prev's spec.export.formats" in st["message"]
    assert events(plan) == [("Warning", "SourceExportMissing")]


def test_continuing_from_itself_or_sharing_the_source_claim_is_an_invalid_spec() -> None:
    j, plan = step(job("prev"), None)
    assert j["status"]["reason"] == "InvalidSpec" and "cannot continue from itself" in j["status"]["message"]
    shared = source("Training", {"storage": {"claimName": "shared"}})
    j, plan = step(job(spec={"storage": {"claimName": "shared"}}), shared, claim=True)
    assert j["status"]["reason"] == "InvalidSpec" and plan.create == [] and plan.permanent_error
    assert "spec.storage.claimName: shared is also the workspace of the source job prev" in j["status"]["message"]


def done_training() -> tuple[dict[str, Any], tuple[PodObservation, ...]]:
    j, _ = step(job(spec={"lora": {"r": 4}}), SUCCEEDED)
    done = PodObservation(name="next-train-1", role="train", attempt=1, phase="Succeeded",
                          result="completed", exit_code=0)  # fmt: skip
    return j, (done,)


def test_a_lora_export_mounts_the_source_training_started_from() -> None:
    j, pods = done_training()
    assert j["status"]["source"] == {"job": "prev", "claim": "prev-workspace"}
    _, plan = step(j, SUCCEEDED, pods, claim=True)
    mounts, env = mounts_and_env(plan.create[0])
    assert plan.create[0]["metadata"]["name"] == "next-export-1" and env["FINETUNE_SOURCE_EXPORT"] == MOUNT
    assert any(m["mountPath"] == MOUNT and m["readOnly"] for m in mounts)
    # the source job was deleted after training (its claim is retained by default) or re-created on
    # another claim: the export still merges onto the export training started from
    renamed = source("Succeeded", {"storage": {"claimName": "elsewhere"}}, export=SUCCEEDED["status"]["export"])
    for src in (None, source("Training", reason="Training"), renamed):
        _, plan = step(j, src, pods, claim=True)
        vols = plan.create[0]["spec"]["volumes"]
        assert {"name": "source-workspace", "persistentVolumeClaim": {"claimName": "prev-workspace", "readOnly": True}} in vols


def test_a_lora_export_without_a_recorded_source_waits_for_it_in_exporting() -> None:
    j, pods = done_training()
    del j["status"]["source"]  # trained by an operator that did not record it
    gone, plan = step(j, None, pods, claim=True)
    assert plan.create == [] and gone["status"]["phase"] == "Exporting"
    assert gone["status"]["reason"] == "WaitingForSourceJob" and ("Normal", "WaitingForSourceJob") in events(plan)


def test_a_full_fine_tune_exports_without_the_source() -> None:
    j, _ = step(job(), SUCCEEDED)
    done = PodObservation(name="next-train-1", role="train", attempt=1, phase="Succeeded",
                          result="completed", exit_code=0)  # fmt: skip
    _, plan = step(j, None, (done,), claim=True)
    mounts, env = mounts_and_env(plan.create[0])
    assert plan.create[0]["metadata"]["name"] == "next-export-1"
    assert "FINETUNE_SOURCE_EXPORT" not in env and [m["mountPath"] for m in mounts] == ["/workspace"]


def test_a_resumed_training_pod_starts_from_the_recorded_source() -> None:
    """Preempted after the source job was deleted or re-created elsewhere: the next training pod
    resumes on the model the first one started from, it does not wait or switch bases."""
    j, _ = step(job(spec={"lora": {"r": 4}}), SUCCEEDED)
    preempted = (PodObservation(name="next-train-1", role="train", attempt=1, phase="Failed",
                                result="preempted", exit_code=75),)  # fmt: skip
    moved = source("Succeeded", {"storage": {"claimName": "elsewhere"}}, export=SUCCEEDED["status"]["export"])
    for src in (None, moved):
        after, plan = step(j, src, preempted, claim=True)
        pods = [o for o in plan.create if o["kind"] == "Pod"]
        assert [p["metadata"]["name"] for p in pods] == ["next-train-2"], after["status"].get("message")
        assert {"name": "source-workspace", "persistentVolumeClaim": {"claimName": "prev-workspace", "readOnly": True}} \
            in pods[0]["spec"]["volumes"]
        assert after["status"]["source"] == {"job": "prev", "claim": "prev-workspace"}


def test_a_recorded_source_claim_that_is_gone_fails_the_job_with_the_reason() -> None:
    j, _ = step(job(spec={"lora": {"r": 4}}), SUCCEEDED)
    preempted = (PodObservation(name="next-train-1", role="train", attempt=1, phase="Failed",
                                result="preempted", exit_code=75),)  # fmt: skip
    plan = reconcile(j, Observed(pods=preempted, claim_exists=True, source_claim_exists=False), T0, SETTINGS)
    failed = apply(j, plan)
    assert [o for o in plan.create if o["kind"] == "Pod"] == [] and failed["status"]["phase"] == "Failed"
    assert failed["status"]["reason"] == "SourceExportMissing" and "prev-workspace" in failed["status"]["message"]
    for exists in (True, None):  # present, or not looked at (the local runner): the next pod starts
        plan = reconcile(j, Observed(pods=preempted, claim_exists=True, source_claim_exists=exists), T0, SETTINGS)
        assert [o["metadata"]["name"] for o in plan.create if o["kind"] == "Pod"] == ["next-train-2"]


def test_a_running_training_pod_is_left_alone_when_the_source_disappears() -> None:
    j, _ = step(job(), SUCCEEDED)
    running = (PodObservation(name="next-train-1", role="train", attempt=1, phase="Running"),)
    j, plan = step(j, None, running, claim=True)
    assert plan.delete == [] and plan.create == [] and j["status"]["phase"] == "Training"


def test_a_job_without_from_job_builds_the_pod_it_always_did() -> None:
    plain = job(spec={"model": {"base": "builtin:all-MiniLM-L6-v2"}})
    mounts, env = mounts_and_env(build_pod(plain, parse_spec(plain["spec"]), "train", 1))
    assert len(mounts) == 1 and "FINETUNE_SOURCE_EXPORT" not in env


def test_pods_with_a_source_mount_are_valid_kubernetes_and_keep_their_security_settings() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from test_manifests import K8S_VERSIONS

    j = job(spec={"lora": {"r": 4}})
    spec = parse_spec(j["spec"])
    src = SourceWorkspace(job="prev", claim="prev-workspace")
    for role in ("train", "export"):
        pod = build_pod(j, spec, role, 1, source=src)
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
        plain = build_pod(j, spec, role, 1)
        assert pod["spec"]["securityContext"] == plain["spec"]["securityContext"]
        assert pod["spec"]["containers"][0]["securityContext"] == plain["spec"]["containers"][0]["securityContext"]


class ReadingKube:
    """What observe() asks the API beyond the informer: only a claim the watch cannot show."""

    def __init__(self) -> None:
        self.gets: list[tuple[str, str, str]] = []

    async def get(self, api_version: str, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        self.gets.append((plural, ns, name))
        return None


def informer(jobs: dict[tuple[str, str], dict[str, Any]], claims: tuple[tuple[str, str], ...] = ()) -> Informer:
    return Informer(jobs={k: [v] for k, v in jobs.items()}, claims={k: [True] for k in claims})


def test_the_handler_reads_the_source_only_while_a_launch_may_need_it() -> None:
    recorded = job(status={"phase": "Training", "source": {"job": "prev", "claim": "prev-workspace"}})
    for j in (recorded, job(status={"phase": "Succeeded"})):
        kube = ReadingKube()
        observed = asyncio.run(handlers.observe(kube, informer({("ml", "prev"): SUCCEEDED}), j))  # type: ignore[arg-type]
        assert observed.source_job is None
    # with a recorded source it checks that source's claim instead: watched (labelled) ones from
    # the informer, without a request
    observed = asyncio.run(handlers.observe(ReadingKube(), informer({}), recorded))  # type: ignore[arg-type]
    assert observed.source_claim_exists is False
    kube = ReadingKube()
    observed = asyncio.run(handlers.observe(kube, informer({}, (("ml", "prev-workspace"),)), recorded))  # type: ignore[arg-type]
    assert observed.source_claim_exists is True and kube.gets == []


def test_the_handler_reads_the_source_job_from_the_same_namespace_in_the_informer() -> None:
    kube = ReadingKube()
    jobs = informer({("ml", "prev"): SUCCEEDED, ("other", "prev"): source("Failed")})
    observed = asyncio.run(handlers.observe(kube, jobs, job()))  # type: ignore[arg-type]
    assert observed.source_job == SUCCEEDED and not any(g[0] == "finetunejobs" for g in kube.gets)
    observed = asyncio.run(handlers.observe(kube, jobs, job(spec={"model": {"base": "x/y"}})))  # type: ignore[arg-type]
    assert observed.source_job is None


def test_the_recorded_source_is_declared_in_the_crd_status_schema() -> None:
    """A real API server prunes status fields its schema does not declare."""
    from pathlib import Path

    import yaml

    crd = yaml.safe_load((Path(__file__).parents[2] / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    j, _ = done_training()
    assert set(j["status"]) <= set(props), set(j["status"]) - set(props)
    assert set(j["status"]["source"]) <= set(props["source"]["properties"])
