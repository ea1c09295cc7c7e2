"""What the operator knows of the cluster between requests, and when it looks at a job again.

`Informer`: the FineTuneJobs, their pods and their claims as kopf's watches report them (kopf
indexes, filled before any handler runs, so a restarted operator never mistakes "not listed yet"
for "gone"), plus what this process wrote and has not seen echoed by a watch yet (client-go's
mutation cache and the ReplicaSet controller's expectations, in small): a status write's answer is
newer than the indexed job until the watch catches up; a created pod counts as existing until the
watch shows it (or `EXPECT_SECONDS` pass). Reconcile reads all of it from memory: a job where
nothing changes costs the API server nothing.

`Scheduler`: one operator-wide task (no per-job kopf timers, which would need a finalizer on every
job) that runs a job's reconcile when its requeue time is due: backoff, TTL, the progress update of
a running pod, and a slow safety resync.

No kopf import here: the index objects are plain Mappings of key -> iterable of values.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from finetune_operator.cluster.waiting import wait_event
from finetune_operator.decisions.builders import LABEL_JOB

Key = tuple[str, str]  # (namespace, name)
Index = Mapping[Any, Iterable[Any]]
ENDED_CACHE_SIZE = 4096
EXPECT_SECONDS = 60.0
PAUSED_RECHECK = 1.0  # seconds between looks at the paused flag of a standby
log = logging.getLogger("finetune_operator")


def _rv(obj: Mapping[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):  # opaque by contract; integers (etcd revisions) in practice
        return 0


def _first(index: Index, key: Any) -> Any:
    values = index.get(key)
    return next(iter(values), None) if values is not None else None


class Informer:
    """The operator's cache (see the module docstring). Indexes are set by handlers at startup."""

    def __init__(self, jobs: Index | None = None, pods: Index | None = None, claims: Index | None = None,
                 workloads: Index | None = None) -> None:  # fmt: skip
        self.jobs_index: Index = jobs if jobs is not None else {}
        self.pods_index: Index = pods if pods is not None else {}
        self.claims_index: Index = claims if claims is not None else {}
        # Kueue's Workloads (where its CRD exists), by (namespace, pod): kueue.workload_view of each
        self.workloads_index: Index = workloads if workloads is not None else {}
        self.written: dict[Key, dict[str, Any]] = {}
        self.expected: dict[Key, dict[str, tuple[float, dict[str, Any]]]] = {}
        self.ended: collections.OrderedDict[Key, dict[str, Any]] = collections.OrderedDict()
        self.deletes: dict[Key, float] = {}
        # Objects a LIST no longer has, by kind, with the resourceVersion they were last seen at:
        # kopf's indexes keep what was deleted while a watch was down (a re-list sends no DELETED).
        self.gone: dict[str, dict[Key, int]] = {"jobs": {}, "pods": {}}

    # -- jobs ------------------------------------------------------------------------------------

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The job as last seen by the watch, or as this process last wrote it if that is newer."""
        seen = _first(self.jobs_index, (namespace, name))
        if seen is not None and self._is_gone("jobs", namespace, seen):
            seen = None
        mine = self.written.get((namespace, name))
        if mine is not None and (seen is None or _rv(mine) > _rv(seen)):
            return mine
        self.written.pop((namespace, name), None)
        return dict(seen) if seen is not None else None

    def wrote(self, namespace: str, name: str, obj: dict[str, Any]) -> None:
        if obj.get("metadata"):
            self.written[(namespace, name)] = obj

    def own_write(self, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        """Whether a watch event brings back exactly this process's last write of the job (its
        status patch, same resourceVersion): the pass that wrote it has decided on it already."""
        mine = self.written.get((namespace, name))
        if mine is None or _rv(mine) == 0 or _rv(mine) != _rv(body):
            return False
        del self.written[(namespace, name)]  # the index has it now
        return True

    def continuing_from(self, namespace: str, name: str) -> list[str]:
        """Jobs in `namespace` whose spec.model.fromJob is `name`."""
        found = []
        for key in list(self.jobs_index):
            job = _first(self.jobs_index, key)
            if key[0] == namespace and ((job or {}).get("spec") or {}).get("model", {}).get("fromJob") == name:
                found.append(str(key[1]))
        return found

    # -- pods ------------------------------------------------------------------------------------

    def pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The job's pods: watched, plus created ones the watch has not shown yet."""
        pods = [dict(p) for p in self.pods_index.get((namespace, job)) or () if not self._is_gone("pods", namespace, p)]
        seen = {p["metadata"]["name"] for p in pods}
        expected = self.expected.get((namespace, job))
        if expected:
            now = time.monotonic()
            for name, (deadline, body) in list(expected.items()):
                if name in seen or now > deadline:
                    del expected[name]
                else:
                    pods.append(body)
            if not expected:
                del self.expected[(namespace, job)]
        return pods

    def created(self, namespace: str, pod: dict[str, Any]) -> None:
        job = (pod["metadata"].get("labels") or {}).get(LABEL_JOB)
        if job:
            expected = self.expected.setdefault((namespace, job), {})
            expected[pod["metadata"]["name"]] = (time.monotonic() + EXPECT_SECONDS, pod)

    def own_create(self, namespace: str, body: Mapping[str, Any]) -> bool:
        """Whether a pod's watch event is the pod this process created, unchanged since (same
        resourceVersion): the pass that created it counted it already."""
        job = (body["metadata"].get("labels") or {}).get(LABEL_JOB)
        expected = self.expected.get((namespace, str(job)))
        mine = (expected or {}).get(str(body["metadata"]["name"]))
        if expected is None or mine is None or _rv(mine[1]) == 0 or _rv(mine[1]) != _rv(body):
            return False
        del expected[str(body["metadata"]["name"])]  # the index has it now
        if not expected:
            del self.expected[(namespace, str(job))]
        return True

    def pod_event(self, namespace: str, body: Mapping[str, Any], deleted: bool) -> None:
        """Remember an ended pod's last state (it may be gone from the API when reconcile runs)."""
        name = str(body["metadata"]["name"])
        if (body.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            self.ended[(namespace, name)] = dict(body)
            while len(self.ended) > ENDED_CACHE_SIZE:
                self.ended.popitem(last=False)

    def deleting(self, namespace: str, pod: str) -> bool:
        """True the first time a delete of `pod` is asked (and again after EXPECT_SECONDS)."""
        now = time.monotonic()
        for key in [k for k, deadline in self.deletes.items() if deadline < now]:
            del self.deletes[key]
        if (namespace, pod) in self.deletes:
            return False
        self.deletes[(namespace, pod)] = now + EXPECT_SECONDS
        return True

    # -- pruning what the watches missed ------------------------------------------------------

    def _is_gone(self, kind: str, namespace: str, obj: Mapping[str, Any]) -> bool:
        gone_at = self.gone[kind].get((namespace, str(obj["metadata"]["name"])))
        return gone_at is not None and _rv(obj) <= gone_at

    def namespaces(self) -> set[str]:
        return {str(key[0]) for key in list(self.jobs_index)} | {str(key[0]) for key in list(self.pods_index)}

    def prune(self, kind: str, namespace: str, listed: Iterable[str], list_rv: int) -> list[str]:
        """Mark the indexed `kind` ("jobs" | "pods") objects of `namespace` that a LIST at `list_rv`
        did not return as gone; returns the jobs concerned (to look at again)."""
        present = set(listed)
        index = self.jobs_index if kind == "jobs" else self.pods_index
        touched = []
        for key in list(index):
            if key[0] != namespace:
                continue
            for obj in list(index.get(key) or ()):
                name = str(obj["metadata"]["name"])
                if name not in present and _rv(obj) <= list_rv and not self._is_gone(kind, namespace, obj):
                    self.gone[kind][(namespace, name)] = _rv(obj)
                    touched.append(str(key[1]))
        return touched

    # -- Kueue's Workloads ------------------------------------------------------------------------

    def workload(self, namespace: str, pod: str) -> dict[str, Any] | None:
        """The view of the Kueue Workload that stands for `pod` (kueue.workload_view), if any."""
        view = _first(self.workloads_index, (namespace, pod))
        return dict(view) if view is not None else None

    def job_of_pod(self, namespace: str, pod: str) -> str | None:
        """The job whose pods the watch shows `pod` among (a Workload names its pods, not its job)."""
        parts = pod.split("-")
        guesses = ["-".join(parts[:-2]), "-".join(parts[:-3])]  # <job>-<role>-<n>, <job>-train-<n>-<rank>
        keys = [(namespace, g) for g in guesses if g] + [k for k in list(self.pods_index) if k[0] == namespace]
        for key in keys:
            if any(p["metadata"]["name"] == pod for p in self.pods_index.get(key) or ()):
                return str(key[1])
        return None

    # -- claims ----------------------------------------------------------------------------------

    def claim_seen(self, namespace: str, name: str) -> bool:
        """Whether the watch of claims with the operator's labels has this claim."""
        return bool(self.claims_index.get((namespace, name)))

    def forget_job(self, namespace: str, name: str) -> None:
        self.written.pop((namespace, name), None)
        self.expected.pop((namespace, name), None)


class Scheduler:
    """Runs `run(namespace, name)` for each job when its time is due (see the module docstring)."""

    def __init__(self, run: Callable[[str, str], Coroutine[Any, Any, Any]],
                 paused: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        self._run = run
        self._paused = paused  # an HA standby keeps its schedule and runs nothing
        self._due: dict[Key, float] = {}
        self._heap: list[tuple[float, Key]] = []
        self._wake = asyncio.Event()
        self._running: dict[Key, asyncio.Task[Any]] = {}

    def at(self, key: Key, when: float) -> None:
        """Reconcile `key` at monotonic time `when` (replacing any earlier schedule)."""
        self._due[key] = when
        heapq.heappush(self._heap, (when, key))
        if self._heap[0][1] == key:
            self._wake.set()

    def due(self, key: Key) -> float | None:
        return self._due.get(key)

    def forget(self, key: Key) -> None:
        self._due.pop(key, None)

    async def loop(self) -> None:
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now and not self._paused():
                when, key = heapq.heappop(self._heap)
                if self._due.get(key) != when:
                    continue  # rescheduled or forgotten since
                del self._due[key]
                if key not in self._running:
                    task: asyncio.Task[Any] = asyncio.create_task(self._run(*key))
                    self._running[key] = task
                    task.add_done_callback(self._done(key))
            self._wake.clear()
            timeout = self._heap[0][0] - time.monotonic() if self._heap else None
            if self._paused():
                timeout = PAUSED_RECHECK
            await wait_event(self._wake, timeout)

    def _done(self, key: Key) -> Callable[[asyncio.Task[Any]], None]:
        def done(_task: asyncio.Task[Any]) -> None:
            self._running.pop(key, None)

        return done

    async def stop(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
