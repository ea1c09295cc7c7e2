"""The operator's API client: kubernetes_asyncio under a thin wrapper that keeps plans readable.

kubernetes_asyncio (the official OpenAPI generator's async client, released with each Kubernetes
minor) does everything under the wrapper: kubeconfig loading (contexts, CA and client certificates,
tokens, exec credential plugins, OIDC), the in-cluster service account (its token file is re-read
as the kubelet rotates it), TLS and the HTTP session. The wrapper only names the five calls reconcile
plans need: create (409 = already there), get (None on 404), list by labels, JSON merge patch
(status subresource included), delete, and a followed pod log. Requests go through
`ApiClient.call_api` with the response unread, so a log that happens to be JSON is not mangled
by the generated deserializer.

Where to connect and with which credentials, and how they stay fresh: auth.py. When an exec
plugin's client certificate is replaced, the client builds a new session for it (the old one's
TLS context holds the old certificate); a 401 with such a certificate runs the plugin again and
the request once more.
"""

from __future__ import annotations

import contextlib
import copy
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration

from finetune_operator.cluster.auth import (
    SERVER_ENV,
    Credentials,
    Loaded,
    credentials,
    load_configuration,
    refresh_exec_cert,
)

__all__ = ["SERVER_ENV", "ApiClient", "ApiError", "Configuration", "Credentials", "Kube", "Loaded", "api_client",
           "credentials", "env_proxy", "load_configuration", "resource_path"]  # fmt: skip
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
# A follow stream lives as long as its pod: no total limit (logfollow.py reopens a silent one).
FOLLOW_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
USER_AGENT = "finetune-operator"
# A pooled keep-alive connection that the server (or a load balancer's idle timeout) closed as the
# pool handed it out fails the request: "Can not write request body", or a disconnect before the
# answer. aiohttp sends only idempotent methods again by itself (its IDEMPOTENT_METHODS: not POST
# or PATCH; aio-libs/aiohttp#6138, #7297). Every request of this client may go twice: creates carry
# their names (a second answers 409, read as "already there"), patches are merge patches of
# absolute values. So each goes once more on a new connection, as Go's transport does for a
# request it knows was not written; a second loss raises.
CONNECTION_LOST = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


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
        self._cert_generation = loaded.cert_generation if loaded is not None else 0
        self._retired: list[ApiClient] = []  # sessions of replaced certificates (in-flight calls finish)

    @classmethod
    async def connect(cls) -> Kube:
        loaded = await load_configuration()
        return cls(api_client(loaded.configuration), loaded)

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for client in (self.api, self._streams, *self._retired):
            if client is not None:
                await client.close()

    async def _fresh(self, refused: bool = False) -> bool:
        """With an exec plugin's certificate: a new session once the certificate was replaced (it
        was due, or `refused`: the server answered 401). True when there is a new one to try."""
        loaded = self.loaded
        if loaded is None or loaded.exec_cert is None:
            return False
        await refresh_exec_cert(loaded, force=refused, seen=self._cert_generation if refused else None)
        if loaded.cert_generation == self._cert_generation:
            return False
        self._retired.append(self.api)
        self.api = api_client(loaded.configuration)
        self.api.user_agent = USER_AGENT
        if self._streams is not None:  # open streams keep their connections; new ones take the new certificate
            self._retired.append(self._streams)
            self._streams = None
        self._cert_generation = loaded.cert_generation
        return True

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json") -> Any:  # fmt: skip
        """One API call; returns the decoded JSON. Raises ApiError on a non-2xx answer."""
        headers = {"Accept": "application/json, */*", "Content-Type": content_type}
        await self._fresh()
        for last in (False, True):
            status, reason, raw = await self._send(method, path, params, body, headers)
            if status == 401 and not last and await self._fresh(refused=True):
                continue  # the plugin's certificate was refused: once more with a new one
            _raise_for(status, reason, raw)
            break
        return json.loads(raw) if raw else {}

    async def _send(self, method: str, path: str, params: dict[str, str] | None, body: Any,
                    headers: dict[str, str]) -> tuple[int, str, str]:  # fmt: skip
        """One request (status, reason, body text), sent once more when its connection was lost."""
        try:
            return await self._send_once(method, path, params, body, headers)
        except CONNECTION_LOST as e:
            if isinstance(e, aiohttp.ClientConnectorError):  # not connected at all: say so now
                raise
        return await self._send_once(method, path, params, body, headers)

    async def _send_once(self, method: str, path: str, params: dict[str, str] | None, body: Any,
                         headers: dict[str, str]) -> tuple[int, str, str]:  # fmt: skip
        resp = await self.api.call_api(
            path, method, query_params=list((params or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        async with resp:
            return int(resp.status), str(resp.reason or ""), await resp.text()

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
        await self._fresh()
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
