"""The tier-3b test kubelet against the real server, seen through kubectl: a pod is bound, runs,
logs through `kubectl logs`, ends with its exit code and termination message, and on `kubectl
delete` gets SIGTERM and its grace period before the pod is gone; a pod whose claim is missing
stays Pending, Unschedulable, until the claim exists."""

from __future__ import annotations

import sys
from typing import Any

from realenv import Env

SCRIPT = """
import os, signal, sys, time
def stop(*_):
    open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write("stopped by SIGTERM")
    print("got SIGTERM", flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("hello from the pod", flush=True)
if os.environ.get("EXIT_NOW"):
    open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write('{"result": "invalid"}')
    sys.exit(2)
time.sleep(120)
"""


def pod(name: str, env: dict[str, str] | None = None, claim: str | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "local", "command": [sys.executable, "-c", SCRIPT],
                                 "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}  # fmt: skip
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 20}
    if claim:
        spec["volumes"] = [{"name": "ws", "persistentVolumeClaim": {"claimName": claim}}]
        container["volumeMounts"] = [{"name": "ws", "mountPath": "/workspace"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def phase(env: Env, name: str) -> str:
    return str(((env.pod(name) or {}).get("status") or {}).get("phase"))


def test_pod_runs_logs_and_is_deleted_gracefully(env: Env) -> None:
    env.api.create(pod("runner"), env.ns)
    env.wait_for(lambda: phase(env, "runner") == "Running", 30, "the pod running")
    assert env.pod("runner")["spec"]["nodeName"] == "realapi-node"  # type: ignore[index]
    env.wait_for(lambda: "hello from the pod" in env.kubectl("logs", "runner").stdout, 30, "kubectl logs")
    env.kubectl("delete", "pod", "runner", "--wait=true", "--timeout=30s", timeout=40)
    assert env.pod("runner") is None
    assert "got SIGTERM" in env.kubelet.logs(env.ns, "runner")  # it had its grace period


def test_pod_exit_code_and_termination_message(env: Env) -> None:
    env.api.create(pod("quitter", {"EXIT_NOW": "1"}), env.ns)
    env.wait_for(lambda: phase(env, "quitter") == "Failed", 30, "the pod failed")
    state = env.pod("quitter")["status"]["containerStatuses"][0]["state"]["terminated"]  # type: ignore[index]
    assert state["exitCode"] == 2 and state["message"] == '{"result": "invalid"}'


def test_pod_waits_unschedulable_for_its_claim(env: Env) -> None:
    env.api.create(pod("waiter", claim="later"), env.ns)

    def unschedulable() -> bool:
        conds = ((env.pod("waiter") or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    env.wait_for(unschedulable, 30, "PodScheduled=False, Unschedulable")
    assert not env.pod("waiter")["spec"].get("nodeName")  # type: ignore[index]
    env.api.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "later"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
                   env.ns)  # fmt: skip
    env.wait_for(lambda: phase(env, "waiter") == "Running", 30, "the pod running once its claim exists")
    env.api.delete("v1", "pods", env.ns, "waiter", grace_seconds=0)
