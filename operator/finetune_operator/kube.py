"""A small async Kubernetes API client (aiohttp) for the operator's own reads and writes.

kopf watches and keeps its bookkeeping through its own client; this one does what reconcile
plans: create children (409 = already there), list them by label, patch status, delete, read
pod log tails, post Events. No dependency on the kubernetes package.

Where to connect, first match wins:
  1. env FINETUNE_KUBE_SERVER: a plain URL, no auth (the tier-3 emulator, `kubectl proxy`);
  2. the in-cluster service account (KUBERNETES_SERVICE_HOST + the mounted token and CA);
  3. a kubeconfig (env KUBECONFIG or ~/.kube/config): current context's server, CA, and a
     token or client certificate. Exec plugins and auth providers are not supported.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

SERVER_ENV = "FINETUNE_KUBE_SERVER"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class KubeConfig:
    server: str
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    temp_files: list[str] = field(default_factory=list)

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def _data_file(data: str, cfg: KubeConfig) -> str:
    fd, path = tempfile.mkstemp(prefix="finetune-kube-")
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data))
    cfg.temp_files.append(path)
    return path


def _from_kubeconfig(path: Path) -> KubeConfig:
    doc = yaml.safe_load(path.read_text()) or {}
    ctx_name = doc.get("current-context")
    ctx = next((c["context"] for c in doc.get("contexts") or [] if c.get("name") == ctx_name), None)
    if ctx is None:
        raise RuntimeError(f"{path}: no current-context")
    cluster = next(c["cluster"] for c in doc.get("clusters") or [] if c.get("name") == ctx.get("cluster"))
    user = next((u.get("user") or {} for u in doc.get("users") or [] if u.get("name") == ctx.get("user")), {})
    cfg = KubeConfig(server=str(cluster["server"]).rstrip("/"), token=user.get("token"),
                     insecure=bool(cluster.get("insecure-skip-tls-verify")))  # fmt: skip
    if cluster.get("certificate-authority-data"):
        cfg.ca_file = _data_file(cluster["certificate-authority-data"], cfg)
    elif cluster.get("certificate-authority"):
        cfg.ca_file = str(cluster["certificate-authority"])
    for key, attr in (("client-certificate", "cert_file"), ("client-key", "key_file")):
        if user.get(f"{key}-data"):
            setattr(cfg, attr, _data_file(user[f"{key}-data"], cfg))
        elif user.get(key):
            setattr(cfg, attr, str(user[key]))
    return cfg


def load_config() -> KubeConfig:
    """Find the API server (see the module docstring).

    Raises:
        RuntimeError: no server found.
    """
    if os.environ.get(SERVER_ENV):
        return KubeConfig(server=os.environ[SERVER_ENV].rstrip("/"))
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if host and (SA_DIR / "token").is_file():
        host = f"[{host}]" if ":" in host else host
        return KubeConfig(server=f"https://{host}:{port}", token=(SA_DIR / "token").read_text().strip(),
                          ca_file=str(SA_DIR / "ca.crt"))  # fmt: skip
    path = Path(os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or Path.home() / ".kube" / "config")
    if path.is_file():
        return _from_kubeconfig(path)
    raise RuntimeError(
        f"no Kubernetes API server: set {SERVER_ENV}, run in a cluster, or provide a kubeconfig"
    )


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:  # fmt: skip
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name)}"
    if subresource:
        base += f"/{subresource}"
    return base


_PLURALS = {"Pod": "pods", "PersistentVolumeClaim": "persistentvolumeclaims", "Event": "events"}


class Kube:
    """The API client. Use as `async with Kube() as kube:` or call `close()`."""

    def __init__(self, config: KubeConfig | None = None) -> None:
        self.config = config or load_config()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Accept": "application/json", "User-Agent": "finetune-operator"}
            if self.config.token:
                headers["Authorization"] = f"Bearer {self.config.token}"
            connector = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=64)
            self._session = aiohttp.ClientSession(headers=headers, timeout=TIMEOUT, connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json", text: bool = False) -> Any:  # fmt: skip
        """One API call; returns the decoded JSON (or text). Raises ApiError on a non-2xx answer."""
        data = None if body is None else json.dumps(body)
        async with self._ensure().request(method, self.config.server + path, params=params, data=data,
                                          headers={"Content-Type": content_type}) as resp:  # fmt: skip
            raw = await resp.text()
            if resp.status >= 400:
                try:
                    doc = json.loads(raw)
                    reason, message = str(doc.get("reason", "")), str(doc.get("message", raw))
                except ValueError:
                    reason, message = resp.reason or "", raw
                raise ApiError(resp.status, reason, message[:500])
            if text:
                return raw
            return json.loads(raw) if raw else {}

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False when it already exists (409), True when created."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], _PLURALS.get(obj["kind"], obj["kind"].lower() + "s"),
                             meta.get("namespace"))  # fmt: skip
        try:
            await self.request("POST", path, body=obj)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def get(
        self, api_version: str, plural: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return dict(await self.request("GET", resource_path(api_version, plural, namespace, name)))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, api_version: str, plural: str, namespace: str | None,
                   labels: dict[str, str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        doc = await self.request("GET", resource_path(api_version, plural, namespace), params=params)
        return list(doc.get("items") or [])

    async def patch(self, api_version: str, plural: str, namespace: str | None, name: str, body: dict[str, Any],
                    *, subresource: str | None = None) -> dict[str, Any]:  # fmt: skip
        """A JSON merge patch (of the status subresource when `subresource="status"`)."""
        return dict(await self.request("PATCH", resource_path(api_version, plural, namespace, name, subresource),
                                       body=body, content_type="application/merge-patch+json"))  # fmt: skip

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str,
                     grace_seconds: int | None = None) -> bool:  # fmt: skip
        """Delete (background propagation); False when it was already gone."""
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            await self.request("DELETE", resource_path(api_version, plural, namespace, name), body=body)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def pod_log(self, namespace: str, name: str, tail_lines: int = 40) -> str:
        """The last `tail_lines` lines of the pod's log ("" when it has none yet)."""
        try:
            return str(await self.request("GET", resource_path("v1", "pods", namespace, name, "log"),
                                          params={"tailLines": str(tail_lines)}, text=True))  # fmt: skip
        except ApiError as e:
            if e.status in (400, 404):
                return ""
            raise
