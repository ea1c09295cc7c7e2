"""Operator control-plane latency and memory against the emulated API server (tier-3 harness).

For each size N (default 1, 100, 500) it starts a fresh emulated API server (no kubelet: pods stay
Pending, so only the control plane is measured), runs `finetune-operator run` as its own process
(so its RSS is the operator's alone), creates N FineTuneJobs back to back and records, from the
API server's own change feed, the time from each job's create call to the creation of its
training pod. It prints p50/p99 of that latency per N, the ratio of each p50 to the single-job
p50 measured in the same run (the baseline), the operator's RSS growth per job and its CPU time
per job (user+system, including the status writes and Events that follow the pod's creation).
Then, with every job idle (pods Pending forever), it counts for `--idle` seconds the HTTP requests
the emulator serves (only the operator talks HTTP to it) and the operator's log lines: requests
per job per minute and log lines per job per hour at steady state (goal: 0 for both).
The emulated API server runs in this process, single-threaded, and at 500 jobs it is the
bottleneck (the operator process waits on it most of the time): read the latencies at scale as
an upper bound, and the CPU per job as the operator's own cost.

    python bench/bench_operator.py [--sizes 1,100,500] [--timeout 600] [--idle 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "operator"))
sys.path.insert(0, str(REPO / "tests"))

import psutil  # noqa: E402
from harness import Cluster, finetune_job  # noqa: E402

SPEC = {"dataset": {"inline": [{"question": "q", "answer": "a"}]}, "resources": {"gpus": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(n: int, timeout: float, idle: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        log = Path(tmp) / "operator.log"
        cluster = Cluster(Path(tmp), kubelet=False).start()
        pod_seen: dict[str, float] = {}
        all_seen = threading.Event()

        def on_change(res: Any, etype: str, obj: dict[str, Any]) -> None:
            name = obj.get("metadata", {}).get("name", "")
            if res.plural == "pods" and etype == "ADDED" and name.endswith("-train-1"):
                pod_seen.setdefault(name[: -len("-train-1")], time.perf_counter())
                if len(pod_seen) >= n:
                    all_seen.set()

        cluster.call(cluster.api.add_listener, on_change)
        port = free_port()
        env = {**os.environ, "FINETUNE_KUBE_SERVER": cluster.url}
        exe = Path(sys.executable).with_name("finetune-operator")
        with log.open("w") as out:
            proc = subprocess.Popen([str(exe), "run", "--namespace", "default", "--liveness-port", str(port),
                                     "--metrics-port", "0"], env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            cluster.wait_for(lambda: healthy(port), 60, what="operator liveness")
            time.sleep(1.0)
            ps = psutil.Process(proc.pid)
            rss_before = ps.memory_info().rss
            cpu_before = sum(ps.cpu_times()[:2])
            created: dict[str, float] = {}
            t0 = time.perf_counter()
            for i in range(n):
                name = f"job-{i:04d}"
                created[name] = time.perf_counter()
                cluster.create(finetune_job(name, SPEC))
            create_seconds = time.perf_counter() - t0
            if not all_seen.wait(timeout):
                raise TimeoutError(f"only {len(pod_seen)}/{n} training pods after {timeout}s")
            total = time.perf_counter() - t0
            time.sleep(2.0)  # let status writes and events settle before reading memory
            rss_after = ps.memory_info().rss
            cpu = sum(ps.cpu_times()[:2]) - cpu_before
            t_idle, lines_before = time.monotonic(), len(log.read_text().splitlines())
            time.sleep(idle)
            idle_requests = len(cluster.requests(t_idle))
            idle_lines = len(log.read_text().splitlines()) - lines_before
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            cluster.stop()
    latencies = [pod_seen[k] - created[k] for k in created]
    return {
        "n": n,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "create_seconds": create_seconds,
        "total": total,
        "rss_before": rss_before,
        "rss_per_job": (rss_after - rss_before) / n,
        "cpu_ms_per_job": 1000 * cpu / n,
        "idle_requests_per_job_minute": idle_requests / n * 60 / idle,
        "idle_lines_per_job_hour": idle_lines / n * 3600 / idle,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,100,500")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--idle", type=float, default=20, help="seconds of idle steady state to count requests and logs")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if sizes[0] != 1:
        sizes.insert(0, 1)  # the baseline
    results = [measure(n, args.timeout, args.idle) for n in sizes]
    base = results[0]["p50"]
    print(f"{'jobs':>5} {'p50 s':>8} {'p99 s':>8} {'max s':>8} {'p50/1-job':>10} {'creates s':>10} "
          f"{'all pods s':>11} {'RSS idle MiB':>13} {'RSS/job KiB':>12} {'CPU ms/job':>11} {'idle req/job/min':>17} "
          f"{'idle lines/job/h':>17}")  # fmt: skip
    for r in results:
        print(f"{r['n']:>5} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['max']:>8.3f} {r['p50'] / base:>10.1f} "
              f"{r['create_seconds']:>10.2f} {r['total']:>11.2f} {r['rss_before'] / 2**20:>13.1f} "
              f"{r['rss_per_job'] / 1024:>12.1f} {r['cpu_ms_per_job']:>11.1f} "
              f"{r['idle_requests_per_job_minute']:>17.2f} {r['idle_lines_per_job_hour']:>17.1f}")  # fmt: skip
    print("latency: create call -> training pod created, seen in the API server's change feed; "
          "baseline: the 1-job p50 of this run")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
