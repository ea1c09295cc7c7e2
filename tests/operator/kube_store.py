"""The emulated API server's object store: what a real API server does with objects, without HTTP.

Used by kube_emulator.FixedKubernetesEmulator (which serves it over kmock's HTTP server) and directly by
the harness's synchronous helpers. Everything here runs in the emulator's event loop only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime as dt
import random
import string
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import kmock
from kube_patches import PatchError, field_selector_matches, json_patch, label_selector_matches, merge_patch

EVENT_BUFFER = 20_000  # watch events kept per resource for resourceVersion replays


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
    Res("", "v1", "services", "Service", status_subresource=False),
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
    def log_bytes(self, namespace: str, name: str, offset: int, tail_lines: int | None = None) -> tuple[bytes, int, bool]: ...


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


@dataclass
class Watch:
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


class ObjectStore:
    """Objects by resource, with resourceVersions, watch fan-out, finalizers, graceful pod deletion and GC."""

    kubelet: Kubelet | None
    keep_history: bool

    def _init_store(self) -> None:
        self._res: dict[tuple[str, str, str], Res] = {}
        self._store: dict[tuple[str, str, str], dict[tuple[str | None, str], dict[str, Any]]] = {}
        self._history: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        self._events: dict[tuple[str, str, str], collections.deque[tuple[int, dict[str, Any]]]] = {}
        self._watches: dict[tuple[str, str, str], list[Watch]] = {}
        self._listeners: list[Callable[[Res, str, dict[str, Any]], None]] = []
        self._rv = 1000
        self.watches_opened: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for res in CORE:
            self.register(res)
        self.put_object(self._res[("", "v1", "namespaces")], {"metadata": {"name": "default"}})

    def register(self, res: Res) -> None:
        """Serve `res` (discovery included)."""
        self._res[res.key] = res
        self._store.setdefault(res.key, {})
        self._events.setdefault(res.key, collections.deque(maxlen=EVENT_BUFFER))
        self._watches.setdefault(res.key, [])

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
