"""An emulated Kubernetes API server: kmock 0.8's KubernetesEmulator with the gaps kopf trips on fixed.

kmock provides the HTTP server (aiohttp), API discovery (/api, /apis, group/version resource
lists from `emulator.resources`), the Status error format and request routing for everything that
is not an object request. Object requests (list, watch, get, create, patch, replace, delete and
the subresources) are served here, from the in-memory ObjectStore of kube_store.py, with the
semantics of a real API server. Each workaround, with the symptom it fixes (DESIGN.md, testing tier 3):

1. No uid/resourceVersion/creationTimestamp/generation on create -> kopf's consistency checks wait
   `consistency_timeout` on every patch and owner references have no uid. Filled here; one global,
   monotonically increasing resourceVersion, returned by the write and carried by its watch event.
2. Namespace not filled from the URL on create -> objects land in namespace None and namespaced
   gets 404. The URL namespace is used (and a body namespace that disagrees is a 400, as upstream).
3. No generateName -> kopf's events (`generateName: kopf-event-`) all collide on one name (409).
4. JSON-patch `test` failures answer 500 instead of 422 -> kopf treats its optimistic-concurrency
   miss as a fatal API error instead of retrying. Here: 422 for a failed test/missing path, 409 for
   a stale metadata.resourceVersion in a merge patch or PUT.
5. `/api/v1/namespaces` answers 500 (kmock's path parser unpacks too few parts) -> kopf's
   namespace observer crashes. Paths are parsed here; namespaces are a cluster-scoped resource.
6. kopf needs `v1/namespaces` in discovery and an existing namespace: registered and seeded.
7. No BOOKMARK after the initial events of `sendInitialEvents=true` -> kopf waits forever for the
   end of the initial listing. Sent, with the `k8s.io/initial-events-end` annotation. Watches with a
   resourceVersion replay the events after it (410 Gone when too old), as upstream.
8. `/status` not separated from the main resource -> an operator can write status through the main
   resource and the test passes where a real cluster would silently drop it. Here, for resources
   with a status subresource, writes to the main resource ignore `status` and writes to `/status`
   change only `status`; create drops `status`.
9. Request-log matching is quadratic (every request is matched against every recorded request):
   object requests bypass kmock's matcher and its request log is trimmed to the last few hundred.
10. Core-group discovery (`/api/v1`) says `groupVersion: "/v1"`: corrected to `v1`.
11. Running kopf in the emulator's loop breaks shutdown: see harness.py (each runs in its own thread).

Also implemented because a real API server does it and the operator may rely on it: finalizers
(deletionTimestamp, removal when the last finalizer goes), graceful pod deletion handed to the
kubelet, ownerReference garbage collection (background propagation), label/field selectors on
list and watch, `generation` bumped on spec changes, the pod `log` and `eviction` subresources
(through the test kubelet). Not implemented: schema validation, admission, server-side apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback
from typing import Any

import aiohttp.web
import attrs
import kmock
from kube_store import Kubelet, ObjectStore, Res, Watch, api_error, now_rfc3339

REQUEST_LOG_KEEP = 200
FOLLOW_POLL = 0.1  # seconds between looks at a followed pod's log file
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@attrs.define(kw_only=True)
class FixedKubernetesEmulator(ObjectStore, kmock.KubernetesEmulator):
    """kmock's emulator with a real API server's object semantics (see the module docstring)."""

    kubelet: Kubelet | None = attrs.field(default=None, init=False)
    keep_history: bool = True
    # Every HTTP request served, as (monotonic time, method, path?query, User-Agent): tests count
    # what an operator sends (the test kubelet and the harness's helpers call the store directly).
    served: list[tuple[float, str, str, str]] = attrs.field(factory=list, init=False)
    # A pods/log outage (kubelet unreachable, NotReady node): the log subresource answers this
    # status code while set (e.g. 500), as a real API server relays a kubelet error.
    log_outage: int | None = attrs.field(default=None, init=False)
    log_streams: int = attrs.field(default=0, init=False)  # follow=true log streams opened

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._init_store()

    def register(self, res: Res) -> None:
        """Serve `res`, discovery included."""
        super().register(res)
        subresources = (("status",) if res.status_subresource else ()) + res.extra_subresources
        key = f"{res.group}/{res.version}/{res.plural}" if res.group else f"v1/{res.plural}"
        self.resources[key] = kmock.ResourceInfo(
            kind=res.kind, singular=res.singular or res.kind.lower(), namespaced=res.namespaced,
            verbs=set(ALL_VERBS), shortnames=set(res.short_names), subresources=set(subresources),
        )  # fmt: skip

    # -- HTTP ------------------------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        await raw.read()
        self.served.append((time.monotonic(), raw.method, raw.path_qs,
                            raw.headers.get("User-Agent", "")))  # fmt: skip
        del self.served[:-REQUEST_LOG_KEEP * 50]
        try:
            route = self._route(raw.path)
        except kmock.KubernetesError as e:  # an unknown resource: 404, as upstream (not a 500)
            return self._status_response(e.status, e.reason or "", e.message or "")
        if route is None:  # discovery and anything else: kmock's scaffold
            del self._requests[:-REQUEST_LOG_KEEP]
            for payload in self._payloads:
                del payload._requests[:-REQUEST_LOG_KEEP]
            return await super().__call__(raw)
        try:
            return await self._serve(raw, *route)
        except kmock.KubernetesError as e:
            return self._status_response(e.status, e.reason or "", e.message or "")
        except Exception as e:  # an emulator bug: answer like a crashing API server, visibly
            traceback.print_exc()
            return self._status_response(500, "InternalError", repr(e))

    @staticmethod
    def _status_response(code: int, reason: str, message: str) -> aiohttp.web.Response:
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}  # fmt: skip
        return aiohttp.web.json_response(body, status=code)

    def _route(self, path: str) -> tuple[Res, str | None, str | None, str | None] | None:
        """(resource, namespace, name, subresource) for object paths; None for discovery paths."""
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        res = self._res.get((group, version, rest[0]))
        if res is None:
            raise api_error(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        return res, namespace, name, sub

    async def _serve(
        self, raw: aiohttp.web.BaseRequest, res: Res, ns: str | None, name: str | None, sub: str | None
    ) -> aiohttp.web.StreamResponse:
        q = raw.query
        method = raw.method
        text = await raw.text()
        try:
            body = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise api_error(400, "BadRequest", f"the request body is not JSON: {e}") from None
        if method == "GET" and q.get("watch") in ("true", "1"):
            return await self._serve_watch(raw, res, ns, name)
        if method == "GET" and name is None:
            items = self.list_objects(res, ns, q.get("labelSelector"), q.get("fieldSelector"))
            return aiohttp.web.json_response({
                "apiVersion": res.api_version, "kind": f"{res.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items,
            })  # fmt: skip
        if name is None and method == "POST":
            return aiohttp.web.json_response(self.create_object(res, ns, body), status=201)
        if name is None:
            raise api_error(
                405, "MethodNotAllowed", f"{method} on a collection is not supported by the emulator"
            )
        if sub == "log" and res.kind == "Pod" and method == "GET":
            text = self._pod_log(ns or "", name, q.get("tailLines"))  # the errors of both kinds
            if q.get("follow") in ("true", "1"):
                return await self._follow_log(raw, ns or "", name, q.get("tailLines"))
            return aiohttp.web.Response(text=text)
        if sub == "eviction" and res.kind == "Pod" and method == "POST":
            self._evict(res, ns or "", name)
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201}, status=201
            )
        if sub not in (None, "status"):
            raise api_error(404, "NotFound", f"the emulator does not serve the {sub!r} subresource")
        if sub == "status" and not res.status_subresource:
            raise api_error(404, "NotFound", f"{res.plural} have no status subresource")
        if method == "GET":
            obj = self.get_object(res, ns, name)
            if obj is None:
                raise api_error(404, "NotFound", f'{res.plural} "{name}" not found')
            return aiohttp.web.json_response(obj)
        if method == "PATCH":
            ctype = raw.headers.get("Content-Type", "application/merge-patch+json")
            return aiohttp.web.json_response(self.patch_object(res, ns, name, body, ctype, sub))
        if method == "PUT":
            return aiohttp.web.json_response(self.write_object(res, ns, name, body, subresource=sub))
        if method == "DELETE":
            grace = q.get("gracePeriodSeconds") or ((body or {}).get("gracePeriodSeconds"))
            return aiohttp.web.json_response(
                self.delete_object(res, ns, name, None if grace is None else float(grace))
            )
        raise api_error(405, "MethodNotAllowed", f"{method} is not supported")

    async def _follow_log(self, request: aiohttp.web.Request, ns: str, name: str,
                          tail: str | None) -> aiohttp.web.StreamResponse:  # fmt: skip
        """`follow=true`: the tail, then what the pod writes, until its process ends (as the kubelet
        streams it). A log outage set meanwhile cuts the stream, as an unreachable kubelet does."""
        assert self.kubelet is not None
        self.log_streams += 1
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        data, offset, ended = self.kubelet.log_bytes(ns, name, 0, int(tail) if tail else None)
        await resp.write(data)
        while not ended and self.log_outage is None:
            await asyncio.sleep(FOLLOW_POLL)
            try:
                data, offset, ended = self.kubelet.log_bytes(ns, name, offset)
            except KeyError:
                break
            if data:
                await resp.write(data)
        await resp.write_eof()
        return resp

    def _pod_log(self, ns: str, name: str, tail: str | None) -> str:
        pod = self.get_object(self._res[("", "v1", "pods")], ns, name)
        if pod is None:
            raise api_error(404, "NotFound", f'pods "{name}" not found')
        if self.log_outage is not None:
            raise api_error(self.log_outage, "InternalError", f'Get "https://node-1:10250/containerLogs/{ns}/{name}/worker'
                            '?tailLines=40": dial tcp 10.0.0.7:10250: connect: connection refused')  # fmt: skip
        if self.kubelet is None or not self.kubelet.owns(ns, name):
            container = (pod.get("spec", {}).get("containers") or [{}])[0].get("name", "")
            raise api_error(
                400,
                "BadRequest",
                f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating',
            )
        return self.kubelet.logs(ns, name, int(tail) if tail else None)

    def _evict(self, res: Res, ns: str, name: str) -> None:
        """The Eviction API: a DisruptionTarget condition, then a graceful delete."""
        pod = self.get_object(res, ns, name)
        if pod is None:
            raise api_error(404, "NotFound", f'pods "{name}" not found')
        conditions = [
            c for c in pod.get("status", {}).get("conditions", []) if c.get("type") != "DisruptionTarget"
        ]
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                           "message": "Eviction API: evicting", "lastTransitionTime": now_rfc3339()})  # fmt: skip
        self.patch_object(res, ns, name, {"status": {"conditions": conditions}}, subresource="status")
        self.delete_object(res, ns, name)

    async def _serve_watch(
        self, raw: aiohttp.web.BaseRequest, res: Res, ns: str | None, name: str | None
    ) -> aiohttp.web.StreamResponse:
        q = raw.query
        fields = q.get("fieldSelector")
        watch = Watch(asyncio.Queue(), ns, name, q.get("labelSelector"), fields)
        since = q.get("resourceVersion")
        initial: list[dict[str, Any]] = []
        if since in (None, "", "0") or q.get("sendInitialEvents") == "true":
            objs = self.list_objects(res, ns, watch.labels, fields)
            initial = [{"type": "ADDED", "object": o} for o in objs if watch.wants(o)]
            if q.get("sendInitialEvents") == "true":
                initial.append({"type": "BOOKMARK", "object": {
                    "apiVersion": res.api_version, "kind": res.kind,
                    "metadata": {"resourceVersion": str(self._rv), "annotations": {"k8s.io/initial-events-end": "true"}},
                }})  # fmt: skip
        else:
            buffered = self._events[res.key]
            oldest = buffered[0][0] if buffered else self._rv + 1
            if int(since) < oldest - 1 and len(buffered) == buffered.maxlen:
                initial = [{"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "code": 410, "reason": "Expired", "message": f"too old resource version: {since}"}}]  # fmt: skip
            else:
                initial = [e for rv, e in buffered if rv > int(since) and watch.wants(e["object"])]
        self._watches[res.key].append(watch)  # no await since the snapshot: nothing is missed
        self.watches_opened[res.key] += 1
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            for event in initial:
                await response.write(json.dumps(event).encode() + b"\n")
            if initial and initial[-1]["type"] == "ERROR":
                return response
            timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
            deadline = asyncio.get_running_loop().time() + timeout if timeout else None
            while True:
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if left is not None and left <= 0:
                    break
                try:  # wake up every second to notice clients that went away (aiohttp won't cancel us)
                    event = await asyncio.wait_for(
                        watch.queue.get(), min(left, 1.0) if left is not None else 1.0
                    )
                except TimeoutError:
                    if raw.transport is None or raw.transport.is_closing():
                        break
                    continue
                if event is None:  # the emulator is closing
                    break
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError, aiohttp.ClientConnectionError):
            pass
        finally:
            self._watches[res.key].remove(watch)
        with contextlib.suppress(Exception):
            await response.write_eof()
        return response

    async def _serve_version(self, request: Any) -> Any:
        # kmock answers `groupVersion: "/v1"` for the core group; upstream says "v1".
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        return payload

    def close_watches(self) -> None:
        """End every open watch stream (before the server shuts down)."""
        for watches in self._watches.values():
            for w in watches:
                w.queue.put_nowait(None)
