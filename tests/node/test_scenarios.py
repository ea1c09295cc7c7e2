"""Tier 4: what users do, on a real node, with the images `make images` built and the operator
installed from manifests/kind (conftest.py says where the cluster comes from).

Each scenario runs the LoRA sample (maxSteps raised, as run-kind.sh does, so a run lasts long
enough to interrupt) in a namespace of its own that enforces PodSecurity `restricted`, and ends
with the job Succeeded, its export loading with sentence-transformers on the host, and (where
the host sees the volume) its trained adapter equal to a `finetune-operator local` run of the
same spec: every interruption must resume exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kube import OPERATOR_NS, Cluster, PodWatch, parse_time, sample_job, wait_until

JOB = "faq-minilm-lora"
MAX_STEPS = int(os.environ.get("FINETUNE_E2E_MAX_STEPS", "40"))
GANG_STEPS = 20
TIMEOUT = float(os.environ.get("FINETUNE_E2E_TIMEOUT", "900"))
ADAPTER = Path("final") / "adapter" / "adapter_model.safetensors"
TRAIN = "finetune.dev/role=train"
# the first scenario also waits for the node, the install and the reference run (session fixtures)
pytestmark = pytest.mark.timeout(1800)


# -- helpers -----------------------------------------------------------------------------------------


def _status(c: Cluster, ns: str) -> dict[str, Any]:
    return c.status(ns, JOB)


def _train_pods(c: Cluster, ns: str) -> list[dict[str, Any]]:
    return c.pods(ns, f"finetune.dev/job={JOB},{TRAIN}")


def _running_train_pod(c: Cluster, ns: str) -> str | None:
    for pod in _train_pods(c, ns):
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        if not pod["metadata"].get("deletionTimestamp") and any(
            (s.get("state") or {}).get("running") for s in statuses
        ):
            return str(pod["metadata"]["name"])
    return None


def _stepping(c: Cluster, ns: str, at_least: int = 1) -> dict[str, Any] | None:
    """The status once the worker reports step >= at_least (it is training, not loading)."""
    st = _status(c, ns)
    step = (st.get("progress") or {}).get("step")
    return st if st.get("phase") == "Training" and isinstance(step, int) and step >= at_least else None


def _checkpointed(c: Cluster, ns: str) -> dict[str, Any] | None:
    st = _status(c, ns)
    name = (st.get("checkpoint") or {}).get("name") or ""
    return st if st.get("phase") == "Training" and name.startswith("checkpoint-") else None


def _launch(c: Cluster, ns: str) -> None:
    c.apply(sample_job(MAX_STEPS), ns)
    spec = c.job(ns, JOB)["spec"]
    assert spec["training"]["maxSteps"] == MAX_STEPS
    assert spec["training"]["seed"] == 42  # the CRD's default, filled by the API server


def _succeeded(c: Cluster, ns: str) -> dict[str, Any]:
    c.kubectl("-n", ns, "wait", "--for=condition=Succeeded", f"finetunejob/{JOB}", f"--timeout={TIMEOUT:.0f}s",
              timeout=TIMEOUT + 30)  # fmt: skip
    st = _status(c, ns)
    assert st["phase"] == "Succeeded", st
    assert st.get("failures", 0) == 0, f"an attempt counted against backoffLimit: {st.get('attempts')}"
    return st


def _json_lines(log: str) -> list[dict[str, Any]]:
    """The worker's JSON lines of a pod log (the Trainer's own dict prints are not JSON)."""
    lines = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                lines.append(doc)
    return lines


def _claim(c: Cluster, ns: str) -> str:
    pod = _train_pods(c, ns)[-1]
    return next(v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                if v.get("persistentVolumeClaim"))  # fmt: skip


def _check_volume(c: Cluster, ns: str, reference: Path | None) -> str:
    """The export loads with sentence-transformers on the host; the adapter equals the reference run's.
    Returns what was checked (kind without FINETUNE_E2E_VOLUMES: the host cannot see the volume)."""
    ws = c.volume_dir(ns, _claim(c, ns))
    if ws is None:
        return "volume not visible on this host (FINETUNE_E2E_VOLUMES): export and weights not checked"
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(ws / "export" / "sentence-transformers"), device="cpu")
    emb = model.encode(["How do I reset my password?", "Do you ship internationally?"])
    assert emb.shape == (2, 384), emb.shape
    assert abs(float((emb[0] ** 2).sum()) - 1.0) < 1e-4  # export.normalize: true
    meta = json.loads((ws / "export" / "metadata.json").read_text())
    assert "sentence-transformers" in meta["formats"], meta
    if reference is None:
        return "export loads"
    from worker.trainkit import max_abs_diff

    diff = max_abs_diff(reference, ws / ADAPTER)
    assert diff <= 1e-6, f"the adapter differs from an uninterrupted `finetune-operator local` run by {diff}"
    return f"export loads; adapter equals the local run's (max |diff| {diff:.1e})"


def _operator_never_restarted(c: Cluster) -> None:
    """No operator container restarted (probe kill, OOM, crash): the Deployment as shipped holds."""
    problems = []
    for pod in c.operator_pods():
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("restartCount", 0):
                last = (cs.get("lastState") or {}).get("terminated") or {}
                events = c.kubectl("-n", OPERATOR_NS, "get", "events", "--field-selector",
                                   f"involvedObject.name={pod['metadata']['name']}", check=False).stdout  # fmt: skip
                problems.append(
                    f"{pod['metadata']['name']}: {cs['restartCount']} restarts, last {last}\n{events}"
                )
    assert not problems, "\n".join(problems)


def _active_operator(c: Cluster) -> str:
    """The replica whose metrics say finetune_operator_active 1 (read through the API server's proxy)."""
    for pod in c.operator_pods():
        name = pod["metadata"]["name"]
        if pod["metadata"].get("deletionTimestamp") or (pod.get("status") or {}).get("phase") != "Running":
            continue
        text = c.kubectl("get", "--raw", f"/api/v1/namespaces/{OPERATOR_NS}/pods/{name}:9090/proxy/metrics",
                         check=False).stdout  # fmt: skip
        if any(line.split()[:2] == ["finetune_operator_active", "1.0"] for line in text.splitlines()):
            return str(name)
    return ""


# -- the reference run ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's adapter from `finetune-operator local` of the same spec on this host, uninterrupted."""
    import yaml

    d = tmp_path_factory.mktemp("reference")
    (d / "job.yaml").write_text(yaml.safe_dump(sample_job(MAX_STEPS)))
    cli = Path(sys.executable).parent / "finetune-operator"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(cli), "local", str(d / "job.yaml"), "--workdir", str(d / "run")], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = sorted((d / "run").rglob(str(ADAPTER)))
    assert found, f"no {ADAPTER} under {d / 'run'}"
    return found[0]


# -- scenarios --------------------------------------------------------------------------------------


def test_pod_deleted_exits_75_with_its_checkpoint_then_suspend_and_resume(installed: Cluster, ns: str,
                                                                        reference: Path) -> None:  # fmt: skip
    """The kind quickstart: delete the training pod mid-run (SIGTERM through the runtime: the worker
    checkpoints and exits 75, read from the real termination message; the next attempt resumes from
    that checkpoint), suspend and resume, Succeeded; `kubectl get/logs/describe` tell the story."""
    c = installed
    refused = c.kubectl("-n", ns, "run", "root-shell", "--image=finetune-worker:dev", "--restart=Never",
                        "--overrides", '{"spec":{"securityContext":{"runAsUser":0}}}', "--dry-run=server",
                        check=False)  # fmt: skip
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused  # enforced here
    _launch(c, ns)
    wait_until(lambda: _checkpointed(c, ns), 600, "a first checkpoint")
    pod = f"{JOB}-train-1"
    watch = PodWatch(c, ns, pod)
    try:
        c.kubectl("-n", ns, "delete", "pod", pod, "--wait=false")
        term = wait_until(watch.terminated, 300, f"{pod}'s container to end")
    finally:
        watch.close()
    assert term["exitCode"] == 75, term
    summary = json.loads(term["message"])  # /dev/termination-log, as the kubelet read it
    assert summary["result"] == "preempted", summary
    assert summary["checkpoint"] == f"checkpoint-{summary['step']}", (
        summary
    )  # saved at the step it stopped on

    st = wait_until(lambda: (s := _status(c, ns)) and len(s.get("attempts") or []) >= 2 and s, 300,
                    "a second attempt")  # fmt: skip
    first, second = st["attempts"][:2]
    assert (first["result"], first["exitCode"]) == ("preempted", 75), first
    assert second["resumedFrom"] == summary["checkpoint"], second

    wait_until(lambda: _running_train_pod(c, ns), 300, "the second training pod running")
    c.kubectl("-n", ns, "patch", "finetunejob", JOB, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    # phase Suspended comes at once (reason Suspending, while the worker checkpoints); reason
    # Suspended once its pod is gone
    wait_until(lambda: _status(c, ns).get("reason") == "Suspended", 300, "reason Suspended (the stop done)")
    c.kubectl("-n", ns, "wait", "--for=condition=Suspended", f"finetunejob/{JOB}", "--timeout=60s")
    assert _status(c, ns)["phase"] == "Suspended" and _running_train_pod(c, ns) is None
    assert not [
        p
        for p in _train_pods(c, ns)
        if not p["metadata"].get("deletionTimestamp")
        and (p.get("status") or {}).get("phase") in ("Pending", "Running")
    ], "a training pod while Suspended"
    c.kubectl("-n", ns, "patch", "finetunejob", JOB, "--type=merge", "-p", '{"spec":{"suspend":false}}')

    st = _succeeded(c, ns)
    trains = [a for a in st["attempts"] if a.get("role", "train") == "train"]
    assert len(trains) >= 3 and all(a.get("resumedFrom") for a in trains[1:]), trains
    assert st["restarts"] >= 2 and st["preemptions"] >= 1, st

    header, row = c.kubectl("-n", ns, "get", "ftj", JOB).stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "CHECKPOINT", "RESTARTS", "AGE", "ETA"], header
    name, phase, progress, checkpoint, restarts = row.split()[:5]
    assert (name, phase, checkpoint) == (JOB, "Succeeded", "final") and progress.startswith("100"), row
    assert int(restarts) == st["restarts"], row

    last = trains[-1]["pod"]
    lines = _json_lines(c.kubectl("-n", ns, "logs", last).stdout)
    steps = [x["step"] for x in lines if x.get("event") == "progress"]
    assert steps and steps[-1] == MAX_STEPS, lines[-5:]
    described = c.kubectl("-n", ns, "describe", "ftj", JOB).stdout
    events = described[described.index("Events:") :]
    for reason in ("Started", "AttemptPreempted", "Resumed", "Suspended", "Succeeded"):
        assert reason in events, events
    print(_check_volume(c, ns, reference))
    _operator_never_restarted(c)


def test_operator_pod_deleted_the_standby_takes_over_and_adopts_the_run(installed: Cluster, ns: str) -> None:
    """Two replicas (kopf peering): delete the active one mid-run; the standby becomes active, adopts
    the running training pod (no new attempt) and finishes the job."""
    c = installed
    _launch(c, ns)
    wait_until(lambda: _stepping(c, ns), 600, "training steps")
    active = wait_until(lambda: _active_operator(c), 120, "an active operator replica")
    standby = [p["metadata"]["name"] for p in c.operator_pods() if p["metadata"]["name"] != active]
    assert standby, c.operator_pods()
    deleted_at = time.time()
    c.kubectl("-n", OPERATOR_NS, "delete", "pod", active, "--wait=false")
    took_over = wait_until(
        lambda: (a := _active_operator(c)) and a != active and a, 180, "the standby to take over"
    )
    assert took_over in standby, (took_over, standby)

    def progress_written_by_the_new_replica() -> bool:
        prog = _status(c, ns).get("progress") or {}
        return bool(prog.get("updatedAt")) and parse_time(prog["updatedAt"]) > deleted_at + 1

    wait_until(progress_written_by_the_new_replica, 180, "status.progress written after the takeover")
    st = _succeeded(c, ns)
    trains = [a for a in st["attempts"] if a.get("role", "train") == "train"]
    assert len(trains) == 1 and trains[0]["result"] == "completed", st["attempts"]  # adopted, not relaunched
    assert st.get("restarts", 0) == 0, st
    c.kubectl(
        "-n", OPERATOR_NS, "rollout", "status", "deploy/finetune-operator", "--timeout=180s", timeout=200
    )
    _operator_never_restarted(c)


def test_kubelet_and_containerd_restarted_mid_run_end_with_exact_weights(installed: Cluster, ns: str,
                                                                         reference: Path) -> None:  # fmt: skip
    """containerd and then the kubelet stopped and started again during training (an upgrade, a
    crash): the job still ends Succeeded, with exactly the weights of an uninterrupted run."""
    c = installed
    if c.node is None:
        pytest.skip("restarts the node's kubelet and containerd: only on the tier-4 harness's own node")
    _launch(c, ns)
    wait_until(lambda: _stepping(c, ns, 2), 600, "training steps")
    c.node.restart("containerd", down_seconds=2)
    c.node.restart("kubelet", down_seconds=2)
    wait_until(
        lambda: (
            (n := c.get("node", c.node.context))
            and any(x["type"] == "Ready" and x["status"] == "True" for x in n["status"]["conditions"])
        ),
        120,
        "the node Ready",
    )
    st = _succeeded(c, ns)
    print("attempts:", [(a["pod"], a.get("result"), a.get("resumedFrom")) for a in st["attempts"]])
    print(_check_volume(c, ns, reference))
    _operator_never_restarted(c)


def test_drain_evicts_the_run_without_a_failure_then_it_finishes(installed: Cluster, ns: str) -> None:
    """`kubectl drain` of the node mid-run evicts the training pod (and, on one node, the operator):
    an interruption, not a failure (backoffLimit untouched); after `uncordon` the job resumes."""
    c = installed
    _launch(c, ns)
    st = wait_until(lambda: _checkpointed(c, ns), 600, "a first checkpoint")
    pod = _running_train_pod(c, ns) or f"{JOB}-train-1"
    node = c.get("-n", ns, "pod", pod)["spec"]["nodeName"]  # type: ignore[index]
    try:
        c.kubectl(
            "drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=300s", timeout=330
        )
        assert c.get("-n", ns, "pod", pod) is None
    finally:
        c.kubectl("uncordon", node)
    c.kubectl(
        "-n", OPERATOR_NS, "rollout", "status", "deploy/finetune-operator", "--timeout=300s", timeout=320
    )
    st = _succeeded(c, ns)
    first = st["attempts"][0]
    assert first["result"] in ("evicted", "preempted"), first
    assert st["preemptions"] >= 1 and st["attempts"][1]["resumedFrom"], st["attempts"]
    _operator_never_restarted(c)


def test_gang_of_two_pods_rendezvous_through_the_headless_service(installed: Cluster, ns: str) -> None:
    """distributed.nodes: 2 on the real node: two pods find each other through the gang's headless
    Service (cluster DNS), train as one world of 2 and the job ends Succeeded with one export."""
    c = installed
    if c.node is not None and not c.node.has_dns:
        pytest.skip(
            "a gang needs cluster DNS: put kube-dns (kubernetes/dns, built in the session) in KUBEBUILDER_ASSETS"
        )
    if c.node is None and os.environ.get("FINETUNE_E2E_GANG") != "1":
        pytest.skip(
            "needs cluster DNS and a ReadWriteMany storage class: FINETUNE_E2E_GANG=1 says the cluster has both"
        )
    doc = sample_job(GANG_STEPS)
    doc["spec"]["distributed"] = {"nodes": 2}
    c.apply(doc, ns)
    wait_until(lambda: len(_train_pods(c, ns)) == 2, 300, "two gang members")
    service = c.get("-n", ns, "service", f"{JOB}-rdzv")
    assert service is not None and service["spec"]["clusterIP"] == "None", service
    st = _succeeded(c, ns)
    assert st.get("worldSize") == 2, st
    gang = st["attempts"][0]
    assert sorted(gang["pods"]) == [f"{JOB}-train-1-0", f"{JOB}-train-1-1"], gang
    lines = _json_lines(c.kubectl("-n", ns, "logs", f"{JOB}-train-1-0").stdout)
    assert any(x.get("event") == "progress" and x.get("worldSize") == 2 for x in lines), lines[-5:]
    print(_check_volume(c, ns, None))
    _operator_never_restarted(c)
