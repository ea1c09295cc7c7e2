"""The tier-3 harness itself: API semantics of the emulator, the test kubelet, and a tiny real kopf operator.

The tiny operator (its own kopf.OperatorRegistry) creates one pod per FineTuneJob, and copies the
pod's ending (exit code, termination message) into the job's status; it proves the whole loop a
lifecycle test relies on: kopf -> emulated API -> kubelet -> local process -> pod status -> kopf.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
from harness import Cluster, finetune_job
from kubelet_sim import TestKubelet

from finetune_api import contract

pytestmark = pytest.mark.operator

PY = Path(sys.executable).name


def http(
    cluster: Cluster, method: str, path: str, body: Any = None, ctype: str = "application/json"
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        cluster.url + path, data=data, method=method, headers={"Content-Type": ctype}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


JOBS = f"/apis/{contract.API_VERSION}/namespaces/default/{contract.PLURAL}"
PODS = "/api/v1/namespaces/default/pods"


def pod_manifest(
    name: str, script: str, *, claim: str | None = None, grace: int = 5, **meta: Any
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "worker",
        "command": [PY, "-c", textwrap.dedent(script)],
        "args": ["/workspace"],
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "containers": [container],
    }
    if claim:
        container["volumeMounts"] = [{"name": "ws", "mountPath": "/workspace"}]
        spec["volumes"] = [{"name": "ws", "persistentVolumeClaim": {"claimName": claim}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **meta}, "spec": spec}


def terminated(pod: dict[str, Any] | None) -> dict[str, Any] | None:
    states = ((pod or {}).get("status") or {}).get("containerStatuses") or [{}]
    return states[0].get("state", {}).get("terminated")


# -- the emulated API --------------------------------------------------------------------------------


def test_create_fills_server_fields_and_honours_url_namespace_and_generate_name(kube: Cluster) -> None:
    code, job = http(kube, "POST", JOBS, {**finetune_job("a", {"x": 1}), "status": {"phase": "Forged"}})
    assert code == 201
    meta = job["metadata"]
    assert (
        meta["namespace"] == "default"
        and meta["uid"]
        and meta["creationTimestamp"]
        and meta["generation"] == 1
    )
    assert int(meta["resourceVersion"]) > 0
    assert "status" not in job  # status subresource: create ignores status
    code, err = http(kube, "POST", JOBS, finetune_job("a", {}))
    assert code == 409 and err["reason"] == "AlreadyExists"
    code, ev1 = http(
        kube, "POST", "/api/v1/namespaces/default/events", {"metadata": {"generateName": "kopf-event-"}}
    )
    code2, ev2 = http(
        kube, "POST", "/api/v1/namespaces/default/events", {"metadata": {"generateName": "kopf-event-"}}
    )
    assert (code, code2) == (201, 201) and ev1["metadata"]["name"] != ev2["metadata"]["name"]
    assert ev1["metadata"]["name"].startswith("kopf-event-")
    code, err = http(kube, "POST", "/api/v1/namespaces/nowhere/pods", pod_manifest("p", "pass"))
    assert code == 404 and "nowhere" in err["message"]
    code, namespaces = http(kube, "GET", "/api/v1/namespaces")
    assert code == 200 and [n["metadata"]["name"] for n in namespaces["items"]] == ["default"]


def test_status_subresource_is_separate_and_patches_behave_like_the_api_server(kube: Cluster) -> None:
    job = kube.create(finetune_job("b", {"x": 1}))
    rv = job["metadata"]["resourceVersion"]
    code, body = http(
        kube,
        "PATCH",
        f"{JOBS}/b",
        {"spec": {"x": 2}, "status": {"phase": "Ignored"}},
        "application/merge-patch+json",
    )
    assert (
        code == 200
        and body["spec"] == {"x": 2}
        and "status" not in body
        and body["metadata"]["generation"] == 2
    )
    code, body = http(
        kube,
        "PATCH",
        f"{JOBS}/b/status",
        {"spec": {"x": 3}, "status": {"phase": "Training"}},
        "application/merge-patch+json",
    )
    assert code == 200 and body["spec"] == {"x": 2} and body["status"] == {"phase": "Training"}
    assert body["metadata"]["generation"] == 2  # status writes do not bump the generation
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
    ]
    code, err = http(kube, "PATCH", f"{JOBS}/b", stale, "application/json-patch+json")
    assert code == 422 and err["reason"] == "Invalid"  # kopf retries on 422; kmock 0.8 said 500
    fresh = [{**stale[0], "value": body["metadata"]["resourceVersion"]}, stale[1]]
    code, body = http(kube, "PATCH", f"{JOBS}/b", fresh, "application/json-patch+json")
    assert code == 200 and body["metadata"]["labels"] == {"a": "b"}
    code, err = http(
        kube,
        "PATCH",
        f"{JOBS}/b",
        {"metadata": {"resourceVersion": rv}, "spec": {"x": 9}},
        "application/merge-patch+json",
    )
    assert code == 409 and kube.job("b")["spec"] == {"x": 2}


def test_finalizers_label_selectors_and_owner_garbage_collection(kube: Cluster) -> None:
    job = kube.create({**finetune_job("c", {}), "metadata": {"name": "c", "finalizers": ["test/hold"]}})
    owner = {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "name": "c",
        "uid": job["metadata"]["uid"],
        "controller": True,
    }
    for name, role in (("c-train", "train"), ("c-export", "export"), ("other", "train")):
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "labels": {"role": role}},
        }
        if name != "other":
            pvc["metadata"]["ownerReferences"] = [owner]
        kube.create(pvc)
    code, listed = http(
        kube, "GET", "/api/v1/namespaces/default/persistentvolumeclaims?labelSelector=role%3Dtrain"
    )
    assert sorted(p["metadata"]["name"] for p in listed["items"]) == ["c-train", "other"]
    assert [
        p["metadata"]["name"]
        for p in kube.list("v1", "persistentvolumeclaims", "default", "role in (export)")
    ] == ["c-export"]
    code, body = http(kube, "DELETE", f"{JOBS}/c")
    assert code == 200 and body["metadata"]["deletionTimestamp"]  # held by the finalizer
    assert kube.job("c") is not None and len(kube.list("v1", "persistentvolumeclaims")) == 3
    http(kube, "PATCH", f"{JOBS}/c", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert kube.job("c") is None
    assert [p["metadata"]["name"] for p in kube.list("v1", "persistentvolumeclaims")] == ["other"]


def test_watch_replays_from_a_resource_version_and_bookmarks_initial_events(kube: Cluster) -> None:
    first = kube.create(finetune_job("w1", {}))
    kube.create(finetune_job("w2", {}))
    since = first["metadata"]["resourceVersion"]
    with urllib.request.urlopen(
        f"{kube.url}{JOBS}?watch=true&resourceVersion={since}&timeoutSeconds=0.3", timeout=10
    ) as resp:
        events = [json.loads(line) for line in resp.read().splitlines()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w2")]
    url = f"{kube.url}{JOBS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=0.3"
    with urllib.request.urlopen(url, timeout=10) as resp:
        events = [json.loads(line) for line in resp.read().splitlines()]
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    assert events[-1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# -- the test kubelet ---------------------------------------------------------------------------------

FAILING = """
    import json, os, sys
    open(os.path.join(sys.argv[1], "touched"), "w").write("yes")
    print("step 1", flush=True)
    print("step 2", flush=True)
    open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write(json.dumps({"result": "failed", "message": "boom"}))
    sys.exit(3)
"""


def test_kubelet_waits_for_the_claim_runs_the_pod_and_reports_its_ending(
    kube: Cluster, kubelet: TestKubelet
) -> None:
    kube.create(pod_manifest("runner", FAILING, claim="ws-claim"))
    pending = kube.wait_for(
        lambda: (kube.pod("runner") or {}).get("status", {}).get("conditions"), 10, what="unschedulable"
    )
    assert pending[0]["reason"] == "Unschedulable" and "ws-claim" in pending[0]["message"]
    assert kube.pod("runner")["status"]["phase"] == "Pending"
    kube.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ws-claim"}})
    term = kube.wait_for(lambda: terminated(kube.pod("runner")), 20, what="pod to terminate")
    pod = kube.pod("runner")
    assert pod["status"]["phase"] == "Failed" and pod["spec"]["nodeName"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert json.loads(term["message"]) == {"result": "failed", "message": "boom"}
    assert (kubelet.workspace("ws-claim") / "touched").read_text() == "yes"
    code, text = http(kube, "GET", f"{PODS}/runner/log?tailLines=1")
    assert (code, text) == (200, "step 2\n")
    phases = [v.get("status", {}).get("phase") for v in kube.history("v1", "pods", "default", "runner")]
    assert phases[0] == "Pending" and "Running" in phases and phases[-1] == "Failed"


GRACEFUL = """
    import os, signal, sys, time
    def stop(*_):
        time.sleep(0.3)  # "checkpointing"
        open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write('{"result": "preempted"}')
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    print("training", flush=True)
    time.sleep(60)
"""


def test_pod_deletion_is_graceful_and_reports_the_final_state(kube: Cluster, kubelet: TestKubelet) -> None:
    kube.create(pod_manifest("graceful", GRACEFUL))
    kube.wait_for(
        lambda: kubelet.started("graceful") and "training" in kubelet.local_logs("graceful"),
        20,
    )
    code, body = http(kube, "DELETE", f"{PODS}/graceful")
    assert code == 200 and body["metadata"]["deletionGracePeriodSeconds"] == 5
    assert kube.pod("graceful")["metadata"]["deletionTimestamp"]  # still there while it checkpoints
    kube.wait_for(lambda: kube.pod("graceful") is None, 10, what="pod removal")
    versions = kube.history("v1", "pods", "default", "graceful")
    assert versions[-1]["deleted"] is True
    final = terminated(versions[-2])
    assert (
        final is not None
        and final["exitCode"] == 75
        and json.loads(final["message"]) == {"result": "preempted"}
    )


def test_kill_oom_and_eviction_are_reported_as_a_node_would(kube: Cluster, kubelet: TestKubelet) -> None:
    for name in ("killed", "oom", "evicted"):
        kube.create(pod_manifest(name, "import time; print('up', flush=True); time.sleep(60)"))
    kube.wait_for(
        lambda: all(
            (kube.pod(n) or {}).get("status", {}).get("phase") == "Running"
            for n in ("killed", "oom", "evicted")
        ),
        20,
    )
    kubelet.kill("killed", signal.SIGKILL)
    kubelet.oom_kill("oom")
    kubelet.evict("evicted")
    assert kube.wait_for(lambda: terminated(kube.pod("killed")), 10)["exitCode"] == 137
    oom = kube.wait_for(lambda: terminated(kube.pod("oom")), 10)
    assert (oom["exitCode"], oom["reason"]) == (137, "OOMKilled")
    evicted = kube.wait_for(
        lambda: kube.pod("evicted")["status"].get("reason") == "Evicted" and kube.pod("evicted"), 10
    )
    assert evicted["status"]["phase"] == "Failed" and "low on resource" in evicted["status"]["message"]


# -- a tiny real kopf operator ------------------------------------------------------------------------

WORKER = """
    import json, os, sys
    print(json.dumps({"event": "progress", "step": 1}), flush=True)
    code = int(os.environ["EXIT_CODE"])
    open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write(json.dumps({"result": os.environ["RESULT"], "exitCode": code}))
    sys.exit(code)
"""


def tiny_operator() -> kopf.OperatorRegistry:
    """One pod per FineTuneJob; the pod's ending copied into the job's status; events on both."""
    import os

    registry = kopf.OperatorRegistry()

    def server() -> str:
        return os.environ["FINETUNE_KUBE_SERVER"]

    @kopf.on.resume(contract.GROUP, contract.VERSION, contract.PLURAL, registry=registry)
    @kopf.on.create(contract.GROUP, contract.VERSION, contract.PLURAL, registry=registry)
    async def launch(name: str, spec: dict[str, Any], body: Any, patch: Any, **_: Any) -> None:
        pod = pod_manifest(f"{name}-train-0", WORKER, labels={"harness/job": name})
        pod["spec"]["containers"][0]["env"] = [
            {"name": "EXIT_CODE", "value": str(spec["exitCode"])}, {"name": "RESULT", "value": spec["result"]},
        ]  # fmt: skip
        kopf.adopt(pod, owner=body)
        async with aiohttp.ClientSession() as session, session.post(f"{server()}{PODS}", json=pod) as resp:
            if resp.status not in (201, 409):
                raise kopf.TemporaryError(f"pod create: {resp.status} {await resp.text()}", delay=0.2)
        patch.status["phase"] = "Training"
        kopf.info(body, reason="PodCreated", message=f"created {pod['metadata']['name']}")

    @kopf.on.event("v1", "pods", labels={"harness/job": kopf.PRESENT}, registry=registry)
    async def observe(body: Any, labels: dict[str, str], **_: Any) -> None:
        term = terminated(dict(body))
        if term is None:
            return
        job = labels["harness/job"]
        status = {"phase": "Succeeded" if term["exitCode"] == 0 else "Failed", "exitCode": term["exitCode"],
                  "message": term.get("message", "")}  # fmt: skip
        url = f"{server()}{JOBS}/{job}/status"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with (
            aiohttp.ClientSession() as session,
            session.patch(url, json={"status": status}, headers=headers) as resp,
        ):
            job_body = await resp.json()
        if resp.status == 200:
            kopf.event(
                job_body, type="Normal", reason=status["phase"], message=f"exit code {term['exitCode']}"
            )

    return registry


def test_tiny_operator_full_loop_restart_and_clean_shutdown(
    kube: Cluster, kubelet: TestKubelet, run_operator: Any
) -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    registry = tiny_operator()
    with run_operator(registry=registry) as op:
        kube.create(finetune_job("ok", {"exitCode": 0, "result": "completed"}))
        kube.create(finetune_job("bad", {"exitCode": 2, "result": "invalid"}))
        ok = kube.wait_for(
            lambda: (kube.job("ok") or {}).get("status", {}).get("exitCode") is not None and kube.job("ok"),
            30,
        )
        bad = kube.wait_for(
            lambda: (kube.job("bad") or {}).get("status", {}).get("exitCode") is not None and kube.job("bad"),
            30,
        )
        assert (ok["status"]["phase"], ok["status"]["exitCode"]) == ("Succeeded", 0)
        assert (bad["status"]["phase"], bad["status"]["exitCode"]) == ("Failed", 2)
        assert json.loads(bad["status"]["message"]) == {"result": "invalid", "exitCode": 2}
        pod = kube.pod("ok-train-0")
        assert pod["metadata"]["ownerReferences"][0]["uid"] == ok["metadata"]["uid"]
        assert "Training" in [
            v.get("status", {}).get("phase")
            for v in kube.history(contract.API_VERSION, contract.PLURAL, "default", "ok")
        ]
        reasons = kube.wait_for(
            lambda: {e["reason"] for e in kube.events(involved_name="ok")} >= {"PodCreated", "Succeeded"}, 10
        )
        assert reasons

        op.restart()  # the resume handler runs again: the pod exists (409), nothing is duplicated
        kube.create(finetune_job("late", {"exitCode": 1, "result": "failed"}))
        kube.wait_for(lambda: (kube.job("late") or {}).get("status", {}).get("phase") == "Failed", 30)
        assert sorted(p["metadata"]["name"] for p in kube.pods()) == [
            "bad-train-0",
            "late-train-0",
            "ok-train-0",
        ]
        assert op.starts == 2 and op.error is None

        kube.delete(contract.API_VERSION, contract.PLURAL, "default", "ok")  # kopf's finalizer, then GC
        kube.wait_for(
            lambda: kube.job("ok") is None and kube.pod("ok-train-0") is None, 15, what="job + pod deletion"
        )
    kubelets_own = ("kubelet-", "pod-")  # the kubelet's and executor's threads belong to the cluster
    leftover = [
        t.name
        for t in threading.enumerate()
        if t.ident not in threads_before and not t.name.startswith(kubelets_own)
    ]
    assert not leftover
    assert kubelet.running() == []  # leftover processes are also checked by the kube fixture's teardown


def test_force_delete_then_same_name_pod_runs_as_a_new_incarnation(
    kube: Cluster, kubelet: TestKubelet
) -> None:
    kube.create(pod_manifest("again", GRACEFUL))
    kube.wait_for(lambda: kubelet.started("again") and "training" in kubelet.local_logs("again"), 20)
    first_uid = kube.pod("again")["metadata"]["uid"]
    code, _ = http(kube, "DELETE", f"{PODS}/again?gracePeriodSeconds=0")
    assert code == 200 and kube.pod("again") is None  # force delete: gone from the API at once
    kube.create(pod_manifest("again", "print('second incarnation')"))
    term = kube.wait_for(lambda: terminated(kube.pod("again")), 20, what="the new pod to finish")
    assert term["exitCode"] == 0 and kube.pod("again")["metadata"]["uid"] != first_uid
    assert http(kube, "GET", f"{PODS}/again/log") == (200, "second incarnation\n")
    kube.wait_for(lambda: kubelet.running() == [], 10, what="the old incarnation to be killed")


def test_make_bin_dir_shims_a_command_for_the_kubelet(tmp_path: Path) -> None:
    script = tmp_path / "fake.py"
    script.write_text("import sys; print('fake', *sys.argv[1:]); sys.exit(4)")
    from harness import make_bin_dir

    with Cluster(tmp_path / "c", bin_dir=make_bin_dir(tmp_path / "bin", {"finetune-worker": script})) as kube:
        pod = pod_manifest("shimmed", "")
        pod["spec"]["containers"][0].update(
            command=["finetune-worker", "train"], args=["--workspace", "/workspace"]
        )
        kube.create(pod)
        term = kube.wait_for(lambda: terminated(kube.pod("shimmed")), 20)
        assert term["exitCode"] == 4
        assert (
            kube.kubelet is not None
            and kube.kubelet.local_logs("shimmed") == "fake train --workspace /workspace\n"
        )


def test_resource_comes_from_the_crd_file_when_there_is_one(tmp_path: Path) -> None:
    import yaml

    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{contract.PLURAL}.{contract.GROUP}"},
        "spec": {
            "group": contract.GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": contract.PLURAL,
                "singular": "finetunejob",
                "kind": contract.KIND,
                "shortNames": ["ftj"],
            },
            "versions": [
                {"name": contract.VERSION, "served": True, "storage": True, "subresources": {"status": {}}}
            ],
        },
    }
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(crd))
    with Cluster(tmp_path / "c", kubelet=False, crd_path=path) as kube:
        code, listed = http(kube, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        assert code == 200 and [c["metadata"]["name"] for c in listed["items"]] == [crd["metadata"]["name"]]
        code, discovery = http(kube, "GET", f"/apis/{contract.API_VERSION}")
        names = {r["name"]: r for r in discovery["resources"]}
        assert f"{contract.PLURAL}/status" in names and names[contract.PLURAL]["shortNames"] == ["ftj"]
        assert names[contract.PLURAL]["namespaced"] is True


def test_start_cluster_and_operator_for_benchmarks(tmp_path: Path) -> None:
    from harness import start_cluster_and_operator

    before = {t.ident for t in threading.enumerate()}
    cluster, runner, stop = start_cluster_and_operator(tmp_path, kubelet=False, registry=tiny_operator())
    try:
        assert runner is not None and runner.alive
        cluster.create(finetune_job("bench", {"exitCode": 0, "result": "completed"}))
        pod = cluster.wait_for(lambda: cluster.pod("bench-train-0"), 20, what="the operator's pod")
        assert pod["status"]["phase"] == "Pending"  # no kubelet: pods are only created, as in the benchmark
    finally:
        stop()
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []
