"""The operator as an informer: no finalizer, no requests while nothing changes, progress from one
log stream, a pod log outage that stalls nothing, progress of a resumed attempt, quiet logs.

The emulator records every HTTP request it serves (only operators speak HTTP to it: the test
kubelet and the harness's helpers use its store directly), so the tests count what the real
operator sends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import FAST_ENV, Cluster, OperatorRunner, finetune_job
from test_operator_lifecycle import configure, spec, status, wait_phase

from finetune_api import contract

pytestmark = pytest.mark.operator
IDLE_WINDOW = 4.0  # seconds watched after settling: 8 progress intervals at FINETUNE_RESYNC_SECONDS=0.5


def test_no_finalizer_ever_and_deletion_with_the_operator_down_completes_at_once(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    configure(cluster, "fin-workspace", steps=3)
    configure(cluster, "gone-workspace", steps=400, stepSeconds=0.05)
    cluster.create(finetune_job("fin", spec(ttlSecondsAfterFinished=1)))
    cluster.create(finetune_job("gone", spec()))
    wait_phase(cluster, "gone", "Training")
    # TTL still fires (from the operator's scheduler, not a kopf timer)
    cluster.wait_for(lambda: cluster.job("fin") is None, 60, what="fin deleted by its TTL")
    history = cluster.history(contract.API_VERSION, contract.PLURAL, "default", "fin")
    assert any((v.get("status") or {}).get("phase") == "Succeeded" for v in history)
    assert [v["metadata"].get("finalizers") for v in history if v["metadata"].get("finalizers")] == []
    operator.stop()
    assert not cluster.job("gone")["metadata"].get("finalizers")
    cluster.delete(contract.API_VERSION, contract.PLURAL, "default", "gone")
    assert cluster.job("gone") is None  # no finalizer to wait for: gone at once, operator down
    cluster.wait_for(lambda: cluster.pods(label_selector="finetune.dev/job=gone") == [], 30,
                     what="the pod collected through its ownerReference")  # fmt: skip


def test_a_job_from_an_older_version_loses_kopfs_finalizer(cluster: Cluster) -> None:
    """Jobs created under the timer-based operator carry kopf's finalizer: the first look removes it."""
    job = finetune_job("old", spec())
    job["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    configure(cluster, "old-workspace", steps=3)
    cluster.create(job)
    runner = OperatorRunner(cluster.url, cluster=cluster).start()
    try:
        cluster.wait_for(lambda: not cluster.job("old")["metadata"].get("finalizers"), 30, what="finalizer removed")
        wait_phase(cluster, "old", "Succeeded", 60)
    finally:
        runner.stop()


def test_a_pod_log_outage_marks_progress_stale_and_suspend_still_stops_the_pod(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    configure(cluster, "out-workspace", steps=400, stepSeconds=0.05)
    cluster.create(finetune_job("out", spec(training={"maxSteps": 400, "checkpoint": {"everySteps": 5}})))
    cluster.wait_for(lambda: (status(cluster, "out").get("progress") or {}).get("step"), 30, what="progress")
    cluster.log_outage(500)
    st = cluster.wait_for(lambda: (s := status(cluster, "out")).get("progress", {}).get("stale") and s, 30,
                          what="progress marked stale")  # fmt: skip
    assert st["phase"] == "Training" and "progress stale" in st["message"] and "500" in st["message"]
    cluster.patch(contract.API_VERSION, contract.PLURAL, "default", "out", {"spec": {"suspend": True}})
    st = cluster.wait_for(lambda: (s := status(cluster, "out")).get("reason") == "Suspended" and s, 30,
                          what="suspended while the log is unreadable")  # fmt: skip
    assert cluster.pod("out-train-1") is None and st["attempts"][0]["result"] == "preempted"
    cluster.log_outage(None)
    cluster.patch(contract.API_VERSION, contract.PLURAL, "default", "out", {"spec": {"suspend": False}})
    try:
        cluster.wait_for(lambda: (s := status(cluster, "out")).get("phase") == "Training"
                         and (s.get("progress") or {}).get("step", 0) > st["checkpoint"]["step"]
                         and not s["progress"].get("stale"), 30)  # fmt: skip
    except TimeoutError:
        pytest.fail(f"no fresh progress after the outage: {status(cluster, 'out')}")


TRAINING_WINDOW = 3.0  # seconds: 6 progress intervals at FINETUNE_RESYNC_SECONDS=0.5


def test_a_training_job_costs_one_log_stream_and_at_most_a_write_per_interval(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """Progress comes from one `follow=true` log stream opened when the pod runs, not a read per
    interval: while the job trains, the operator sends nothing but status writes, at most one per
    FINETUNE_RESYNC_SECONDS, and status still moves."""
    configure(cluster, "tr-workspace", steps=400, stepSeconds=0.05)
    cluster.create(finetune_job("tr", spec(training={"maxSteps": 400})))
    before = cluster.wait_for(lambda: (status(cluster, "tr").get("progress") or {}).get("step"), 30, what="progress")
    t0 = time.monotonic()
    time.sleep(TRAINING_WINDOW)
    sent = cluster.requests(t0)
    after = (status(cluster, "tr").get("progress") or {}).get("step")
    assert status(cluster, "tr")["phase"] == "Training" and after > before, (before, after)
    streams = [r for r in cluster.requests() if "/log" in r[2]]
    assert len(streams) == 1 and "follow=true" in streams[0][2] and streams[0][0] < t0, streams
    assert all(r[1] == "PATCH" and r[2].endswith("/status") for r in sent), sent
    interval = float(FAST_ENV["FINETUNE_RESYNC_SECONDS"])
    assert 1 <= len(sent) <= TRAINING_WINDOW / interval + 1, f"{len(sent)} writes in {TRAINING_WINDOW}s: {sent}"


def test_a_resumed_attempt_reports_progress_from_its_checkpoint(cluster: Cluster, operator: OperatorRunner) -> None:
    configure(cluster, "res-workspace", steps=200, stepSeconds=0.05)
    cluster.create(finetune_job("res", spec(training={"maxSteps": 200, "checkpoint": {"everySteps": 20}})))
    def past_checkpoint() -> bool:  # the kill must land between checkpoints, or resumed == last step
        st = status(cluster, "res")
        step = (st.get("progress") or {}).get("step", 0)
        return step >= 30 and step > ((st.get("checkpoint") or {}).get("step") or 0)

    cluster.wait_for(past_checkpoint, 30, what="progress past the latest checkpoint")
    cluster.kubelet.kill("res-train-1", signal.SIGKILL)
    cluster.wait_for(lambda: len(status(cluster, "res").get("attempts") or []) >= 2, 30, what="second attempt")
    history = cluster.history(contract.API_VERSION, contract.PLURAL, "default", "res")
    launched = next(v["status"] for v in history if len((v.get("status") or {}).get("attempts") or []) == 2)
    resumed = launched["attempts"][1]["resumedFrom"]
    before = [v["status"]["progress"]["step"] for v in history if len((v.get("status") or {}).get("attempts") or []) == 1
              and (v["status"].get("progress") or {}).get("step") is not None]  # fmt: skip
    assert resumed == launched["checkpoint"]["name"] and launched["progress"]["step"] == launched["checkpoint"]["step"]
    assert max(before) > launched["progress"]["step"], "the new attempt must not show the old attempt's last step"
    wait_phase(cluster, "res", "Succeeded", 60)


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_idle_jobs_cost_no_requests_and_no_log_lines(tmp_path: Path) -> None:
    """`finetune-operator run --log-format json` with 3 jobs whose pods stay Pending (no kubelet)
    and 2 Succeeded jobs: after settling, a window of IDLE_WINDOW seconds (8 progress intervals)
    holds no request and no log line."""
    with Cluster(tmp_path / "cluster", kubelet=False) as cluster:
        for i in range(2):
            cluster.create(finetune_job(f"done-{i}", spec()))
            cluster.patch(contract.API_VERSION, contract.PLURAL, "default", f"done-{i}",
                          {"status": {"phase": "Succeeded", "reason": "Exported", "message": "exported"}},
                          subresource="status")  # fmt: skip
        log = tmp_path / "operator.log"
        env = {**os.environ, **FAST_ENV, "FINETUNE_KUBE_SERVER": cluster.url}
        exe = Path(sys.executable).with_name("finetune-operator")
        with log.open("w") as out:
            proc = subprocess.Popen([str(exe), "run", "-n", "default", "--liveness-port", "0", "--metrics-port", "0",
                                     "--log-format", "json"], env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            for i in range(3):
                cluster.create(finetune_job(f"idle-{i}", spec()))
            for i in range(3):
                cluster.wait_for(lambda i=i: status(cluster, f"idle-{i}").get("reason") == "PodStarting"
                                 and cluster.pod(f"idle-{i}-train-1"), 30, what=f"idle-{i} pending")  # fmt: skip
            time.sleep(1.0)  # settle: Events posted, watches caught up
            t0, lines0 = time.monotonic(), len(_lines(log))
            time.sleep(IDLE_WINDOW)
            sent, lines = cluster.requests(t0), _lines(log)[lines0:]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        everything = cluster.requests()
        assert any("finetune-operator" in r[3] and r[1] == "POST" for r in everything), "requests are recorded"
        assert sent == [], f"idle jobs sent {len(sent)} requests in {IDLE_WINDOW}s: {sent[:10]}"
        assert lines == [], f"idle jobs logged {len(lines)} lines in {IDLE_WINDOW}s: {lines[:5]}"
        docs: list[dict[str, Any]] = [json.loads(ln) for ln in _lines(log)]  # every line is JSON
        assert any("idle-0" in d.get("message", "") for d in docs)
        assert not any("succeeded." in d.get("message", "") for d in docs), "kopf's per-handler success lines are DEBUG"
        assert proc.returncode == 0


PEERING_LIFETIME = 4  # seconds; the Deployment uses 60 (README: operator settings)


def _start_replica(cluster: Cluster, fake_env: dict[str, str], log: Path, metrics_port: int = 0) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("finetune-operator")
    env = {**os.environ, **fake_env, "FINETUNE_KUBE_SERVER": cluster.url,
           "FINETUNE_PEERING_LIFETIME": str(PEERING_LIFETIME)}  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen([str(exe), "run", "-n", "default", "--peering", "finetune-operator",
                                 "--liveness-port", "0", "--metrics-port", str(metrics_port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _scrape(port: int) -> dict[str, float]:
    """The replica's /metrics as {sample: value}, e.g. {'finetune_jobs{phase="Training"}': 1.0}."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}


def _job_gauges(port: int) -> dict[str, float]:
    return {k: v for k, v in _scrape(port).items() if k.startswith("finetune_jobs{")}


def _peers(cluster: Cluster) -> dict[str, Any]:
    obj = cluster.get("kopf.dev/v1", "clusterkopfpeerings", None, "finetune-operator") or {}
    return {k: v for k, v in (obj.get("status") or {}).items() if v}


@pytest.mark.slow
def test_ha_the_standby_takes_over_when_the_active_replica_is_killed(cluster: Cluster, tmp_path: Path) -> None:
    """Two replicas peered through kopf: the one started first is active, the other stands by
    (sends no job request); SIGKILL the active one, and the standby acts on the job within the
    peering lifetime; the job completes with one pod per attempt. Only the active replica
    reports job gauges (a scrape through the Service must not alternate with a standby's zeros)."""
    from kube_store import Res
    from test_operator_cli import free_port

    cluster.call(cluster.api.register, Res("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering",
                                           namespaced=False, status_subresource=False))  # fmt: skip
    logs = {n: tmp_path / f"operator-{n}.log" for n in "ab"}
    ports = {n: free_port() for n in "ab"}
    a = _start_replica(cluster, FAST_ENV, logs["a"], ports["a"])
    b: subprocess.Popen[bytes] | None = None
    try:
        cluster.wait_for(lambda: "Resuming operations" in logs["a"].read_text() and len(_peers(cluster)) == 1, 60,
                         what="replica a active")  # fmt: skip
        b = _start_replica(cluster, FAST_ENV, logs["b"], ports["b"])
        cluster.wait_for(lambda: len(_peers(cluster)) == 2, 60, what="replica b in the peering")
        configure(cluster, "ha-workspace", steps=200, stepSeconds=0.05)
        cluster.create(finetune_job("ha", spec(training={"maxSteps": 200, "checkpoint": {"everySteps": 10}})))
        cluster.wait_for(lambda: (status(cluster, "ha").get("checkpoint") or {}).get("step"), 30, what="a checkpoint")
        assert "default/ha" in logs["a"].read_text() and "default/ha" not in logs["b"].read_text()
        assert _job_gauges(ports["a"])['finetune_jobs{phase="Training"}'] == 1
        assert _scrape(ports["a"])["finetune_operator_active"] == 1
        assert _job_gauges(ports["b"]) == {} and _scrape(ports["b"])["finetune_operator_active"] == 0
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        killed = time.monotonic()
        cluster.patch(contract.API_VERSION, contract.PLURAL, "default", "ha", {"spec": {"suspend": True}})
        cluster.wait_for(lambda: status(cluster, "ha").get("reason") == "Suspended", PEERING_LIFETIME + 30,
                         what="the standby to act on the suspend")  # fmt: skip
        handover = time.monotonic() - killed
        assert handover < PEERING_LIFETIME + 5, f"handover took {handover:.1f}s"
        assert "Resuming operations" in logs["b"].read_text() and "default/ha" in logs["b"].read_text()
        assert _scrape(ports["b"])["finetune_operator_active"] == 1
        assert _job_gauges(ports["b"])['finetune_jobs{phase="Suspended"}'] == 1
        cluster.patch(contract.API_VERSION, contract.PLURAL, "default", "ha", {"spec": {"suspend": False}})
        st = wait_phase(cluster, "ha", "Succeeded", 60)
        assert [(x["pod"], x["result"]) for x in st["attempts"]] == [
            ("ha-train-1", "preempted"), ("ha-train-2", "completed"), ("ha-export-1", "completed")]
        print(f"HA handover after SIGKILL of the active replica: {handover:.1f}s (peering lifetime {PEERING_LIFETIME}s)")
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)


def test_a_pod_deleted_while_the_watch_missed_it_is_found_by_the_cache_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf's indexes keep what was deleted during a watch gap (a re-list sends no DELETED): the
    periodic LIST (FINETUNE_SAFETY_RESYNC_SECONDS) finds the pod gone and the job moves on."""
    for k, v in {**FAST_ENV, "FINETUNE_SAFETY_RESYNC_SECONDS": "1"}.items():
        monkeypatch.setenv(k, v)
    with Cluster(tmp_path / "cluster", kubelet=False) as cluster:
        runner = OperatorRunner(cluster.url, cluster=cluster).start()
        try:
            cluster.create(finetune_job("gap", spec()))
            cluster.wait_for(lambda: cluster.pod("gap-train-1"), 30, what="the first pod")
            cluster.call(lambda: cluster.api._store[("", "v1", "pods")].pop(("default", "gap-train-1")))  # no event
            cluster.wait_for(lambda: cluster.pod("gap-train-2"), 30, what="a new attempt after the cache check")
            st = cluster.wait_for(lambda: len((s := status(cluster, "gap")).get("attempts") or []) == 2 and s, 10,
                                  what="the status of the new attempt")  # fmt: skip
            assert st["attempts"][0]["pod"] == "gap-train-1" and st["attempts"][0]["result"] == "evicted"
        finally:
            runner.stop()
