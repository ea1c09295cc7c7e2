"""The LoRA sample on a real node (tier 4) against `finetune-operator local` on the same machine.

The cluster is tier 4's (tests/node/clusters.py): the harness's one-node cluster from
KUBEBUILDER_ASSETS (kubelet, containerd, runc, the images of `make images`), or an existing
context (FINETUNE_E2E_CONTEXT, e.g. kind). The operator is installed from manifests/kind.

  (a) apply -> condition Succeeded of the LoRA sample as shipped (manifests/samples/...lora.yaml),
      divided by `finetune-operator local` of the same file, run first in the same process: what a
      real node (scheduling, the image's start-up, the volume, two pods) adds to the same work;
  (b) SIGTERM to exit inside the container: a longer run of the sample (maxSteps raised) has its
      training pod deleted mid-run; from the deletion (the pod's deletionTimestamp less its grace
      period) to the container's state.terminated.finishedAt (both of second resolution), and on
      this host's clock from `kubectl delete` returning to the watch seeing the container end;
  (c) steps lost to that deletion: the step the worker stopped at (its termination message, or its
      log's last progress line if later) minus the step of the checkpoint the next attempt resumed
      from (goal 0).

    KUBEBUILDER_ASSETS=... FINETUNE_NODE_PAUSE=... FINETUNE_NODE_IMAGES=... python bench/bench_node.py
        [--max-steps 200] [--timeout 900]

Without a cluster it says why and exits 0 (nothing to measure). Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "node"))
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402
from clusters import open_cluster, source  # noqa: E402
from kube import SAMPLE, Cluster, PodWatch, kubectl_bin, parse_time, sample_job, wait_until  # noqa: E402

JOB = "faq-minilm-lora"


def local_run(timeout: float) -> float:
    """Wall seconds of `finetune-operator local` of the sample as shipped."""
    cli = Path(sys.executable).parent / "finetune-operator"
    with tempfile.TemporaryDirectory(prefix="bench-node-local-") as d:
        start = time.monotonic()
        proc = subprocess.run([str(cli), "local", str(SAMPLE), "--workdir", d], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"finetune-operator local failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return took


def namespace(c: Cluster, name: str) -> str:
    c.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def node_run(c: Cluster, ns: str, timeout: float) -> float:
    """Seconds from `kubectl apply` of the sample as shipped to its condition Succeeded."""
    doc = yaml.safe_load(SAMPLE.read_text())
    start = time.monotonic()
    c.apply(doc, ns)
    c.kubectl("-n", ns, "wait", "--for=condition=Succeeded", f"finetunejob/{JOB}", f"--timeout={timeout:.0f}s",
              timeout=timeout + 30)  # fmt: skip
    return time.monotonic() - start


class LogFollow:
    """`kubectl logs -f` of one pod: the worker's progress steps as it prints them."""

    def __init__(self, c: Cluster, ns: str, pod: str) -> None:
        argv = [
            kubectl_bin(),
            f"--kubeconfig={c.kubeconfig}",
            f"--context={c.context}",
            "-n",
            ns,
            "logs",
            "-f",
            pod,
        ]
        self.steps: list[int] = []
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "progress" and isinstance(doc.get("step"), int):
                    self.steps.append(doc["step"])

    def close(self) -> None:
        self._thread.join(30)  # the stream ends with the container
        self._proc.kill()


def sigterm_run(c: Cluster, ns: str, max_steps: int) -> dict[str, Any]:
    c.apply(sample_job(max_steps), ns)
    pod = f"{JOB}-train-1"

    def stepping() -> bool:
        st = c.status(ns, JOB)
        step = (st.get("progress") or {}).get("step")
        return isinstance(step, int) and step >= 3 and bool((st.get("checkpoint") or {}).get("name"))

    wait_until(stepping, 600, "training steps and a checkpoint")
    follow = LogFollow(c, ns, pod)
    watch = PodWatch(c, ns, pod)
    time.sleep(2)  # the follow is attached
    c.kubectl("-n", ns, "delete", "pod", pod, "--wait=false")
    deleted_here = time.monotonic()
    term = wait_until(watch.terminated, 300, "the container to end", interval=0.05)
    seen_here = time.monotonic()
    deleted = watch.first(lambda p: bool(p["metadata"].get("deletionTimestamp")))
    watch.close()
    follow.close()
    meta = (deleted or {}).get("metadata") or {}
    requested = parse_time(meta["deletionTimestamp"]) - int(meta.get("deletionGracePeriodSeconds") or 0)
    st = wait_until(lambda: (s := c.status(ns, JOB)) and len(s.get("attempts") or []) >= 2 and s, 300,
                    "the next attempt")  # fmt: skip
    resumed = str(st["attempts"][1].get("resumedFrom") or "")
    resumed_step = int(resumed.rsplit("-", 1)[1]) if resumed.startswith("checkpoint-") else 0
    summary = json.loads(term.get("message") or "{}")
    # where the worker stopped: its termination message's step (the log's progress lines come at an
    # interval, so the last one printed can be a step behind)
    stopped_at = max([*follow.steps, int(summary.get("step") or 0)])
    c.kubectl("-n", ns, "delete", "finetunejob", JOB, "--wait=false")
    return {
        "exit": term.get("exitCode"), "summary": summary,
        "api_seconds": parse_time(term["finishedAt"]) - requested, "host_seconds": seen_here - deleted_here,
        "last_step": max(follow.steps or [0]), "stopped_at": stopped_at, "resumed": resumed,
        "lost": stopped_at - resumed_step,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=200, help="steps of the run whose pod is deleted")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    _, reason = source()
    if reason:
        print(f"bench_node: nothing to measure: {reason}")
        return 0
    print("(a) finetune-operator local of the LoRA sample ...", flush=True)
    local = local_run(args.timeout)
    print(f"    local: {local:.1f} s", flush=True)
    summary: dict[str, Any] = {}
    with open_cluster(summary) as c:
        print(f"cluster: {summary.get('cluster')}\nversions: {summary.get('versions')}\n"
              f"start-up: {summary.get('startup')}", flush=True)  # fmt: skip
        start = time.monotonic()
        c.install()
        print(
            f"install (kubectl apply -k manifests/kind, rollout): {time.monotonic() - start:.1f} s",
            flush=True,
        )
        node = node_run(c, namespace(c, "bench-node-a"), args.timeout)
        print(
            f"(a) apply -> Succeeded on the node: {node:.1f} s; node / local = {node / local:.2f}", flush=True
        )
        r = sigterm_run(c, namespace(c, "bench-node-b"), args.max_steps)
        print(f"(b) SIGTERM -> exit {r['exit']} inside the container: {r['api_seconds']:.0f} s by the API's "
              f"timestamps (1 s resolution), {r['host_seconds']:.2f} s from `kubectl delete` to the watch "
              f"seeing it end; summary {r['summary']}")  # fmt: skip
        print(f"(c) steps lost to the deletion: {r['lost']} (the worker stopped at step {r['stopped_at']}, "
              f"its log's last progress line {r['last_step']}; next attempt resumed from {r['resumed'] or 'nothing'}); goal 0")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
