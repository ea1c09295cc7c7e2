"""An emulated Kubernetes API server: kmock 0.8's KubernetesEmulator with the gaps kopf trips on fixed.

kmock provides the HTTP server (aiohttp), API discovery (/api, /apis, group/version resource
lists from `emulator.resources`), the Status error format and request routing for everything that
is not an object request. Object requests (list, watch, get, create, patch, replace, delete and
the subresources) are served here, from an in-memory store, with the semantics of a real API
server. Each workaround, with the symptom it fixes (DESIGN.md, testing tier 3):

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
import collections
import contextlib
import copy
import datetime as dt
import json
import random
import string
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp.web
import attrs
import kmock
from kube_patches import PatchError, field_selector_matches, json_patch, label_selector_matches, merge_patch

REQUEST_LOG_KEEP = 200
EVENT_BUFFER = 20_000  # watch events kept per resource for resourceVersion replays
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Res:
    """A resource as the store knows it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    extra_subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)


CORE = [
    Res("", "v1", "namespaces", "Namespace", namespaced=False, extra_subresources=("finalize",)),
    Res("", "v1", "pods", "Pod", extra_subresources=("log", "eviction", "binding")),
    Res("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    Res("", "v1", "events", "Event", status_subresource=False),
    Res("", "v1", "configmaps", "ConfigMap", status_subresource=False),
    Res("", "v1", "secrets", "Secret", status_subresource=False),
    Res("events.k8s.io", "v1", "events", "Event", status_subresource=False),
    Res("coordination.k8s.io", "v1", "leases", "Lease", status_subresource=False),
    Res(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
    ),
]


class Kubelet(Protocol):
    """What the emulator asks of a kubelet (see kubelet_sim.TestKubelet)."""

    def owns(self, namespace: str, name: str) -> bool: ...
    def terminate(self, namespace: str, name: str, grace_seconds: float) -> None: ...
    def logs(self, namespace: str, name: str, tail_lines: int | None) -> str: ...


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


@dataclass
class _Watch:
    queue: asyncio.Queue[dict[str, Any] | None]
    namespace: str | None
    name: str | None
    labels: str | None
    fields: str | None

    def wants(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and label_selector_matches(self.labels, meta.get("labels"))
            and field_selector_matches(self.fields, obj)
        )


@attrs.define(kw_only=True)
class FixedKubernetesEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with a real API server's object semantics (see the module docstring)."""

    _res: dict[tuple[str, str, str], Res] = attrs.field(factory=dict, init=False)
    _store: dict[tuple[str, str, str], dict[tuple[str | None, str], dict[str, Any]]] = attrs.field(
        factory=dict, init=False
    )
    _history: dict[tuple[Any, ...], list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _events: dict[tuple[str, str, str], collections.deque[tuple[int, dict[str, Any]]]] = attrs.field(
        factory=dict, init=False
    )
    _watches: dict[tuple[str, str, str], list[_Watch]] = attrs.field(factory=dict, init=False)
    _listeners: list[Callable[[Res, str, dict[str, Any]], None]] = attrs.field(factory=list, init=False)
    _rv: int = attrs.field(default=1000, init=False)
    watches_opened: collections.Counter[tuple[str, str, str]] = attrs.field(
        factory=collections.Counter, init=False
    )
    kubelet: Kubelet | None = attrs.field(default=None, init=False)
    keep_history: bool = True

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for res in CORE:
            self.register(res)
        self.put_object(self._res[("", "v1", "namespaces")], {"metadata": {"name": "default"}})

    # -- resources -------------------------------------------------------------------------------

    def register(self, res: Res) -> None:
        """Serve `res` (discovery included)."""
        self._res[res.key] = res
        self._store.setdefault(res.key, {})
        self._events.setdefault(res.key, collections.deque(maxlen=EVENT_BUFFER))
        self._watches.setdefault(res.key, [])
        subresources = (("status",) if res.status_subresource else ()) + res.extra_subresources
        self.resources[f"{res.group}/{res.version}/{res.plural}" if res.group else f"v1/{res.plural}"] = (
            kmock.ResourceInfo(
                kind=res.kind,
                singular=res.singular or res.kind.lower(),
                namespaced=res.namespaced,
                verbs=set(ALL_VERBS),
                shortnames=set(res.short_names),
                subresources=set(subresources),
            )
        )

    def resource(self, api_version: str, plural: str) -> Res:
        group, _, version = api_version.rpartition("/")
        res = self._res.get((group, version, plural))
        if res is None:
            raise api_error(404, "NotFound", f"the server could not find the requested resource ({plural})")
        return res

    def add_listener(self, fn: Callable[[Res, str, dict[str, Any]], None]) -> None:
        """Call `fn(res, event_type, obj)` for every change (in the emulator's loop)."""
        self._listeners.append(fn)

    # -- the store (called in the emulator's loop only) ------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, res: Res, etype: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": etype, "object": obj}
        self._events[res.key].append((rv, event))
        for w in self._watches[res.key]:
            if w.wants(obj):
                w.queue.put_nowait(event)
        if self.keep_history:
            key = (res.key, obj["metadata"].get("namespace"), obj["metadata"]["name"])
            self._history.setdefault(key, []).append(obj if etype != "DELETED" else {**obj, "deleted": True})
        for fn in list(self._listeners):
            try:
                fn(res, etype, obj)
            except Exception:  # a listener must not break the API
                traceback.print_exc()

    def get_object(self, res: Res, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self._store[res.key].get((namespace if res.namespaced else None, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(
        self, res: Res, namespace: str | None = None, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        items = [
            obj
            for (ns, _), obj in self._store[res.key].items()
            if (namespace is None or ns == namespace)
            and label_selector_matches(labels, obj["metadata"].get("labels"))
            and field_selector_matches(fields, obj)
        ]
        return copy.deepcopy(
            sorted(items, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        )

    def history(self, res: Res, namespace: str | None, name: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self._history.get((res.key, namespace if res.namespaced else None, name), []))

    def create_object(self, res: Res, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise api_error(400, "BadRequest", "the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            if namespace and meta.get("namespace") not in (None, namespace):
                raise api_error(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            namespace = namespace or meta.get("namespace")
            if not namespace:
                raise api_error(400, "BadRequest", "a namespaced object needs a namespace")
            if self.get_object(self._res[("", "v1", "namespaces")], None, namespace) is None:
                raise api_error(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise api_error(
                    422,
                    "Invalid",
                    f"{res.kind}: metadata.name: Required value: name or generateName is required",
                )
            alphabet = string.ascii_lowercase + string.digits
            while True:
                name = meta["generateName"] + "".join(random.choices(alphabet, k=5))
                if (namespace, name) not in self._store[res.key]:
                    break
            meta["name"] = name
        if (namespace, meta["name"]) in self._store[res.key]:
            raise api_error(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=now_rfc3339(),
            generation=1,
            resourceVersion=self._next_rv(),
        )
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        if res.status_subresource:
            obj.pop("status", None)
        if res.kind == "Pod":
            obj["status"] = {"phase": "Pending", "qosClass": "Burstable"}
        elif res.kind == "PersistentVolumeClaim":  # no provisioner: bound at once
            obj["status"] = {"phase": "Bound", "accessModes": obj.get("spec", {}).get("accessModes", [])}
        elif res.kind == "Namespace":
            obj["status"] = {"phase": "Active"}
        self._store[res.key][(namespace, meta["name"])] = obj
        self._emit(res, "ADDED", obj)
        return copy.deepcopy(obj)

    def put_object(self, res: Res, body: dict[str, Any]) -> dict[str, Any]:
        """Create (a helper for seeding); no namespace check."""
        ns = body.get("metadata", {}).get("namespace")
        if res.kind == "Namespace" or not res.namespaced:
            return self.create_object(res, None, body)
        return self.create_object(res, ns, body)

    def write_object(
        self,
        res: Res,
        namespace: str | None,
        name: str,
        new: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Store `new` as the object's next version, applying the status-subresource rules."""
        key = (namespace if res.namespaced else None, name)
        old = self._store[res.key].get(key)
        if old is None:
            raise api_error(404, "NotFound", f'{res.plural} "{name}" not found')
        sent_rv = (new.get("metadata") or {}).get("resourceVersion")
        if sent_rv not in (None, "", old["metadata"]["resourceVersion"]):
            raise api_error(
                409, "Conflict",
                f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )  # fmt: skip
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = copy.deepcopy(new)
            if res.status_subresource:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
            meta = result.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "namespace", "name", "generation", "deletionTimestamp"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            if result.get("spec") != old.get("spec"):
                meta["generation"] = old["metadata"].get("generation", 1) + 1
        result["apiVersion"], result["kind"] = res.api_version, res.kind
        if result == old:
            return copy.deepcopy(old)  # a no-op write keeps the resourceVersion, as upstream
        result["metadata"]["resourceVersion"] = self._next_rv()
        self._store[res.key][key] = result
        self._emit(res, "MODIFIED", result)
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            self._remove(res, key)
        return copy.deepcopy(result)

    def patch_object(
        self, res: Res, namespace: str | None, name: str, patch: Any,
        content_type: str = "application/merge-patch+json", subresource: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        old = self.get_object(res, namespace, name)
        if old is None:
            raise api_error(404, "NotFound", f'{res.plural} "{name}" not found')
        try:
            if "json-patch" in content_type:
                new = json_patch(old, patch)
            elif "merge-patch" in content_type:  # merge-patch+json and strategic-merge-patch+json
                if not isinstance(patch, dict):
                    raise PatchError("a merge patch must be a JSON object", 400)
                new = merge_patch(old, patch)
            else:
                raise api_error(
                    415, "UnsupportedMediaType", f"the emulator does not support {content_type!r} patches"
                )
        except PatchError as e:
            raise api_error(e.status, "Invalid" if e.status == 422 else "BadRequest", str(e)) from None
        sent_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
        if sent_rv is None:
            new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self.write_object(res, namespace, name, new, subresource=subresource)

    def delete_object(
        self, res: Res, namespace: str | None, name: str, grace_seconds: float | None = None
    ) -> dict[str, Any]:
        key = (namespace if res.namespaced else None, name)
        obj = self._store[res.key].get(key)
        if obj is None:
            raise api_error(404, "NotFound", f'{res.plural} "{name}" not found')
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):  # already terminating: only a force delete changes anything
            if res.kind == "Pod" and grace_seconds == 0 and not meta.get("finalizers"):
                if self.kubelet is not None:
                    self.kubelet.terminate(meta["namespace"], name, 0)
                return self._remove(res, key)
            return copy.deepcopy(obj)
        graceful = (
            res.kind == "Pod" and self.kubelet is not None and self.kubelet.owns(meta["namespace"], name)
        )
        if graceful and grace_seconds is None:
            grace_seconds = float(obj.get("spec", {}).get("terminationGracePeriodSeconds", 30))
        if meta.get("finalizers") or (graceful and grace_seconds):
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            if graceful:
                new["metadata"]["deletionGracePeriodSeconds"] = int(grace_seconds or 0)
            new["metadata"]["resourceVersion"] = self._next_rv()
            self._store[res.key][key] = new
            self._emit(res, "MODIFIED", new)
            if graceful and self.kubelet is not None:
                self.kubelet.terminate(meta["namespace"], name, grace_seconds or 0)
            return copy.deepcopy(new)
        if res.kind == "Pod" and self.kubelet is not None:
            self.kubelet.terminate(meta["namespace"], name, 0)  # force delete: the kubelet kills it
        return self._remove(res, key)

    def finish_pod_deletion(self, namespace: str, name: str, uid: str) -> None:
        """The kubelet's confirmation that a terminating pod's containers are gone."""
        res = self._res[("", "v1", "pods")]
        meta = (self._store[res.key].get((namespace, name)) or {}).get("metadata", {})
        if meta.get("uid") == uid and meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(res, (namespace, name))

    def _remove(self, res: Res, key: tuple[str | None, str]) -> dict[str, Any]:
        obj = self._store[res.key].pop(key)
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(res, "DELETED", gone)
        self._collect_garbage(obj["metadata"]["uid"])
        return gone

    def _collect_garbage(self, owner_uid: str) -> None:
        for res in list(self._res.values()):
            for (ns, name), obj in list(self._store[res.key].items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == owner_uid for r in refs) and (ns, name) in self._store[res.key]:
                    with contextlib.suppress(kmock.KubernetesError):
                        self.delete_object(res, ns, name)

    # -- HTTP ------------------------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        await raw.read()
        route = self._route(raw.path)
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
            return aiohttp.web.Response(text=self._pod_log(ns or "", name, q.get("tailLines")))
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

    def _pod_log(self, ns: str, name: str, tail: str | None) -> str:
        pod = self.get_object(self._res[("", "v1", "pods")], ns, name)
        if pod is None:
            raise api_error(404, "NotFound", f'pods "{name}" not found')
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
        watch = _Watch(asyncio.Queue(), ns, name, q.get("labelSelector"), fields)
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
