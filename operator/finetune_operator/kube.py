"""The operator's API client: kubernetes_asyncio under a thin wrapper that keeps plans readable.

kubernetes_asyncio (the official OpenAPI generator's async client, released with each Kubernetes
minor) does everything under the wrapper: kubeconfig loading (contexts, CA and client certificates,
tokens, exec credential plugins, OIDC), the in-cluster service account (its token file is re-read
as the kubelet rotates it), TLS and the HTTP session. The wrapper only names the five calls reconcile
plans need: create (409 = already there), get (None on 404), list by labels, JSON merge patch
(status subresource included), delete, and a followed pod log. Requests go through
`ApiClient.call_api` with the response unread, so a log that happens to be JSON is not mangled
by the generated deserializer.

Where to connect, first match wins:
  1. env FINETUNE_KUBE_SERVER: a plain URL, no auth (the tier-3 emulator, `kubectl proxy`);
  2. the in-cluster service account (KUBERNETES_SERVICE_HOST, the mounted token and CA);
  3. a kubeconfig (env KUBECONFIG or ~/.kube/config), current context, as kubectl reads it.

kopf logs in with the same credentials: `credentials()` turns the loaded configuration into what
its login handler returns (handlers.login), with an expiration so kopf logs in again when a
token is due to rotate.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import os
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config.config_exception import ConfigException

SERVER_ENV = "FINETUNE_KUBE_SERVER"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
# A follow stream lives as long as its pod: no total limit (logfollow.py reopens a silent one).
FOLLOW_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
# kopf re-logs-in after this long with in-cluster credentials: the kubelet rotates the mounted
# token well before its (>= 1 h) expiry, and the library re-reads the file every minute.
IN_CLUSTER_RELOGIN = dt.timedelta(minutes=10)
USER_AGENT = "finetune-operator"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Credentials:
    """What kopf's login needs, taken from the client's loaded configuration."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    expiration: dt.datetime | None = None


@dataclass
class Loaded:
    """A kubernetes_asyncio Configuration and how it was found (`source`)."""

    configuration: Configuration
    source: str  # "env" | "in-cluster" | "kubeconfig"
    loader: Any = None  # the KubeConfigLoader, for exec plugin expiry


def _exec_refresher(loader: Any) -> Any:
    """An async refresh hook: re-run the kubeconfig's exec plugin once its credential expires
    (the library caches it until `expirationTimestamp`)."""

    async def refresh(configuration: Configuration, *_: Any) -> None:
        if hasattr(loader, "exec_plugin_expiry"):
            await loader.load_from_exec_plugin()  # returns at once while not expired
            configuration.api_key["BearerToken"] = loader.token

    return refresh


async def load_configuration() -> Loaded:
    """Find the API server (see the module docstring).

    Raises:
        RuntimeError: no server found, or the kubeconfig/service account is unusable.
    """
    cfg = Configuration()
    if os.environ.get(SERVER_ENV):
        cfg.host = os.environ[SERVER_ENV].rstrip("/")
        cfg.verify_ssl = False
        return Loaded(cfg, "env")
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            kube_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # re-reads the token file
        except ConfigException as e:
            raise RuntimeError(f"in-cluster configuration: {e}") from e
        return Loaded(cfg, "in-cluster")
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    if not os.path.isfile(path):
        raise RuntimeError(
            f"no Kubernetes API server: set {SERVER_ENV}, run in a cluster, or provide a kubeconfig ({path})"
        )
    try:
        loader = await kube_config.load_kube_config(config_file=path, client_configuration=cfg,
                                                    persist_config=False)  # fmt: skip
    except (ConfigException, OSError, KeyError) as e:
        raise RuntimeError(f"kubeconfig {path}: {e}") from e
    if hasattr(loader, "exec_plugin_expiry"):
        cfg.refresh_api_key_hook = _exec_refresher(loader)
    return Loaded(cfg, "kubeconfig", loader)


async def credentials(loaded: Loaded, now: dt.datetime | None = None) -> Credentials:
    """The loaded configuration as kopf's login needs it (token refreshed first)."""
    cfg = loaded.configuration
    now = now or dt.datetime.now(dt.timezone.utc)
    if loaded.source == "env":
        return Credentials(server=str(cfg.host), insecure=True)
    header = await cfg.get_api_key_with_prefix("BearerToken") if "BearerToken" in cfg.api_key else None
    token = header.split(" ", 1)[1] if header and header.startswith("Bearer ") else None
    expiration = None
    if loaded.source == "in-cluster":
        expiration = now + IN_CLUSTER_RELOGIN
    elif getattr(loaded.loader, "exec_plugin_expiry", None) is not None:
        expiration = loaded.loader.exec_plugin_expiry
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=dt.timezone.utc)
    return Credentials(
        server=str(cfg.host), ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl, token=token,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file, expiration=expiration,
    )  # fmt: skip


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


def _raise_for(status: int, reason: str, raw: str) -> None:
    """ApiError for a non-2xx answer, with the Status object's reason and message when there is one."""
    if status < 400:
        return
    try:
        doc = json.loads(raw)
        reason, message = str(doc.get("reason", "")), str(doc.get("message", raw))
    except (ValueError, AttributeError):
        message = raw
    raise ApiError(status, reason, message[:500])


def env_proxy(server: str) -> str | None:
    """The proxy for `server` from HTTPS_PROXY/HTTP_PROXY, unless NO_PROXY covers its host: what
    kubectl (Go's ProxyFromEnvironment) uses, read once."""
    url = urlsplit(server)
    proxy = urllib.request.getproxies_environment().get(url.scheme or "https")
    if not proxy or urllib.request.proxy_bypass(url.hostname or ""):
        return None
    return proxy


def api_client(cfg: Configuration) -> ApiClient:
    """kubernetes_asyncio's ApiClient, its environment read once. The library opens its aiohttp
    session with trust_env=True, so every request looked up ~/.netrc and the proxy variables again,
    each in a thread-pool hop: a fifth of the operator's CPU with 500 jobs created at once
    (bench_apiserver.py (b), py-spy). kubectl reads no netrc; its proxy comes from the
    kubeconfig's proxy-url, else the environment, resolved here once."""
    proxy = cfg.proxy or env_proxy(str(cfg.host))
    if proxy:
        cfg.proxy = proxy
    api = ApiClient(cfg)  # takes cfg.proxy for every request
    # aiohttp has no public setter; tests/unit/test_kube.py checks the public `trust_env` reads False
    api.rest_client.pool_manager._trust_env = False
    return api


_PLURALS = {"Pod": "pods", "PersistentVolumeClaim": "persistentvolumeclaims", "Event": "events"}


class Kube:
    """The API client. `await Kube.connect()`; `close()` when done (or `async with`)."""

    def __init__(self, api: ApiClient, loaded: Loaded | None = None) -> None:
        self.api = api
        self.api.user_agent = USER_AGENT
        self.loaded = loaded
        self._streams: ApiClient | None = None  # follow_log's own pool

    @classmethod
    async def connect(cls) -> Kube:
        loaded = await load_configuration()
        return cls(api_client(loaded.configuration), loaded)

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.api.close()
        if self._streams is not None:
            await self._streams.close()

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json") -> Any:  # fmt: skip
        """One API call; returns the decoded JSON. Raises ApiError on a non-2xx answer."""
        headers = {"Accept": "application/json, */*", "Content-Type": content_type}
        resp = await self.api.call_api(
            path, method, query_params=list((params or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        async with resp:
            raw = await resp.text()
            _raise_for(int(resp.status), str(resp.reason or ""), raw)
        return json.loads(raw) if raw else {}

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; the created object, or None when it already exists (409)."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], _PLURALS.get(obj["kind"], obj["kind"].lower() + "s"),
                             meta.get("namespace"))  # fmt: skip
        try:
            return dict(await self.request("POST", path, body=obj))
        except ApiError as e:
            if e.status == 409:
                return None
            raise

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
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            await self.request("DELETE", resource_path(api_version, plural, namespace, name), body=body)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    @contextlib.asynccontextmanager
    async def follow_log(self, namespace: str, name: str, tail_lines: int) -> AsyncIterator[AsyncIterator[bytes]]:
        """`pods/log?follow=true` from the last `tail_lines` lines: the log's byte chunks as the
        kubelet writes them, until the container ends. On its own connection pool with no limit
        (one long-running request per followed pod must never queue the operator's other calls).
        Raises ApiError on a non-2xx answer."""
        if self._streams is None:
            cfg = copy.copy(self.api.configuration)  # shares api_key: a refreshed token serves both
            cfg.connection_pool_maxsize = 0  # aiohttp: no limit
            self._streams = api_client(cfg)
            self._streams.user_agent = USER_AGENT
        resp = await self._streams.call_api(
            resource_path("v1", "pods", namespace, name, "log"), "GET",
            query_params=[("follow", "true"), ("tailLines", str(tail_lines))],
            header_params={"Accept": "*/*"}, auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=FOLLOW_TIMEOUT,
        )  # fmt: skip
        async with resp:
            if int(resp.status) >= 400:
                _raise_for(int(resp.status), str(resp.reason or ""), await resp.text())
            yield resp.content.iter_any()
