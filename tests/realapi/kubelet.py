"""A test kubelet (and scheduler) for tier 3b that speaks the real API and runs pods locally.

It uses the project's LocalPodExecutor, as the local runner and the tier-3 emulator kubelet do
(one executor, three users). Against a real kube-apiserver it behaves as the scheduler plus a
kubelet of one node:

- registers Node `realapi-node` (Ready, InternalIP 127.0.0.1, kubelet port = its log server);
- watches every pod; an unscheduled pod without scheduling gates (Kueue's admission gate: the
  scheduler leaves a gated pod alone) whose PersistentVolumeClaims all exist is bound to the
  node through `pods/binding` (one whose claim is missing gets PodScheduled=False Unschedulable,
  as the scheduler says it, and is retried when claims appear);
- starts a pod bound to the node once, writes `pods/status` (Running; then the terminated state
  with exit code, reason and termination message) as a strategic merge patch, as the kubelet does
  (so the conditions others set stay);
- honours deletion: SIGTERM, waits the deletion's grace period, SIGKILL, reports the final
  state, then removes the pod with gracePeriodSeconds=0 (uid precondition), as a kubelet does;
- serves `containerLogs` over HTTPS for `kubectl logs` / `pods/log` (the API server proxies to
  the node's InternalIP and kubelet port); `logs_available = False` makes it answer 503, which is
  how a node whose kubelet is unreachable looks to the API server's clients;
- leaves the pods of `unscheduled_namespaces` Pending and unscheduled (a cluster without room),
  for scale tests and the benchmark, where hundreds of pod processes would measure this machine.

Claims map to directories `pvcs/<namespace>.<claim>/` of the executor; pods run as
`<namespace>.<name>.<uid prefix>` so same-named pods never collide.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import http.server
import queue
import signal
import ssl
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from controlplane import ApiClient, ApiError

from finetune_operator.local.executor import LocalPodExecutor, read_log_bytes

NODE_NAME = "realapi-node"
FOLLOW_POLL = 0.1  # seconds between looks at a followed pod's log file


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _LogHandler(http.server.BaseHTTPRequestHandler):
    kubelet: RealApiKubelet

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if not self.kubelet.logs_available:
            self._answer(503, "kubelet log endpoint unavailable (test outage)")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._answer(404, "not found")
            return
        query = urllib.parse.parse_qs(url.query)
        tail = int(query["tailLines"][0]) if "tailLines" in query else None
        limit = int(query["limitBytes"][0]) if "limitBytes" in query else None
        self.kubelet.log_requests += 1
        try:
            text = self.kubelet.logs(parts[1], parts[2], tail)
        except KeyError:
            self._answer(404, f"pod {parts[1]}/{parts[2]} is not running on this node")
            return
        if query.get("follow", [""])[0] in ("true", "1"):
            self._follow(parts[1], parts[2], tail)
            return
        data = text.encode()
        if limit is not None:
            data = data[:limit]
        self._answer(200, data)

    def _follow(self, namespace: str, name: str, tail: int | None) -> None:
        """`follow=true`: the tail, then what the pod writes, until it ends (HTTP/1.0: the body ends
        when the connection closes). A log outage set meanwhile cuts the stream."""
        self.kubelet.log_streams[(namespace, name)] += 1
        data, offset, ended = self.kubelet.log_bytes(namespace, name, 0, tail)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        try:
            self.wfile.write(data)
            self.wfile.flush()
            while not ended and self.kubelet.logs_available and not self.kubelet.closing():
                time.sleep(FOLLOW_POLL)
                data, offset, ended = self.kubelet.log_bytes(namespace, name, offset)
                if data:
                    self.wfile.write(data)
                    self.wfile.flush()
        except (OSError, KeyError):  # the reader went away (SSL EOF, reset) or the pod did
            pass

    def _answer(self, code: int, body: str | bytes) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # quiet
        pass


class RealApiKubelet:
    """Scheduler + kubelet of one node against a real API server (see the module docstring)."""

    __test__ = False

    def __init__(self, api: ApiClient, root: Path, pki: Path, bin_dir: Path | None = None) -> None:
        self.api = api
        self.executor = LocalPodExecutor(root, bin_dir=bin_dir, on_exit=self._exited)
        self.logs_available = True
        self.log_requests = 0
        self.log_streams: collections.Counter[tuple[str, str]] = collections.Counter()  # follow=true, by pod
        self.unscheduled_namespaces: set[str] = set()  # pods there stay Pending: nothing schedules them
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._pods: dict[str, dict[str, Any]] = {}  # uid -> last seen pod
        self._local: dict[str, str] = {}  # uid -> local name, once started, until the pod is gone
        self._ran: dict[str, str] = {}  # uid -> local name, kept (tests read a deleted pod's log)
        self._by_key: dict[tuple[str, str], str] = {}  # (ns, name) -> uid of the newest started
        self._terminating: set[str] = set()
        self._unschedulable: set[str] = set()
        self._threads: list[threading.Thread] = []
        handler = type("Handler", (_LogHandler,), {"kubelet": self})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki / "serving.crt"), str(pki / "serving.key"))
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = int(self._httpd.server_address[1])

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RealApiKubelet:
        self._spawn(self._httpd.serve_forever, "kubelet-logs")
        self._register_node()
        self._spawn(self._watch_pods, "kubelet-watch")
        self._spawn(self._work, "kubelet-work")
        return self

    def close(self) -> None:
        self._stop.set()
        self._queue.put(("stop", None))
        self.executor.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:  # daemons; the watch may sit in a read until the server ends it
            t.join(timeout=2 if t.name == "kubelet-watch" else 15)

    def _spawn(self, fn: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _register_node(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME, "labels": {
            "kubernetes.io/hostname": NODE_NAME}}}  # fmt: skip
        with contextlib.suppress(ApiError):
            self.api.create(node)
        self.api.patch("v1", "nodes", None, NODE_NAME, {"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE_NAME}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000", "nvidia.com/gpu": "8"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000", "nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test kubelet",
                            "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}]}},
            subresource="status")  # fmt: skip

    # -- watching --------------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    listing = self.api.request("GET", "/api/v1/pods")
                    rv = listing["metadata"]["resourceVersion"]
                    for pod in listing["items"]:
                        self._queue.put(("pod", ("ADDED", pod)))
                for event in self.api.watch("/api/v1/pods", rv, self._stop):
                    if event["type"] == "ERROR":
                        rv = ""  # 410 Gone: relist
                        break
                    rv = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._queue.put(("pod", (event["type"], event["object"])))
            except Exception:  # the server closed the stream, or stopped: retry (relist) unless stopping
                if self._stop.wait(0.5):
                    return
                rv = ""

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                kind, item = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._retry_unschedulable()
                continue
            try:
                if kind == "pod":
                    self._on_pod(*item)
                elif kind == "sync":
                    self._sync(item)
                elif kind == "stop":
                    return
            except ApiError:
                pass  # a conflict or a pod gone meanwhile: the next event brings the truth
            except OSError:
                if self._stop.is_set():
                    return

    def _on_pod(self, etype: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if etype == "DELETED":
            self._pods.pop(uid, None)
            self._unschedulable.discard(uid)
            local = self._local.pop(uid, None)
            if local is not None and uid not in self._terminating:  # force-deleted under us: kill it
                self._spawn(self.executor.delete, "kubelet-kill", local, 0)
            return
        self._pods[uid] = pod
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            if meta.get("deletionTimestamp") or meta["namespace"] in self.unscheduled_namespaces:
                return
            if (pod.get("spec") or {}).get("schedulingGates"):  # as the scheduler: a gated pod waits (Kueue)
                return
            self._schedule(pod)
        elif node == NODE_NAME:
            if meta.get("deletionTimestamp"):
                if uid not in self._terminating:
                    self._terminating.add(uid)
                    self._spawn(self._terminate, "kubelet-terminate", pod)
            elif uid not in self._local:
                self._run(pod)

    # -- the scheduler's part ----------------------------------------------------------------------

    def _schedule(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        missing = [
            v["persistentVolumeClaim"]["claimName"]
            for v in (pod.get("spec") or {}).get("volumes") or []
            if v.get("persistentVolumeClaim")
            and self.api.get("v1", "persistentvolumeclaims", ns, v["persistentVolumeClaim"]["claimName"]) is None
        ]
        if missing:
            if uid not in self._unschedulable:
                self._unschedulable.add(uid)
                message = f'0/1 nodes are available: persistentvolumeclaim "{missing[0]}" not found.'
                self.api.patch("v1", "pods", ns, name, {"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                    "lastTransitionTime": _now()}]}}, subresource="status")  # fmt: skip
            return
        self._unschedulable.discard(uid)
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "uid": uid},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}}  # fmt: skip
        try:
            self.api.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/binding", binding)
        except ApiError as e:
            if e.status != 409:  # 409: already bound
                raise

    def _retry_unschedulable(self) -> None:
        for uid in list(self._unschedulable):
            pod = self._pods.get(uid)
            if pod is None:
                self._unschedulable.discard(uid)
                continue
            with contextlib.suppress(ApiError, OSError):
                self._schedule(pod)

    # -- the kubelet's part ------------------------------------------------------------------------

    def _run(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns, uid = meta["namespace"], meta["uid"]
        local = f"{ns}.{meta['name']}.{uid[:8]}"
        manifest = {**pod, "metadata": {**meta, "name": local}, "spec": dict(pod["spec"])}
        manifest["spec"]["volumes"] = [
            {**v, "persistentVolumeClaim": {**v["persistentVolumeClaim"],
                                           "claimName": f"{ns}.{v['persistentVolumeClaim']['claimName']}"}}
            if v.get("persistentVolumeClaim") else v
            for v in pod["spec"].get("volumes") or []
        ]  # fmt: skip
        self._local[uid] = local
        self._ran[uid] = local
        self._by_key[(ns, meta["name"])] = uid
        try:
            self.executor.start(manifest)
        except RuntimeError:  # closed meanwhile
            return
        self._sync(uid)

    def _exited(self, local: str) -> None:  # from the executor's reaper thread
        uid = next((u for u, n in list(self._local.items()) if n == local), None)
        if uid is not None:
            self._queue.put(("sync", uid))

    def _status_of(self, uid: str) -> dict[str, Any] | None:
        local, pod = self._local.get(uid), self._pods.get(uid)
        observed = self.executor.status(local) if local else None
        if observed is None or pod is None:
            return None
        container = pod["spec"]["containers"][0]
        cstatus = {**observed["containerStatuses"][0], "name": container["name"],
                   "image": container.get("image") or "local", "imageID": "", "started": observed["phase"] == "Running"}  # fmt: skip
        ready = observed["phase"] == "Running"
        since = observed["startTime"]
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": since},
            {"type": "Initialized", "status": "True", "lastTransitionTime": since},
            {"type": "ContainersReady", "status": "True" if ready else "False", "lastTransitionTime": _now()},
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": _now()},
        ]
        return {**observed, "containerStatuses": [cstatus], "conditions": conditions,
                "hostIP": "127.0.0.1", "podIP": "127.0.0.1"}  # fmt: skip

    def _sync(self, uid: str) -> None:
        status = self._status_of(uid)
        pod = self._pods.get(uid)
        if status is None or pod is None:
            return
        meta = pod["metadata"]
        body = {"metadata": {"uid": uid}, "status": status}  # uid: never write over a newer pod of that name
        # a strategic merge patch, as the kubelet sends: conditions merge by type, so those others
        # set (Kueue's TerminationTarget, DisruptionTarget) stay
        with contextlib.suppress(ApiError):
            self._pods[uid] = self.api.patch("v1", "pods", meta["namespace"], meta["name"], body, subresource="status",
                                             content_type="application/strategic-merge-patch+json")  # fmt: skip

    def _terminate(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid, local = meta["uid"], self._local.get(meta["uid"])
        grace = float(meta.get("deletionGracePeriodSeconds") or 0)
        if local is not None and self.executor.status(local) is not None:
            self.executor.signal(local, signal.SIGTERM)
            if not self.executor.wait(local, grace):
                self.executor.signal(local, signal.SIGKILL)
                self.executor.wait(local, 10)
            with contextlib.suppress(ApiError, OSError):
                self._sync(uid)
        with contextlib.suppress(ApiError, OSError):
            self.api.delete("v1", "pods", meta["namespace"], meta["name"], grace_seconds=0, uid=uid)
        if local is not None:
            self.executor.delete(local, 0)  # the process is gone: this only forgets it

    # -- the tests' side ---------------------------------------------------------------------------

    def _local_of(self, namespace: str, name: str) -> str:
        uid = self._by_key.get((namespace, name))
        local = self._ran.get(uid or "")
        if local is None:
            raise KeyError(f"{namespace}/{name} was not started here")
        return local

    def logs(self, namespace: str, name: str, tail_lines: int | None = None) -> str:
        """The pod's log (also after the pod was deleted: its directory stays until the session ends)."""
        local = self._local_of(namespace, name)
        try:
            return self.executor.logs(local, tail_lines)
        except KeyError:
            text = (self.executor.pod_dir(local) / "log").read_text(errors="replace")
            return text if tail_lines is None else "".join(text.splitlines(keepends=True)[-tail_lines:])

    def closing(self) -> bool:
        return self._stop.is_set()

    def log_bytes(self, namespace: str, name: str, offset: int,
                  tail_lines: int | None = None) -> tuple[bytes, int, bool]:  # fmt: skip
        """As executor.log_bytes, also for a deleted pod (its log is complete)."""
        local = self._local_of(namespace, name)
        try:
            return self.executor.log_bytes(local, offset, tail_lines)
        except KeyError:
            return (*read_log_bytes(self.executor.pod_dir(local) / "log", offset, tail_lines), True)

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Deliver a signal to the pod's process (SIGKILL: the whole container), as a node would."""
        self.executor.signal(self._local_of(namespace, name), sig)

    def workspace(self, namespace: str, claim: str) -> Path:
        """The local directory standing for PersistentVolumeClaim `namespace/claim`."""
        return self.executor.pvc_dir(f"{namespace}.{claim}")

    def started(self, namespace: str, name: str) -> bool:
        try:
            return self.executor.status(self._local_of(namespace, name)) is not None
        except KeyError:
            return False

    def wait_idle(self, timeout: float = 5) -> None:
        """Wait until the work queue is drained (a best effort for tests)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
