"""A test kubelet: runs the pods created in the emulated API as local processes and reports back.

It uses the same LocalPodExecutor as `finetune-operator local` (one executor, two users). Like a
real kubelet it: starts each new pod once (restartPolicy is treated as Never), leaves a pod
Pending and Unschedulable while a PersistentVolumeClaim it mounts does not exist, writes
`status` (phase, startTime, containerStatuses with exit code, reason and termination message)
through the status subresource, serves the `log` subresource, and on deletion sends SIGTERM,
waits the grace period (terminationGracePeriodSeconds or the delete's gracePeriodSeconds), kills,
reports the final state and only then lets the API server remove the pod. It resolves
`secretKeyRef` env and `secret` volumes from the emulator's Secrets.

All its bookkeeping runs in the emulator's event loop; blocking executor calls run in threads.
Pods outside namespace `default` run under the local name `<namespace>.<name>`; a pod created while
its same-named predecessor is still terminating runs as `<name>~2` (each is tracked by uid).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import signal
import threading
from pathlib import Path
from typing import Any

from kube_emulator import FixedKubernetesEmulator
from kube_store import Res, now_rfc3339

from finetune_operator.local.executor import LocalPodExecutor

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
        self.executor = LocalPodExecutor(root, bin_dir=bin_dir, on_exit=self._exited, secrets=self._secret)
        self._pods_res = emulator.resource("v1", "pods")
        self._owned: dict[tuple[str, str], str] = {}  # (ns, name) -> local name, not terminating
        self._by_local: dict[str, tuple[str, str, str]] = {}  # local -> (ns, name, uid), until forgotten
        self._cancelled: set[str] = set()  # deleted before their process started
        self._locks: dict[str, threading.Lock] = {}  # local -> serializes start and termination
        self._waiting: dict[tuple[str, str], dict[str, Any]] = {}  # pods waiting for their PVCs
        self._evicted: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        emulator.kubelet = self
        emulator.add_listener(self._on_change)
        for pod in emulator.list_objects(self._pods_res):
            self._on_change(self._pods_res, "ADDED", pod)

    # -- the emulator's side (loop thread) -------------------------------------------------------

    def _secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded, as a kubelet hands it to secretKeyRef env and secret volumes."""
        secret = self.emulator.get_object(self.emulator.resource("v1", "secrets"), namespace, name)
        if secret is None:
            return None
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        data.update({k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()})
        return data

    def owns(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._owned

    def _local_of(self, namespace: str, name: str) -> str:
        """The local name of the pod's newest incarnation, terminating or not (KeyError if none)."""
        local = self._owned.get((namespace, name))
        if local is not None:
            return local
        for candidate, (ns, n, _) in reversed(list(self._by_local.items())):
            if (ns, n) == (namespace, name):
                return candidate
        raise KeyError(f"{namespace}/{name}")

    def logs(self, namespace: str, name: str, tail_lines: int | None) -> str:
        return self.executor.logs(self._local_of(namespace, name), tail_lines)

    def log_bytes(self, namespace: str, name: str, offset: int, tail_lines: int | None = None) -> tuple[bytes, int, bool]:
        return self.executor.log_bytes(self._local_of(namespace, name), offset, tail_lines)

    def terminate(self, namespace: str, name: str, grace_seconds: float) -> None:
        local = self._owned.pop((namespace, name), None)
        if local is not None:
            self._cancelled.add(local)
            self._thread(self._terminate_blocking, local, grace_seconds)
        elif grace_seconds == 0:  # a force delete of a pod already terminating: kill it now
            with contextlib.suppress(KeyError):
                self.executor.signal(self._local_of(namespace, name), signal.SIGKILL)

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
        known = key in self._owned or any(uid == meta["uid"] for *_, uid in self._by_local.values())
        if (
            not known
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
                condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                             "message": message, "lastTransitionTime": now_rfc3339()}  # fmt: skip
                self._write_status(ns, name, pod["metadata"]["uid"], {"conditions": [condition]})
            return
        self._waiting.pop((ns, name), None)
        base = local = local_name(ns, name)
        n = 1
        while local in self._by_local:  # the previous pod of this name is still terminating
            n += 1
            local = f"{base}~{n}"
        self._owned[(ns, name)] = local
        self._by_local[local] = (ns, name, pod["metadata"]["uid"])
        self._locks[local] = threading.Lock()
        manifest = copy.deepcopy(pod)
        manifest["metadata"]["name"] = local
        self._thread(self._start_blocking, manifest)

    def _write_status(self, ns: str, name: str, uid: str, status: dict[str, Any]) -> None:
        pod = self.emulator.get_object(self._pods_res, ns, name)
        if pod is not None and pod["metadata"]["uid"] == uid:
            self.emulator.patch_object(self._pods_res, ns, name, {"status": status}, subresource="status")

    def _sync(self, local: str) -> None:
        """Copy the executor's view of the pod into its API status."""
        owner = self._by_local.get(local)
        observed = self.executor.status(local)
        if owner is None or observed is None:
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
        self._write_status(*owner, status)

    # -- threads ---------------------------------------------------------------------------------

    def _thread(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"kubelet-{fn.__name__}")
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _in_loop(self, fn: Any, *args: Any) -> None:
        if not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self.loop.call_soon_threadsafe(fn, *args)

    def _start_blocking(self, manifest: dict[str, Any]) -> None:
        local = manifest["metadata"]["name"]
        with self._locks[local]:
            if self._closed or local in self._cancelled:
                return
            try:
                self.executor.start(manifest)
            except RuntimeError:  # the executor closed meanwhile (cluster shutdown)
                return
        self._in_loop(self._bind_and_sync, local)

    def _bind_and_sync(self, local: str) -> None:
        ns, name, uid = self._by_local.get(local, ("", "", ""))
        pod = self.emulator.get_object(self._pods_res, ns, name) if ns else None
        if pod is not None and pod["metadata"]["uid"] == uid and not pod.get("spec", {}).get("nodeName"):
            self.emulator.patch_object(self._pods_res, ns, name, {"spec": {"nodeName": NODE_NAME}})
        self._sync(local)

    def _exited(self, local: str) -> None:  # the executor's callback, from its reaper thread
        self._in_loop(self._sync, local)

    def _terminate_blocking(self, local: str, grace_seconds: float) -> None:
        with self._locks[local]:
            if self.executor.status(local) is not None:
                self.executor.signal(local, signal.SIGTERM)
                if not self.executor.wait(local, grace_seconds):
                    self.executor.signal(local, signal.SIGKILL)
                    self.executor.wait(local, 10)
        self._in_loop(self._finish_deletion, local)

    def _finish_deletion(self, local: str) -> None:
        self._sync(local)
        self.executor.delete(local, 0)  # the process is gone: this only forgets it
        ns, name, uid = self._by_local.pop(local)
        self._locks.pop(local, None)
        self._cancelled.discard(local)
        self._evicted.discard(local)
        self.emulator.finish_pod_deletion(ns, name, uid)

    # -- the tests' side (any thread) ------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL, namespace: str = "default") -> None:
        """Deliver a signal to the pod's process (SIGKILL: the whole container), as a node would."""
        self.executor.signal(self._local_of(namespace, name), sig)

    def oom_kill(self, name: str, namespace: str = "default") -> None:
        """Kill the pod as the kernel OOM killer does: exit 137, reason OOMKilled."""
        self.executor.oom_kill(self._local_of(namespace, name))

    def evict(self, name: str, namespace: str = "default", grace_seconds: float = 0) -> None:
        """Node-pressure eviction: stop the pod, then phase Failed, reason Evicted (the pod stays)."""
        local = self._local_of(namespace, name)
        self._evicted.add(local)
        self.executor.signal(local, signal.SIGTERM)
        if not self.executor.wait(local, grace_seconds):
            self.executor.signal(local, signal.SIGKILL)
            self.executor.wait(local, 10)
        self._in_loop(self._sync, local)

    def workspace(self, claim: str) -> Path:
        """The local directory standing for PersistentVolumeClaim `claim`."""
        return self.executor.pvc_dir(claim)

    def started(self, name: str, namespace: str = "default") -> bool:
        """Has the pod's process been started (it may have ended since)?"""
        try:
            return self.executor.status(self._local_of(namespace, name)) is not None
        except KeyError:
            return False

    def local_logs(self, name: str, namespace: str = "default", tail_lines: int | None = None) -> str:
        return self.executor.logs(self._local_of(namespace, name), tail_lines)

    def running(self) -> list[str]:
        """Local names of pods whose processes are still running."""
        return [n for n in self.executor.names() if (self.executor.status(n) or {}).get("phase") == "Running"]

    def close(self) -> None:
        """Kill every pod process and wait for the kubelet's threads."""
        self._closed = True
        self.executor.close()
        for t in list(self._threads):
            t.join(timeout=15)
