"""The Kueue tier (4b): a real Kueue manager on a tier-3b control plane, out of cluster, on loopback.

When env `KUEUE_ASSETS` names a directory holding

    bin/kueue                         the manager (`cmd/kueue` of a Kueue release, v0.13 tested)
    crds/*.yaml                       its CRDs (`config/components/crd/bases`)
    config/webhook-manifests.yaml     its webhook configurations (`config/components/webhook/manifests.yaml`)

`KueueControlPlane.start()` starts a ControlPlane (controlplane.py) with those CRDs applied before
its kube-controller-manager (so its garbage collector knows Workloads from its first discovery: Kueue
leaves a deleted pod's Workload to the GC, and a Workload that lingers keeps its quota), then:

- makes the webhook server's certificate (127.0.0.1, signed by the control plane's CA) and the
  metrics certificate Kueue reads from the fixed path /etc/kueue/metrics/certs whatever its
  configuration says (cmd/kueue/main.go, with internal certificate management off). That path is
  given to Kueue alone: it runs in a private mount namespace (`unshare -m`) where an overlayfs over
  /etc adds `kueue/metrics/certs/`; the host's /etc is never touched. That needs root;
- writes Kueue's Configuration: webhooks on 127.0.0.1, internal certificate management off,
  VisibilityOnDemand off (its extra API server wants in-cluster credentials), leader election off,
  the `pod` integration only, `managedJobsNamespaceSelector` NotIn [kube-system, kueue-system],
  `manageJobsWithoutQueueName: false` (what a FineTuneJob install needs: README "Kueue");
- starts the manager and waits for its /readyz (the webhook server listens by then), and only
  then registers the webhooks Kueue's pod integration and its own API need, by URL
  (`clientConfig.url`, the CA as caBundle): every one is `failurePolicy: Fail`, so while Kueue is
  down every pod create in a managed namespace fails. `stop()` removes them before stopping Kueue.

Helpers create a ResourceFlavor, ClusterQueues, LocalQueues and WorkloadPriorityClasses. Without
the assets (or without root, unshare or overlayfs) `kueue_assets()` says why, and the tier skips.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from controlplane import ApiClient, ApiError, ControlPlane, _openssl, free_port, terminate, wait_for

KUEUE_ENV = "KUEUE_ASSETS"
KUEUE_API = "kueue.x-k8s.io/v1beta1"
KUEUE_NAMESPACE = "kueue-system"
FLAVOR = "default-flavor"
METRICS_CERTS = "kueue/metrics/certs"  # under /etc: where cmd/kueue reads its metrics certificate
# The webhooks of Kueue's own API and of the pod integration; the other integrations' are not needed.
WEBHOOK_RESOURCES = {"pods", "workloads", "clusterqueues", "resourceflavors", "cohorts"}
# config/components/webhook/kustomization.yaml: the pod webhooks skip Kueue's and the system namespace
POD_WEBHOOK_SELECTOR = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                              "values": ["kube-system", KUEUE_NAMESPACE]}]}  # fmt: skip
WEBHOOK_KINDS = {"MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
                 "ValidatingWebhookConfiguration": "validatingwebhookconfigurations"}  # fmt: skip


def kueue_assets() -> tuple[Path | None, str]:
    """The Kueue assets directory and "" when the tier can run; None and the reason otherwise."""
    raw = os.environ.get(KUEUE_ENV, "")
    if not raw:
        return None, (f"{KUEUE_ENV} not set: the Kueue tier needs a directory with bin/kueue, crds/ and "
                      "config/webhook-manifests.yaml of a Kueue release (v0.13), on top of KUBEBUILDER_ASSETS")  # fmt: skip
    path = Path(raw)
    if not os.access(path / "bin" / "kueue", os.X_OK):
        return None, f"{KUEUE_ENV}={raw}: no executable bin/kueue there"
    if not sorted((path / "crds").glob("*.yaml")):
        return None, f"{KUEUE_ENV}={raw}: no crds/*.yaml there"
    if not (path / "config" / "webhook-manifests.yaml").is_file():
        return None, f"{KUEUE_ENV}={raw}: no config/webhook-manifests.yaml there"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None, ("the Kueue tier runs Kueue in a private mount namespace (unshare -m, as root) to give it "
                      "its metrics certificate at /etc/kueue/metrics/certs without touching the host")  # fmt: skip
    if "overlay" not in Path("/proc/filesystems").read_text():
        return None, "the Kueue tier needs overlayfs (to add /etc/kueue/metrics/certs in Kueue's mount namespace)"
    return path, ""


def leaf_certificate(pki: Path, name: str, cn: str) -> tuple[Path, Path]:
    """`name.crt`/`name.key` for 127.0.0.1 and localhost, signed by the control plane's CA in `pki`."""
    (pki / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=pki)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=pki)  # fmt: skip
    return pki / f"{name}.crt", pki / f"{name}.key"


def kueue_configuration(webhook_port: int, metrics_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration for running out of cluster on loopback (module docstring)."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta1", "kind": "Configuration", "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "managedJobsNamespaceSelector": POD_WEBHOOK_SELECTOR,
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["pod"]},
    }  # fmt: skip


def webhook_configurations(manifests: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations for WEBHOOK_RESOURCES, served at `url` (clientConfig.url
    instead of a Service), names prefixed `kueue-`, the pod webhooks' namespaceSelector added."""
    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc or doc.get("kind") not in WEBHOOK_KINDS:
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            if not {r for rule in hook.get("rules") or [] for r in rule.get("resources") or []} & WEBHOOK_RESOURCES:
                continue
            hook["clientConfig"] = {"url": url + hook["clientConfig"]["service"]["path"], "caBundle": ca_bundle}
            if any("pods" in (rule.get("resources") or []) for rule in hook.get("rules") or []):
                hook["namespaceSelector"] = POD_WEBHOOK_SELECTOR
            hooks.append(hook)
        out.append({"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                    "metadata": {"name": "kueue-" + doc["metadata"]["name"]}, "webhooks": hooks})  # fmt: skip
    return out


class _ControlPlaneWithCrds(ControlPlane):
    """A ControlPlane that applies `crds` before it starts kube-controller-manager (its garbage
    collector learns resources at its first discovery, then only every 30 s)."""

    def __init__(self, assets: Path, root: Path, crds: Path) -> None:
        super().__init__(assets, root)
        self.crds = crds

    def _start_controllers(self) -> None:
        self.kubectl("apply", "--server-side", "-f", str(self.crds))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        super()._start_controllers()


assert hasattr(ControlPlane, "_start_controllers"), "controlplane.ControlPlane no longer starts its controllers apart"


class KueueControlPlane:
    """A tier-3b ControlPlane with Kueue on it (module docstring). `cp` is the control plane."""

    def __init__(self, k8s_assets: Path, kueue: Path, root: Path) -> None:
        self.assets = Path(kueue)
        self.root = Path(root)
        self.cp: ControlPlane = _ControlPlaneWithCrds(k8s_assets, self.root / "cp", self.assets / "crds")
        self.popen: subprocess.Popen[bytes] | None = None
        self.log = self.root / "kueue.log"
        self.webhooks: list[dict[str, Any]] = []
        self.version = ""
        self.health_port = 0

    def start(self, timeout: float = 90) -> KueueControlPlane:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cp.start(timeout)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        admin = self.cp.client()
        with contextlib.suppress(ApiError):  # Kueue's namespace (excluded from management)
            admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUEUE_NAMESPACE}})
        pki = self.cp.root / "pki"
        certs, etc_upper = self.root / "webhook-certs", self.root / "etc-upper"
        for d in (certs, etc_upper / METRICS_CERTS, self.root / "etc-work"):
            d.mkdir(parents=True, exist_ok=True)
        crt, key = leaf_certificate(pki, "kueue-webhook", "kueue-webhook")
        shutil.copy(crt, certs / "tls.crt")  # controller-runtime's names
        shutil.copy(key, certs / "tls.key")
        crt, key = leaf_certificate(pki, "kueue-metrics", "kueue-metrics")
        shutil.copy(crt, etc_upper / METRICS_CERTS / "tls.crt")
        shutil.copy(key, etc_upper / METRICS_CERTS / "tls.key")
        webhook_port, metrics_port, self.health_port = free_port(), free_port(), free_port()
        config = self.root / "kueue-config.yaml"
        config.write_text(yaml.safe_dump(kueue_configuration(webhook_port, metrics_port, self.health_port, certs)))
        # /etc/kueue/metrics/certs in a private mount namespace: an overlay over /etc whose upper
        # layer holds just that directory; nothing outside Kueue's namespace sees it
        mount = (f'mount -t overlay overlay -o "lowerdir=/etc,upperdir={etc_upper},workdir={self.root / "etc-work"}" '
                 '/etc && exec "$@"')  # fmt: skip
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh",
                str(self.assets / "bin" / "kueue"), f"--config={config}",
                f"--kubeconfig={self.cp.kubeconfig_path('admin')}"]  # fmt: skip
        self.popen = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, cwd=self.root,
                                      start_new_session=True)  # fmt: skip
        wait_for(self._ready, timeout, 0.2, what="Kueue /readyz")
        ca = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
        self.webhooks = webhook_configurations(self.assets / "config" / "webhook-manifests.yaml",
                                               f"https://127.0.0.1:{webhook_port}", ca)  # fmt: skip
        for hook in self.webhooks:  # only now: Kueue's webhook server listens (readyz checks it)
            admin.create(hook, plural=WEBHOOK_KINDS[hook["kind"]])
        self.version = self._version()
        self.create_flavor()

    def _ready(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"kueue exited {self.popen.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as resp:
                return int(resp.status) == 200
        except OSError:
            return False

    def _version(self) -> str:
        """The version the manager logs at start (`"gitVersion":"v0.13.1..."`)."""
        for line in self.log.read_text(errors="replace").splitlines():
            if '"gitVersion"' in line:
                return line.split('"gitVersion":"', 1)[1].split('"', 1)[0]
        return "?"

    def stop(self) -> None:
        admin = self.cp.client() if self.cp.server else None
        for hook in self.webhooks:  # first: with Kueue gone they would refuse every pod create
            with contextlib.suppress(ApiError, OSError):
                assert admin is not None
                admin.delete("admissionregistration.k8s.io/v1", WEBHOOK_KINDS[hook["kind"]], None,
                             hook["metadata"]["name"])  # fmt: skip
        self.webhooks = []
        if self.popen is not None:
            terminate(self.popen)
        self.popen = None
        self.cp.stop()

    # -- queues ----------------------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        plural = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues",
                  "WorkloadPriorityClass": "workloadpriorityclasses"}[obj["kind"]]  # fmt: skip
        return self.cp.client().create({"apiVersion": KUEUE_API, **obj}, plural=plural)

    def create_flavor(self) -> None:
        with contextlib.suppress(ApiError):
            self.create({"kind": "ResourceFlavor", "metadata": {"name": FLAVOR}})

    def cluster_queue(self, name: str, cpu: str, memory: str = "8Gi") -> dict[str, Any]:
        """A ClusterQueue over the default flavor with `cpu`/`memory` nominal quota, BestEffortFIFO,
        preempting lower priorities within itself (Kueue's usual setup for priority preemption)."""
        return self.create({"kind": "ClusterQueue", "metadata": {"name": name}, "spec": {
            "namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{"name": FLAVOR, "resources": [
                {"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": memory}]}]}]}})  # fmt: skip

    def set_cpu_quota(self, name: str, cpu: str, memory: str = "8Gi") -> None:
        self.cp.client().patch(KUEUE_API, "clusterqueues", None, name, {"spec": {"resourceGroups": [
            {"coveredResources": ["cpu", "memory"], "flavors": [{"name": FLAVOR, "resources": [
                {"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": memory}]}]}]}})  # fmt: skip

    def local_queue(self, namespace: str, name: str, cluster_queue: str) -> dict[str, Any]:
        return self.create({"kind": "LocalQueue", "metadata": {"name": name, "namespace": namespace},
                            "spec": {"clusterQueue": cluster_queue}})  # fmt: skip

    def priority_class(self, name: str, value: int) -> None:
        with contextlib.suppress(ApiError):  # one per session; 409 when a test made it already
            self.create({"kind": "WorkloadPriorityClass", "metadata": {"name": name}, "value": value,
                         "description": f"{name} priority (the Kueue tier)"})  # fmt: skip

    def wait_queue_active(self, name: str, timeout: float = 30) -> None:
        def active() -> bool:
            cq = self.cp.client().get(KUEUE_API, "clusterqueues", None, name) or {}
            return any(c.get("type") == "Active" and c.get("status") == "True"
                       for c in (cq.get("status") or {}).get("conditions") or [])  # fmt: skip

        wait_for(active, timeout, 0.1, what=f"ClusterQueue {name} Active")

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        return self.cp.client().list(KUEUE_API, "workloads", namespace)

    def cpu_seconds(self) -> float:
        from controlplane import cpu_seconds

        assert self.popen is not None
        return cpu_seconds(self.popen.pid)

    def rss(self) -> int:
        import psutil

        assert self.popen is not None
        return int(psutil.Process(self.popen.pid).memory_info().rss)

    def __enter__(self) -> KueueControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PodRecorder:
    """Every watch event of the pods of one namespace, stamped with the monotonic time it arrived
    (a thread; `close()` ends it): the tier's assertions on order ("no low pod started while a high
    one held the quota") and the benchmark's timings read it."""

    def __init__(self, api: ApiClient, namespace: str) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        rv = str(api.request("GET", f"/api/v1/namespaces/{namespace}/pods")["metadata"]["resourceVersion"])
        self._thread = threading.Thread(target=self._watch, args=(api, namespace, rv), daemon=True)
        self._thread.start()

    def _watch(self, api: ApiClient, namespace: str, rv: str) -> None:
        while not self._stop.is_set():
            try:
                for ev in api.watch(f"/api/v1/namespaces/{namespace}/pods", rv, self._stop):
                    if ev["type"] == "BOOKMARK":
                        rv = ev["object"]["metadata"]["resourceVersion"]
                        continue
                    if ev["type"] == "ERROR":
                        return
                    rv = ev["object"]["metadata"]["resourceVersion"]
                    with self._lock:
                        self.events.append((time.monotonic(), ev["type"], ev["object"]))
            except Exception:  # the server ended the stream: go on from the last version seen
                if self._stop.wait(0.2):
                    return

    def close(self) -> None:
        self._stop.set()

    def of(self, name: str) -> list[tuple[float, str, dict[str, Any]]]:
        with self._lock:
            return [e for e in self.events if e[2]["metadata"]["name"] == name]

    def first(self, name: str, predicate: Callable[[dict[str, Any]], bool]) -> tuple[float, dict[str, Any]] | None:
        """(time, pod) of the first event of pod `name` for which `predicate(pod)` holds."""
        return next(((t, pod) for t, _, pod in self.of(name) if predicate(pod)), None)

    def names(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys(e[2]["metadata"]["name"] for e in self.events))


def running(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def ended(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def ungated(pod: dict[str, Any]) -> bool:
    return not (pod.get("spec") or {}).get("schedulingGates")
