"""The operator's cost to a real API server (tier 3b's kube-apiserver + etcd from KUBEBUILDER_ASSETS).

`finetune-operator run` runs as its own process with the production defaults (no test speed-ups),
logged in as its service account (RBAC of manifests/rbac). Requests are counted from the API
server's audit log (one line per request, with the user), so the operator's own requests are
told apart from the test kubelet's and the benchmark's; per-job figures use the namespace each
request names, and the operator's requests with no jobs at all are measured first (the background).

  (a) API requests per job per minute: 100 idle jobs (pods Pending forever), 100 Succeeded jobs,
      and Training jobs (pods running the fake worker, their logs followed, progress written at most
      every FINETUNE_RESYNC_SECONDS);
      the goal is 0 for idle and Succeeded, <= 60 / FINETUNE_RESYNC_SECONDS for Training. Also the
      server's own apiserver_request_total delta over the same window, all clients.
  (b) 500 jobs applied at once: per-job latency from the job's ADDED event to its training pod's,
      both on the watches of one observer process (so the delivery of a watch event counts on
      both ends, and the creating threads' GIL on neither), p50 and p99; operator CPU-seconds per
      job and the ratio to the API server's (+ etcd's) CPU-seconds over the same interval; the
      operator's requests per job. The same burst is served first by bench/floor.py (the operator's
      decisions and client with nothing else: no kopf, no caches, one task per job), the baseline of
      the same run: operator / floor says what the operator adds to what the server and this
      machine allow.
  (c) operator RSS per job (growth from the empty operator to all jobs present, over the jobs).
      (b) and (c)'s second figure use a fresh operator that serves only the 500 jobs' namespace.
  (d) operator log lines per job per hour at steady state (the idle window of (a)).

    KUBEBUILDER_ASSETS=/path/to/bin python bench/bench_apiserver.py [--idle 100] [--done 100]
        [--training 10] [--scale 500] [--window 60]

Without the assets it says why and exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "realapi"))
sys.path.insert(0, str(REPO / "tests"))

from controlplane import OPERATOR_USER, ApiClient, ControlPlane, assets_dir, cpu_seconds, wait_for  # noqa: E402
from kubelet import RealApiKubelet  # noqa: E402
from operator_proc import OperatorProcess, audit_events, audit_offset  # noqa: E402

from fakeworker import fake_worker_bin  # noqa: E402
from finetune_api import contract  # noqa: E402

SMALL = {"dataset": {"inline": [{"question": "q", "answer": "a"}]}, "resources": {"gpus": 1}}
GHOST_NODE = "bench-node"  # pods the benchmark plays the kubelet for are bound here (no kubelet)


def job(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": name}, "spec": spec}


def create_jobs(api: ApiClient, ns: str, names: list[str], spec: dict[str, Any]) -> None:
    """Create the jobs from 16 threads ("applied at once")."""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: api.create(job(name, spec), ns, plural=contract.PLURAL), names))


def count_requests(cp: ControlPlane, start: int, end: int) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Audit events in [start, end) bytes: (operator requests by namespace, all requests by user)."""
    by_ns: collections.Counter[str] = collections.Counter()
    by_user: collections.Counter[str] = collections.Counter()
    for offset, ev in audit_events(cp.audit_log, start):
        if offset > end:
            break
        user = ev.get("user", {}).get("username", "?")
        by_user[f"{user} [{str(ev.get('userAgent', '?')).split('/')[0]}]"] += 1
        if user == OPERATOR_USER:
            by_ns[(ev.get("objectRef") or {}).get("namespace") or "(cluster)"] += 1
    return by_ns, by_user


def operator_requests(cp: ControlPlane, start: int, ns: str, end: int | None = None) -> collections.Counter[str]:
    """The operator's requests in namespace `ns` in audit bytes [start, end), by "verb resource[/subresource]"."""
    out: collections.Counter[str] = collections.Counter()
    for offset, ev in audit_events(cp.audit_log, start):
        if end is not None and offset > end:
            break
        ref = ev.get("objectRef") or {}
        if ev.get("user", {}).get("username") == OPERATOR_USER and ref.get("namespace") == ns:
            sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
            out[f"{ev.get('verb')} {ref.get('resource')}{sub}"] += 1
    return out


def server_counter(api: ApiClient, name: str, by: str | None = None) -> collections.Counter[str]:
    """The API server's counter `name` from its /metrics, summed per value of label `by` (all
    under "" without one)."""
    out: collections.Counter[str] = collections.Counter()
    for line in api.request("GET", "/metrics", raw=True).splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            key = labels.split(f'{by}="', 1)[1].split('"', 1)[0] if by and f'{by}="' in labels else ""
            out[key] += int(float(value))
    return out


def request_total(api: ApiClient) -> float:
    return sum(server_counter(api, "apiserver_request_total").values())


def finish_like_a_kubelet(api: ApiClient, ns: str, names: list[str]) -> None:
    """Bind each job's pending pod to the kubelet-less node and report it completed (train, then export)."""
    summaries = {"train": {"result": "completed", "step": 10, "checkpoint": "checkpoint-10", "message": "done"},
                 "export": {"result": "completed", "export": "/workspace/export", "formats": ["sentence-transformers"],
                            "maxDeviation": 0.0, "metrics": {}, "message": "exported"}}  # fmt: skip
    finished: set[str] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pods = api.list("v1", "pods", ns)
        for pod in pods:
            name = pod["metadata"]["name"]
            if name in finished:
                continue
            if not pod["spec"].get("nodeName"):
                api.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/binding", {
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": GHOST_NODE}})  # fmt: skip
            role = pod["metadata"]["labels"].get("finetune.dev/role", "train")
            c = pod["spec"]["containers"][0]
            api.patch("v1", "pods", ns, name, {"status": {"phase": "Succeeded", "containerStatuses": [{
                "name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(summaries[role]),
                                         "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}}}]}},
                      subresource="status")  # fmt: skip
            finished.add(name)
        jobs = api.list(contract.API_VERSION, contract.PLURAL, ns)
        if len(jobs) == len(names) and all((j.get("status") or {}).get("phase") == "Succeeded" for j in jobs):
            return
        time.sleep(1)
    raise TimeoutError(f"the jobs of {ns} did not all succeed")


def watch_adds(api: ApiClient, path: str, stop: threading.Event, seen: dict[str, float]) -> None:
    rv = api.request("GET", path)["metadata"]["resourceVersion"]
    while not stop.is_set():
        try:
            for ev in api.watch(path, rv, stop):
                rv = ev["object"]["metadata"].get("resourceVersion", rv)
                if ev["type"] == "ADDED":
                    seen.setdefault(ev["object"]["metadata"]["name"], time.monotonic())
        except Exception:
            if stop.wait(0.2):
                return


def observe_adds(api: ApiClient, ns: str, ready: Any, stop: Any, out: Any) -> None:
    """In a process of its own, so the 16 creating threads' GIL does not delay it: when this one
    observer saw each FineTuneJob and each pod of `ns` ADDED on its watches (monotonic clock,
    system-wide). Sends {"jobs": {name: t}, "pods": {name: t}} to `out` once `stop` is set."""
    seen: dict[str, dict[str, float]] = {"jobs": {}, "pods": {}}
    halt = threading.Event()
    paths = {"jobs": f"/apis/{contract.API_VERSION}/namespaces/{ns}/{contract.PLURAL}", "pods": f"/api/v1/namespaces/{ns}/pods"}
    threads = [threading.Thread(target=watch_adds, args=(api, path, halt, seen[k]), daemon=True) for k, path in paths.items()]
    for t in threads:
        t.start()
    time.sleep(1)
    ready.set()
    stop.wait()
    halt.set()
    out.put({k: dict(v) for k, v in seen.items()})


def apf_rejected(api: ApiClient) -> float:
    return sum(server_counter(api, "apiserver_flowcontrol_rejected_requests_total").values())


def terminated_watches(api: ApiClient) -> collections.Counter[str]:
    """apiserver_terminated_watchers_total by resource: watches the API server's watch cache ended
    because their client read too slowly (a Python watcher starved of CPU, say): each costs that
    client a new watch, and kopf a new LIST of everything it watches."""
    return server_counter(api, "apiserver_terminated_watchers_total", by="resource")


def burst(cp: ControlPlane, api: ApiClient, ns: str, n: int, cpu: Callable[[], float]) -> dict[str, Any]:
    """`n` jobs created at once in `ns`, served by the controller whose CPU-seconds `cpu` reads:
    latencies (job ADDED -> training pod ADDED), CPU, requests per job, all from one run."""
    rejected0, offset, terminated0 = apf_rejected(api), audit_offset(cp.audit_log), terminated_watches(api)
    fork = multiprocessing.get_context("fork")
    ready, stop, out = fork.Event(), fork.Event(), fork.Queue()
    observer = fork.Process(target=observe_adds, args=(api, ns, ready, stop, out), daemon=True)
    observer.start()
    ready.wait(30)
    cpu0, cpu_as0, cpu_etcd0 = cpu(), cp.apiserver_cpu_seconds(), cp.etcd_cpu_seconds()
    t0 = time.monotonic()
    names = [f"s-{i:04d}" for i in range(n)]
    create_jobs(api, ns, names, SMALL)
    t_created = time.monotonic()
    wait_for(lambda: len(api.list("v1", "pods", ns)) >= n, 600, 0.5, what=f"{n} training pods in {ns}")

    def settled() -> bool:
        return all((j.get("status") or {}).get("attempts") for j in api.list(contract.API_VERSION, contract.PLURAL, ns))

    wait_for(settled, 600, 1, what=f"every job's status in {ns} with its first attempt")
    t_all = time.monotonic()
    time.sleep(5)  # trailing Events
    used, cpu_as, cpu_etcd = cpu() - cpu0, cp.apiserver_cpu_seconds() - cpu_as0, cp.etcd_cpu_seconds() - cpu_etcd0
    stop.set()
    seen = out.get(timeout=30)
    observer.join(10)
    lat = [seen["pods"][f"{name}-train-1"] - seen["jobs"][name] for name in names
           if f"{name}-train-1" in seen["pods"] and name in seen["jobs"]]  # fmt: skip
    reqs = operator_requests(cp, offset, ns)
    terminated = terminated_watches(api) - terminated0
    return {"n": len(lat), "p50": statistics.median(lat), "p99": pct(lat, 0.99), "max": max(lat),
            "create_s": t_created - t0, "all_s": t_all - t0, "cpu": used, "cpu_as": cpu_as, "cpu_etcd": cpu_etcd,
            "rejected": apf_rejected(api) - rejected0, "terminated": dict(terminated), "requests": f"{sum(reqs.values()) / n:.2f} ("
            + ", ".join(f"{k} {v / n:.2f}" for k, v in reqs.most_common()) + ")"}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle", type=int, default=100)
    p.add_argument("--done", type=int, default=100)
    p.add_argument("--training", type=int, default=10)
    p.add_argument("--scale", type=int, default=500)
    p.add_argument("--window", type=float, default=60.0, help="seconds of each counting window")
    args = p.parse_args()
    assets, reason = assets_dir()
    if assets is None:
        print(f"bench_apiserver: skipped: {reason}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="bench-apiserver-"))
    cp = ControlPlane(assets, root / "cp").start()
    kubelet_root = root / "kubelet"
    bin_dir = fake_worker_bin(root / "bin")
    namespaces = {"idle": "bench-idle", "done": "bench-done", "training": "bench-training", "scale": "bench-scale",
                  "floor": "bench-floor"}
    kubelet = RealApiKubelet(cp.client(user_agent="realapi-kubelet"), kubelet_root, cp.root / "pki", bin_dir)
    kubelet.unscheduled_namespaces.update({namespaces[k] for k in ("idle", "scale", "done", "floor")})
    api = cp.client(user_agent="bench")
    op: OperatorProcess | None = None
    try:
        kubelet.start()
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": GHOST_NODE}})
        for ns in namespaces.values():
            cp.create_namespace(ns)
        print(f"kube-apiserver {cp.version} (etcd + kube-apiserver{' + kube-controller-manager' if cp.has_gc else ''}"
              f" on loopback); operator: finetune-operator run, production defaults")  # fmt: skip
        op = OperatorProcess(cp, list(namespaces.values()), env={}, log=root / "operator.log")
        op.start(120)
        time.sleep(5)
        rss0 = op.rss()
        # background: the operator with no jobs at all
        a0, m0, t0 = audit_offset(cp.audit_log), request_total(api), time.monotonic()
        time.sleep(args.window / 2)
        a1, m1, t1 = audit_offset(cp.audit_log), request_total(api), time.monotonic()
        bg_ns, _bg_users = count_requests(cp, a0, a1)
        bg_rate = sum(bg_ns.values()) / ((t1 - t0) / 60)
        # (a) the population: idle, Succeeded, Training
        ws = kubelet.executor.pvc_dir
        for i in range(args.training):
            d = ws(f"{namespaces['training']}.train-{i:03d}-workspace")
            (d / "fake-worker.json").write_text(json.dumps({"steps": 10**6, "stepSeconds": 1.0}))
        create_jobs(api, namespaces["idle"], [f"idle-{i:03d}" for i in range(args.idle)], SMALL)
        create_jobs(api, namespaces["training"], [f"train-{i:03d}" for i in range(args.training)],
                    {**SMALL, "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"}})  # fmt: skip
        done_names = [f"done-{i:03d}" for i in range(args.done)]
        create_jobs(api, namespaces["done"], done_names, SMALL)
        finish_like_a_kubelet(api, namespaces["done"], done_names)
        wait_for(lambda: all((j.get("status") or {}).get("phase") == "Training" and (j["status"].get("progress") or {}).get("step")
                             for j in api.list(contract.API_VERSION, contract.PLURAL, namespaces["training"])), 180, 1,
                 what="the training jobs to report progress")  # fmt: skip
        wait_for(lambda: len(api.list("v1", "pods", namespaces["idle"])) >= args.idle, 120, 1, what="idle pods")
        time.sleep(10)  # settle: the last status writes and Events
        lines0 = op.log_lines()
        a2, m2, t2 = audit_offset(cp.audit_log), request_total(api), time.monotonic()
        time.sleep(args.window)
        a3, m3, t3 = audit_offset(cp.audit_log), request_total(api), time.monotonic()
        lines1 = op.log_lines()
        by_ns, by_user = count_requests(cp, a2, a3)
        minutes = (t3 - t2) / 60
        per_job = {k: by_ns.get(namespaces[k], 0) / n / minutes
                   for k, n in (("idle", args.idle), ("done", args.done), ("training", args.training)) if n}  # fmt: skip
        jobs_now = args.idle + args.done + args.training
        print("\n(a) API requests per job per minute, from the audit log (operator's user only)")
        print(f"    background (operator, no jobs):      {bg_rate:8.1f} requests/min  {dict(bg_ns)}")
        for k, v in per_job.items():
            resync = float(os.environ.get("FINETUNE_RESYNC_SECONDS") or 5)
            goal = "goal 0" if k != "training" else f"goal <= 60/FINETUNE_RESYNC_SECONDS = {60 / resync:.0f}"
            reqs = operator_requests(cp, a2, namespaces[k], a3)
            detail = ", ".join(f"{r} {c / getattr(args, k) / minutes:.2f}" for r, c in reqs.most_common())
            print(f"    {k:9s} ({getattr(args, k):3d} jobs):              {v:8.2f} requests/job/min   ({goal})"
                  + (f"  [{detail}]" if detail else ""))  # fmt: skip
        other = sum(by_ns.values()) - sum(by_ns.get(namespaces[k], 0) for k in per_job)
        print(f"    operator requests naming no job namespace: {other / minutes:.1f}/min; "
              f"all clients by user [agent]: { {u: round(c / minutes, 1) for u, c in by_user.items()} } per min")
        print(f"    apiserver_request_total delta: {(m3 - m2) / minutes:.1f}/min with {jobs_now} jobs vs "
              f"{(m1 - m0) / ((t1 - t0) / 60):.1f}/min with none (all clients, includes this benchmark's scrapes)")
        print(f"\n(d) operator log lines per job per hour at steady state: "
              f"{(lines1 - lines0) / max(jobs_now, 1) / ((t3 - t2) / 3600):.1f}  ({lines1 - lines0} lines in {t3 - t2:.0f} s, "
              f"{jobs_now} jobs)")
        rss1 = op.rss()
        cpu_a = op.cpu_seconds()
        op.kill()
        # (b) 500 jobs applied at once: first to the floor (bench/floor.py), then to a fresh operator
        # serving only their namespace (the population of (a) would otherwise keep it busy: that is
        # (a)'s figure, not this one's)
        floor = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floor.py")), namespaces["floor"]],
                                 env={**os.environ, "KUBECONFIG": str(cp.kubeconfig_path("operator"))},
                                 stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            assert floor.stdout is not None and floor.stdout.readline().strip() == b"watching", "bench/floor.py did not start"
            fb = burst(cp, api, namespaces["floor"], args.scale, lambda: cpu_seconds(floor.pid))
        finally:
            floor.kill()
            floor.wait(10)
        op = OperatorProcess(cp, [namespaces["scale"]], env={}, log=root / "operator-scale.log")
        op.start(120)
        time.sleep(5)
        rss_b0 = op.rss()
        ob = burst(cp, api, namespaces["scale"], args.scale, op.cpu_seconds)
        print(f"\n(b) {args.scale} jobs applied at once (16 concurrent creates), job ADDED -> training pod ADDED on one "
              f"observer's watches (today's goal: the operator's p99 <= 1 s)")  # fmt: skip
        for who, b in (("floor", fb), ("operator", ob)):
            print(f"    {who:8s} p50 {b['p50']:.3f} s, p99 {b['p99']:.3f} s, max {b['max']:.3f} s ({b['n']} jobs; "
                  f"created in {b['create_s']:.1f} s, all written in {b['all_s']:.1f} s); CPU {b['cpu'] / args.scale * 1000:.1f} "
                  f"ms/job = {b['cpu'] / max(b['cpu_as'], 1e-9):.2f} x kube-apiserver's {b['cpu_as']:.1f} s (etcd "
                  f"{b['cpu_etcd']:.1f} s); requests per job {b['requests']}; watches the server ended as too slow "
                  f"to read: {b['terminated'] or 0}")  # fmt: skip
        print(f"    operator / floor: p50 {ob['p50'] / fb['p50']:.2f}, p99 {ob['p99'] / fb['p99']:.2f}; requests rejected by "
              f"API Priority and Fairness: {fb['rejected'] + ob['rejected']:.0f}")  # fmt: skip
        rss2 = op.rss()
        print(f"\n(c) operator RSS: {rss0 / 2**20:.0f} MiB empty -> {rss1 / 2**20:.0f} MiB with the {jobs_now} jobs of (a): "
              f"{(rss1 - rss0) / max(jobs_now, 1) / 1024:.0f} KiB per job; {rss_b0 / 2**20:.0f} MiB empty -> {rss2 / 2**20:.0f} MiB "
              f"with the {args.scale} of (b): {(rss2 - rss_b0) / args.scale / 1024:.0f} KiB per job")
        print(f"    (operator CPU over (a), {jobs_now} jobs for {(t3 - t0) / 60:.1f} min: {cpu_a:.1f} s)")
        return 0
    finally:
        if op is not None:
            op.kill()
        kubelet.close()
        cp.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
