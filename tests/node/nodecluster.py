"""Tier 4: a one-node Kubernetes cluster assembled on this machine (root), for the scenario suite.

`NodeCluster` extends tier 3b's `ControlPlane` (tests/realapi/controlplane.py: the PKI, etcd,
kube-apiserver, tokens and kubeconfigs are the same code) into a real node:

- kube-apiserver on 0.0.0.0, advertising this machine's address (`nodehost.host_address`), which
  pods reach through the bridge's gateway and kube-proxy's DNAT of the `kubernetes` Service
  (10.96.0.1, in the serving certificate with the host address and `kubernetes.default.svc...`);
  service-account issuer and keys, so projected tokens work in pods; Node + RBAC authorization
  and NodeRestriction; a client certificate (system:masters) to reach the kubelet for `kubectl logs`;
- kube-controller-manager with every default controller (service-account tokens, the root CA
  ConfigMap, PV/PVC binding, garbage collection, node lifecycle, Deployments), kube-scheduler;
- containerd 1.6 of its own (config, root, state and socket under the run directory; CRI on,
  cgroupfs, overlayfs, the local pause image as sandbox image, CNI from /usr/lib/cni with this
  harness's conf dir), with the images of `make images` imported from `docker save` archives;
- a kubelet (cgroupfs, failCgroupV1: false, failSwapOn: false, x509 + webhook authentication and
  webhook authorization, node `finetune-node`), kube-proxy in iptables mode;
- bridge CNI (bridge `ftnode0`, host-local IPAM in 10.245.0.0/24, portmap; containerd adds the
  loopback plugin itself), and two FORWARD rules for the pod subnet (docker's FORWARD policy is DROP);
- storage: local PersistentVolumes (directories mode 0777 under the run directory, nodeAffinity to
  the node) under a default StorageClass `local` with WaitForFirstConsumer (a kind cluster has
  kind's own local-path provisioner instead).

`stop()` undoes all of it, whatever state it is in (nodehost.py): pods deleted through the API so
the kubelet tears their networks down, processes stopped, containerd's tasks and shims killed,
kube-proxy's rules removed with `kube-proxy --cleanup`, leftover network namespaces, mounts, the
bridge, the FORWARD rules and the kubelet's cgroups removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

_REALAPI = str(Path(__file__).resolve().parents[1] / "realapi")
if _REALAPI not in sys.path:
    sys.path.insert(0, _REALAPI)

import nodehost  # noqa: E402
from controlplane import ApiError, ControlPlane, Proc, free_port, sign_certificate, terminate, wait_for  # noqa: E402

NODE = "finetune-node"
BRIDGE = "ftnode0"
POD_CIDR = "10.245.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
DNS_BINARY = (
    "kube-dns"  # optional in KUBEBUILDER_ASSETS: cluster DNS (kubernetes/dns vendors its dependencies)
)
RULE_COMMENT = "finetune-node tier 4"
LOCK_FILE = "/run/finetune-node.lock"
PAUSE_TAG = "localhost/finetune-node/pause:local"
STORAGE_CLASS = "local"
BINARIES = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")
HOST_TOOLS = ("containerd", "runc", "ctr", "iptables", "ip", "mount", "umount", "conntrack", "openssl")
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
PAUSE_ENV = "FINETUNE_NODE_PAUSE"
IMAGES_ENV = "FINETUNE_NODE_IMAGES"
CNI_ENV = "FINETUNE_NODE_CNI_BIN"


def node_assets(images: tuple[str, ...]) -> tuple[dict[str, Path] | None, str]:
    """What the harness needs, or None and the first thing missing (cheap: no archive is opened)."""
    raw = os.environ.get("KUBEBUILDER_ASSETS", "")
    if not raw:
        return None, ("KUBEBUILDER_ASSETS not set: tier 4 needs a directory with kube-apiserver, etcd, "
                      "kube-controller-manager, kube-scheduler, kubelet and kube-proxy (README: Development and tests)")  # fmt: skip
    assets = Path(raw)
    missing = [b for b in BINARIES if not os.access(assets / b, os.X_OK)]
    if missing:
        return (
            None,
            f"KUBEBUILDER_ASSETS={raw}: no executable {', '.join(missing)} there (tier 4 runs a real node)",
        )
    if os.geteuid() != 0:
        return None, "tier 4 starts containerd, a kubelet and kube-proxy: it must run as root"
    path = nodehost.HOST_PATH + ":" + os.environ.get("PATH", "")
    tools = [t for t in HOST_TOOLS if not shutil.which(t, path=path)]
    if tools:
        return (
            None,
            f"tier 4 needs {', '.join(tools)} (Debian: containerd, runc, iptables, conntrack, openssl)",
        )
    cni = Path(os.environ.get(CNI_ENV, "/usr/lib/cni"))
    plugins = [p for p in CNI_PLUGINS if not os.access(cni / p, os.X_OK)]
    if plugins:
        return (
            None,
            f"no CNI plugin {', '.join(plugins)} in {cni} (Debian: containernetworking-plugins; or {CNI_ENV})",
        )
    pause = os.environ.get(PAUSE_ENV, "")
    if not pause or not Path(pause).is_file():
        return None, (f"{PAUSE_ENV} not set or not a file: tier 4 needs a static pause binary for the pod sandbox "
                      "image (README: Development and tests)")  # fmt: skip
    image_dir = os.environ.get(IMAGES_ENV, "")
    if not image_dir or not list(Path(image_dir).glob("*.tar")):
        return None, (f"{IMAGES_ENV} not set or holds no *.tar: tier 4 needs `docker save` archives of "
                      f"{' and '.join(images)} (make images)")  # fmt: skip
    return {"assets": assets, "cni": cni, "pause": Path(pause), "images": Path(image_dir)}, ""


class NodeCluster(ControlPlane):
    """etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet and kube-proxy on this
    machine (module docstring). `start()` returns when the node is Ready and the storage exists."""

    context = NODE

    def __init__(self, found: dict[str, Path], images: tuple[str, ...], volumes: int = 10,
                 root: Path | None = None) -> None:  # fmt: skip
        super().__init__(
            found["assets"], root or Path(tempfile.mkdtemp(prefix="finetune-node-", dir="/var/tmp"))
        )
        self._remove_root = root is None  # after the unmounts (ControlPlane.stop would remove it first)
        self.found = found
        self.images = images
        self.volumes = volumes
        self.host_ip = nodehost.host_address()
        for who in ("kubelet", "proxy", "scheduler"):
            self.tokens[who] = f"{who}-" + os.urandom(12).hex()
        self.argv: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {}
        self.versions: dict[str, str] = {}
        self._netns_before: set[str] = set()
        self._chains_before: set[tuple[str, str, str]] = set()
        self._started_node = False
        self._lock: Any = None
        # a short path: containerd's socket (and its .ttrpc twin) must fit a unix socket's 108 bytes
        self.run_dir = Path(tempfile.mkdtemp(prefix="ftnode-", dir="/run"))
        self.has_dns = os.access(self.assets / DNS_BINARY, os.X_OK)

    def start(self, timeout: float = 90) -> NodeCluster:
        # one node per machine: the bridge, the pod subnet, kube-proxy's chains and the kubelet's
        # cgroups are the machine's
        self._lock = open(LOCK_FILE, "w")  # noqa: SIM115 (held for the node's life, closed by stop)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self._remove_root:
                shutil.rmtree(self.root, ignore_errors=True)
            raise RuntimeError(f"another tier-4 node runs on this machine (it holds {LOCK_FILE})") from None
        super().start(timeout)
        return self

    # -- what tier 3b's ControlPlane asks of a subclass ---------------------------------------------

    def serving_sans(self) -> tuple[str, ...]:
        names = (
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
        return ("IP:127.0.0.1", f"IP:{self.host_ip}", f"IP:{KUBERNETES_SERVICE_IP}", "DNS:localhost",
                *(f"DNS:{n}" for n in names))  # fmt: skip

    def user_name(self, who: str) -> str:
        return {"kubelet": f"system:node:{NODE}", "proxy": "system:kube-proxy",
                "scheduler": "system:kube-scheduler"}.get(who) or super().user_name(who)  # fmt: skip

    def token_lines(self) -> list[str]:
        return [*super().token_lines(),
                f'{self.tokens["kubelet"]},system:node:{NODE},kubelet-uid,"system:nodes"',
                f"{self.tokens['proxy']},system:kube-proxy,proxy-uid",
                f"{self.tokens['scheduler']},system:kube-scheduler,scheduler-uid"]  # fmt: skip

    def apiserver_args(self, etcd_url: str) -> list[str]:
        pki = self.root / "pki"
        sign_certificate(
            pki, "apiserver-kubelet-client", "/CN=kube-apiserver-kubelet-client/O=system:masters"
        )
        flags = dict(a.removeprefix("--").split("=", 1) for a in super().apiserver_args(etcd_url))
        for key in [k for k in flags if k.startswith("audit-")]:
            del flags[key]  # tier 4 counts nothing: no audit log to write on two cores
        flags.update({
            "bind-address": "0.0.0.0", "advertise-address": self.host_ip,
            "service-cluster-ip-range": SERVICE_CIDR,
            "service-account-issuer": "https://kubernetes.default.svc.cluster.local",
            "authorization-mode": "Node,RBAC", "enable-admission-plugins": "NodeRestriction",
            "kubelet-client-certificate": str(pki / "apiserver-kubelet-client.crt"),
            "kubelet-client-key": str(pki / "apiserver-kubelet-client.key"),
        })  # fmt: skip
        return [f"--{k}={v}" for k, v in flags.items()]

    def _start_controllers(self) -> None:
        pki = self.root / "pki"
        self._daemon("kube-controller-manager", [
            str(self.assets / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig_path('admin')}",
            "--leader-elect=false", "--secure-port=0", "--controllers=*",
            f"--root-ca-file={pki / 'ca.crt'}", f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--concurrent-gc-syncs=5",
        ])  # fmt: skip
        self._daemon("kube-scheduler", [
            str(self.assets / "kube-scheduler"), f"--kubeconfig={self.kubeconfig_path('scheduler')}",
            "--leader-elect=false", "--secure-port=0",
        ])  # fmt: skip

    def _install(self) -> None:
        """The node, instead of tier 3b's CRDs and RBAC: tier 4 installs from the manifests as users do."""
        self._started_node = True
        self._netns_before = nodehost.netns_names()
        self._chains_before = nodehost.chains("KUBE-") | nodehost.chains("CNI-")
        self._timed("containerd", self._start_containerd)
        self._timed("images", self._import_images)
        if self.has_dns:
            self._timed("cluster DNS", self._start_dns)
        self._timed("kubelet", self._start_kubelet)
        self._timed("kube-proxy", self._start_kube_proxy)
        self._timed("node Ready", self._wait_node_ready)
        self._timed("storage", self._create_storage)

    # -- the node ----------------------------------------------------------------------------------

    @property
    def containerd_socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def volume_root(self) -> Path:
        return self.root / "volumes"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PATH": nodehost.HOST_PATH + ":" + os.environ.get("PATH", "")}

    def _daemon(self, name: str, argv: list[str]) -> Proc:
        self.argv[name] = argv
        return self._spawn(name, argv, env=self._env())

    def _timed(self, what: str, step: Any) -> None:
        start = time.monotonic()
        step()
        self.timings[what] = round(time.monotonic() - start, 1)

    def _alive(self, name: str) -> Proc:
        proc = next(p for p in self.procs if p.name == name)
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.popen.returncode}:\n{self._tail(proc, 40)}")
        return proc

    def _start_containerd(self) -> None:
        d = self.root / "containerd"
        cni_conf = self.root / "cni" / "net.d"
        cni_conf.mkdir(parents=True)
        (cni_conf / "10-finetune-node.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": NODE,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.root / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=1))  # fmt: skip
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"
[{cri}]
  sandbox_image = "{PAUSE_TAG}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # no negative oom_score_adj where the machine withholds CAP_SYS_RESOURCE (runc init fails on it)
  restrict_oom_score_adj = {"true" if not nodehost.has_capability(nodehost.CAP_SYS_RESOURCE) else "false"}
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{self.run_dir / "runc"}"
[{cri}.cni]
  bin_dir = "{self.found["cni"]}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"""
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.toml").write_text(config)
        self._daemon("containerd", ["containerd", "--config", str(d / "config.toml"), "--log-level", "warn"])
        wait_for(lambda: self._alive("containerd") and self.ctr("version").returncode == 0, 60, 0.3,
                 what="containerd answering on its socket")  # fmt: skip
        self.versions["containerd"] = nodehost.run("containerd", "--version").stdout.split()[2]
        self.versions["runc"] = nodehost.run("runc", "--version").stdout.split()[2]

    def ctr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return nodehost.run("ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", *args, timeout=timeout)

    def _import_images(self) -> None:
        archives = [nodehost.pause_image_archive(self.found["pause"], PAUSE_TAG, self.root / "pause.tar")]
        found: set[str] = set()
        for archive in sorted(self.found["images"].glob("*.tar")):
            tags = set(nodehost.archive_tags(archive))
            if tags & set(self.images):
                archives.append(archive)
                found |= tags
        missing = [i for i in self.images if i not in found]
        if missing:
            raise LookupError(
                f"no `docker save` archive in {self.found['images']} holds {', '.join(missing)}"
            )
        for archive in archives:
            res = self.ctr("images", "import", "--no-unpack=false", str(archive))
            if res.returncode != 0:
                raise RuntimeError(f"ctr images import {archive}: {res.stderr}")
        listed = self.ctr("images", "ls", "-q").stdout.split()
        absent = [i for i in (*self.images, PAUSE_TAG) if nodehost.normalize_image(i) not in listed]
        if absent:
            raise RuntimeError(f"containerd lists no {', '.join(absent)} after the import: {listed}")

    def _start_kubelet(self) -> None:
        d = self.root / "kubelet"
        d.mkdir()
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": self.host_ip, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "resolvConf": "/etc/resolv.conf",
            "clusterDNS": [DNS_SERVICE_IP] if self.has_dns else [],
            "podLogsDir": str(self.root / "pod-logs"),
            "registerNode": True, "maxPods": 40, "serializeImagePulls": False,
            # the imported images cannot be pulled again: never collect them, and keep a shared
            # disk's level from evicting the scenarios' pods
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "shutdownGracePeriod": "0s", "rotateCertificates": False, "serverTLSBootstrap": False,
            "nodeStatusUpdateFrequency": "10s", "syncFrequency": "10s", "fileCheckFrequency": "20s",
        }  # fmt: skip
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        self._daemon("kubelet", [
            str(self.assets / "kubelet"), f"--config={d / 'config.yaml'}",
            f"--kubeconfig={self.kubeconfig_path('kubelet')}", f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'pki'}", f"--hostname-override={NODE}", f"--node-ip={self.host_ip}", "--v=1",
        ])  # fmt: skip

    def _start_dns(self) -> None:
        """kube-dns on this host (a free port of the host address) behind Service kube-system/kube-dns
        (10.96.0.10:53) with a hand-made EndpointSlice: pods resolve Services and a headless
        Service's pods (a gang's rendezvous) as in any cluster."""
        port = free_port()
        self._daemon("kube-dns", [
            str(self.assets / DNS_BINARY), f"--kubecfg-file={self.kubeconfig_path('admin')}",
            "--domain=cluster.local.", f"--dns-bind-address={self.host_ip}", f"--dns-port={port}",
            f"--healthz-port={free_port()}", "--v=1",
        ])  # fmt: skip
        admin = self.client(user_agent="finetune-node")
        ports = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": port},
                 {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": port}]  # fmt: skip
        admin.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {"k8s-app": "kube-dns"}},
                      "spec": {"clusterIP": DNS_SERVICE_IP, "ports": ports}})  # fmt: skip
        admin.create({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "kube-dns",
                                    "endpointslice.kubernetes.io/managed-by": "finetune-node.tests"}},
            "addressType": "IPv4", "endpoints": [{"addresses": [self.host_ip], "conditions": {"ready": True}}],
            "ports": [{"name": p["name"], "port": port, "protocol": p["protocol"]} for p in ports],
        }, plural="endpointslices")  # fmt: skip

    def _start_kube_proxy(self) -> None:
        # docker's FORWARD policy is DROP: pod-to-pod traffic on the bridge (br_netfilter) needs these
        for flag in ("-s", "-d"):
            nodehost.run("iptables", "-w", "-I", "FORWARD", "1", flag, POD_CIDR, "-m", "comment",
                         "--comment", RULE_COMMENT, "-j", "ACCEPT")  # fmt: skip
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig_path("proxy"))},
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE,
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "conntrack": {"maxPerCore": 0, "min": 0},
            "iptables": {"minSyncPeriod": "1s", "syncPeriod": "30s"},
        }  # fmt: skip
        (self.root / "kube-proxy.yaml").write_text(yaml.safe_dump(config))
        self._daemon(
            "kube-proxy", [str(self.assets / "kube-proxy"), f"--config={self.root / 'kube-proxy.yaml'}"]
        )

    def _wait_node_ready(self, timeout: float = 180) -> None:
        admin = self.client(user_agent="finetune-node")

        def ready() -> bool:
            for name in ("kubelet", "kube-proxy", "containerd"):
                self._alive(name)
            node = admin.get("v1", "nodes", None, NODE)
            conditions = {
                c["type"]: c["status"] for c in ((node or {}).get("status") or {}).get("conditions") or []
            }
            return conditions.get("Ready") == "True"

        wait_for(ready, timeout, 0.5, what=f"node {NODE} Ready")
        node = admin.get("v1", "nodes", None, NODE) or {}
        self.versions["kubelet"] = node.get("status", {}).get("nodeInfo", {}).get("kubeletVersion", "?")
        # the `kubernetes` Service's rules: pods log in through them
        wait_for(lambda: KUBERNETES_SERVICE_IP in nodehost.run("iptables", "-w", "-t", "nat", "-S").stdout,
                 60, 0.5, what="kube-proxy's rules for the kubernetes Service")  # fmt: skip

    def _create_storage(self) -> None:
        admin = self.client(user_agent="finetune-node")
        admin.create({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain",
        }, plural="storageclasses")  # fmt: skip
        for i in range(self.volumes):
            path = self.volume_root / f"pv-{i:02d}"
            path.mkdir(parents=True)
            path.chmod(0o777)  # like kind's local-path provisioner: any pod uid writes
            admin.create({
                "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{NODE}-pv-{i:02d}"},
                # a directory of the one node: every pod on it may share it (a gang's ReadWriteMany workspace)
                "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                         "local": {"path": str(path)},
                         "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                             {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}]}]}}},
            })  # fmt: skip

    # -- disruptions the scenarios cause -----------------------------------------------------------

    def restart(self, name: str, down_seconds: float = 0) -> None:
        """Stop one daemon (SIGTERM, as systemd would) and start it again with the same arguments.
        containerd's shims outlive it, so running containers keep running."""
        proc = next(p for p in self.procs if p.name == name)
        terminate(proc.popen, 30)
        self.procs.remove(proc)
        time.sleep(down_seconds)
        self._daemon(name, self.argv[name])
        if name == "containerd":
            wait_for(lambda: self._alive("containerd") and self.ctr("version").returncode == 0, 60, 0.3,
                     what="containerd answering again")  # fmt: skip

    # -- teardown ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Undo everything (module docstring); each step runs whatever the others did."""
        steps = [self._stop_control_loops, self._delete_pods, self._stop_node_daemons, self._clean_runtime,
                 super().stop, self._clean_host]  # fmt: skip
        errors = []
        for step in steps:
            start = time.monotonic()
            try:
                step()
            except Exception as e:  # keep tearing down: a half-started node leaves the most behind
                errors.append(f"{step.__name__}: {e}")
            self.timings[f"stop {step.__name__.strip('_')}"] = round(time.monotonic() - start, 1)
        if errors:
            print("tier 4 teardown:", "; ".join(errors), file=sys.stderr)

    def _stop_named(self, *names: str) -> None:
        for proc in [p for p in self.procs if p.name in names]:
            terminate(proc.popen, 20)
            self.procs.remove(proc)

    def _stop_control_loops(self) -> None:
        # no new pods while the old ones go: the scheduler and the controllers first
        self._stop_named("kube-scheduler", "kube-controller-manager")

    def _delete_pods(self) -> None:
        """Pods deleted at once while the kubelet runs: it stops their sandboxes, CNI DEL included."""
        if not self._started_node or not any(
            p.name == "kubelet" and p.popen.poll() is None for p in self.procs
        ):
            return
        admin = self.client(user_agent="finetune-node")
        with contextlib.suppress(OSError, ApiError):
            for pod in admin.list("v1", "pods"):
                meta = pod["metadata"]
                admin.delete("v1", "pods", meta["namespace"], meta["name"], grace_seconds=0)

        def gone() -> bool:
            with contextlib.suppress(OSError, ApiError):
                if admin.list("v1", "pods"):
                    return False
            return not (nodehost.netns_names() - self._netns_before)

        with contextlib.suppress(TimeoutError):
            wait_for(gone, 60, 0.5, what="every pod and its network namespace gone")

    def _stop_node_daemons(self) -> None:
        self._stop_named("kubelet", "kube-proxy")
        if self._started_node and "kube-proxy" in self.argv:
            nodehost.run(self.argv["kube-proxy"][0], "--cleanup", timeout=60)

    def _clean_runtime(self) -> None:
        if any(p.name == "containerd" and p.popen.poll() is None for p in self.procs):
            for task in self.ctr("tasks", "ls", "-q", timeout=30).stdout.split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, timeout=30)
            time.sleep(1)
            for task in self.ctr("tasks", "ls", "-q", timeout=30).stdout.split():
                self.ctr("tasks", "delete", "-f", task, timeout=30)
        self._stop_named("containerd")
        nodehost.kill_pids(nodehost.processes_with(f"-address {self.containerd_socket}"))

    def _clean_host(self) -> None:
        if self._started_node:
            self._clean_node_host()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._remove_root:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _clean_node_host(self) -> None:
        nodehost.delete_netns(nodehost.netns_names() - self._netns_before)
        nodehost.delete_iptables_rules(RULE_COMMENT)
        # what kube-proxy --cleanup leaves: the kubelet's KUBE-FIREWALL and canaries, portmap's CNI-HOSTPORT-*
        nodehost.delete_chains((nodehost.chains("KUBE-") | nodehost.chains("CNI-")) - self._chains_before)
        nodehost.delete_link(BRIDGE)
        nodehost.remove_cgroups("kubepods")
        nodehost.remove_empty_dirs(
            *(Path("/run/containerd") / d for d in ("s", "fifo")), Path("/run/containerd")
        )
        for d in (self.root, self.run_dir):
            left = nodehost.unmount_all(d)
            if left:
                raise RuntimeError(f"still mounted: {left[:5]}")

    # -- for the scenarios -------------------------------------------------------------------------

    def host_path(self, pv: dict[str, Any]) -> Path | None:
        local = (pv.get("spec") or {}).get("local") or {}
        return Path(local["path"]) if local.get("path") else None
