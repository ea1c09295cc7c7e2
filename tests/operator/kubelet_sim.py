"""A test kubelet: runs the pods created in the emulated API as local processes and reports back.

It uses the same LocalPodExecutor as `finetune-operator local` (one executor, two users). Like a
real kubelet it: starts each new pod once (restartPolicy is treated as Never), leaves a pod
Pending and Unschedulable while a PersistentVolumeClaim it mounts does not exist, writes
`status` (phase, startTime, containerStatuses with exit code, reason and termination message)
through the status subresource, serves the `log` subresource, and on deletion sends SIGTERM,
waits the grace period (terminationGracePeriodSeconds or the delete's gracePeriodSeconds), kills,
reports the final state and only then lets the API server remove the pod.

All its bookkeeping runs in the emulator's event loop; blocking executor calls run in threads.
Pods outside namespace `default` run under the local name `<namespace>.<name>`.
"""

from __future__ import annotations

import asyncio
import copy
import signal
import threading
from pathlib import Path
from typing import Any

from kube_emulator import FixedKubernetesEmulator, Res, now_rfc3339

from finetune_operator.executor import LocalPodExecutor

NODE_NAME = "local-kubelet"
EVICTION_MESSAGE = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 12Mi."


def local_name(namespace: str, name: str) -> str:
    return name if namespace == "default" else f"{namespace}.{name}"


class TestKubelet:
    """Runs the emulator's pods with a LocalPodExecutor under `root` (see the module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        emulator: FixedKubernetesEmulator,
        root: Path,
        loop: asyncio.AbstractEventLoop,
        bin_dir: Path | None = None,
    ) -> None:
        self.emulator = emulator
        self.loop = loop
        self.executor = LocalPodExecutor(root, bin_dir=bin_dir, on_exit=self._exited)
        self._pods_res = emulator.resource("v1", "pods")
        self._owned: dict[tuple[str, str], str] = {}  # (ns, name) -> local name; loop thread only
        self._waiting: dict[tuple[str, str], dict[str, Any]] = {}  # pods waiting for their PVCs
        self._evicted: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        emulator.kubelet = self
        emulator.add_listener(self._on_change)
        for pod in emulator.list_objects(self._pods_res):
            self._on_change(self._pods_res, "ADDED", pod)

    # -- the emulator's side (loop thread) -------------------------------------------------------

    def owns(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._owned

    def logs(self, namespace: str, name: str, tail_lines: int | None) -> str:
        return self.executor.logs(self._owned[(namespace, name)], tail_lines)

    def terminate(self, namespace: str, name: str, grace_seconds: float) -> None:
        local = self._owned.get((namespace, name))
        if local is not None:
            self._thread(self._terminate_blocking, namespace, name, local, grace_seconds)

    def _on_change(self, res: Res, etype: str, obj: dict[str, Any]) -> None:
        if self._closed:
            return
        if res.kind == "PersistentVolumeClaim" and etype == "ADDED":
            for pod in list(self._waiting.values()):
                self._consider(pod)
        if res.kind != "Pod" or etype == "DELETED":
            if res.kind == "Pod":
                self._waiting.pop((obj["metadata"]["namespace"], obj["metadata"]["name"]), None)
            return
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if (
            key not in self._owned
            and not meta.get("deletionTimestamp")
            and obj.get("status", {}).get("phase") == "Pending"
        ):
            self._consider(obj)

    def _consider(self, pod: dict[str, Any]) -> None:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        pvc_res = self.emulator.resource("v1", "persistentvolumeclaims")
        missing = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("spec", {}).get("volumes") or []
            if v.get("persistentVolumeClaim")
            and self.emulator.get_object(pvc_res, ns, v["persistentVolumeClaim"]["claimName"]) is None
        ]
        if missing:
            if (ns, name) not in self._waiting:
                self._waiting[(ns, name)] = pod
                message = f'persistentvolumeclaim "{missing[0]}" not found'
                self._write_status(ns, name, {"conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                     "lastTransitionTime": now_rfc3339()}]})  # fmt: skip
            return
        self._waiting.pop((ns, name), None)
        local = local_name(ns, name)
        self._owned[(ns, name)] = local
        manifest = copy.deepcopy(pod)
        manifest["metadata"]["name"] = local
        self._thread(self._start_blocking, ns, name, manifest)

    def _write_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        if self.emulator.get_object(self._pods_res, ns, name) is not None:
            self.emulator.patch_object(self._pods_res, ns, name, {"status": status}, subresource="status")

    def _sync(self, ns: str, name: str, local: str) -> None:
        """Copy the executor's view of the pod into its API status."""
        observed = self.executor.status(local)
        if observed is None:
            return
        ready = observed["phase"] == "Running"
        status: dict[str, Any] = {
            **observed,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": observed["startTime"]},
                {"type": "Initialized", "status": "True", "lastTransitionTime": observed["startTime"]},
                {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now_rfc3339(),
                 **({} if ready else {"reason": "PodCompleted" if observed["phase"] == "Succeeded" else "PodFailed"})},
            ],
        }  # fmt: skip
        if local in self._evicted:
            status.update(phase="Failed", reason="Evicted", message=EVICTION_MESSAGE)
            status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                                         "message": EVICTION_MESSAGE, "lastTransitionTime": now_rfc3339()})  # fmt: skip
        self._write_status(ns, name, status)

    # -- threads ---------------------------------------------------------------------------------

    def _thread(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"kubelet-{fn.__name__}")
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _in_loop(self, fn: Any, *args: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def _start_blocking(self, ns: str, name: str, manifest: dict[str, Any]) -> None:
        if self._closed:
            return
        self.executor.start(manifest)
        self._in_loop(self._bind_and_sync, ns, name, manifest["metadata"]["name"])

    def _bind_and_sync(self, ns: str, name: str, local: str) -> None:
        pod = self.emulator.get_object(self._pods_res, ns, name)
        if pod is not None and not pod.get("spec", {}).get("nodeName"):
            self.emulator.patch_object(self._pods_res, ns, name, {"spec": {"nodeName": NODE_NAME}})
        self._sync(ns, name, local)

    def _exited(self, local: str) -> None:  # the executor's callback, from its reaper thread
        self._in_loop(self._exited_in_loop, local)

    def _exited_in_loop(self, local: str) -> None:
        for (ns, name), owned in list(self._owned.items()):
            if owned == local:
                self._sync(ns, name, local)

    def _terminate_blocking(self, ns: str, name: str, local: str, grace_seconds: float) -> None:
        if self.executor.status(local) is not None:
            self.executor.signal(local, signal.SIGTERM)
            if not self.executor.wait(local, grace_seconds):
                self.executor.signal(local, signal.SIGKILL)
                self.executor.wait(local, 10)
        self._in_loop(self._finish_deletion, ns, name, local)

    def _finish_deletion(self, ns: str, name: str, local: str) -> None:
        self._sync(ns, name, local)
        self._owned.pop((ns, name), None)
        self._thread(self.executor.delete, local, 0)
        self.emulator.finish_pod_deletion(ns, name)

    # -- the tests' side (any thread) ------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL, namespace: str = "default") -> None:
        """Deliver a signal to the pod's process (SIGKILL: the whole container), as a node would."""
        self.executor.signal(local_name(namespace, name), sig)

    def oom_kill(self, name: str, namespace: str = "default") -> None:
        """Kill the pod as the kernel OOM killer does: exit 137, reason OOMKilled."""
        self.executor.oom_kill(local_name(namespace, name))

    def evict(self, name: str, namespace: str = "default", grace_seconds: float = 0) -> None:
        """Node-pressure eviction: stop the pod, then phase Failed, reason Evicted (the pod stays)."""
        local = local_name(namespace, name)
        self._evicted.add(local)
        self.executor.signal(local, signal.SIGTERM)
        if not self.executor.wait(local, grace_seconds):
            self.executor.signal(local, signal.SIGKILL)
            self.executor.wait(local, 10)
        self._in_loop(self._sync, namespace, name, local)

    def workspace(self, claim: str) -> Path:
        """The local directory standing for PersistentVolumeClaim `claim`."""
        return self.executor.pvc_dir(claim)

    def local_logs(self, name: str, namespace: str = "default", tail_lines: int | None = None) -> str:
        return self.executor.logs(local_name(namespace, name), tail_lines)

    def running(self) -> list[str]:
        """Local names of pods whose processes are still running."""
        return [n for n in self.executor.names() if (self.executor.status(n) or {}).get("phase") == "Running"]

    def close(self) -> None:
        """Kill every pod process and wait for the kubelet's threads."""
        self._closed = True
        self.executor.close()
        for t in list(self._threads):
            t.join(timeout=15)
