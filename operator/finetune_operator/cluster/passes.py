"""One pass for one job: observe it from the informer, decide (`reconcile`), apply the plan.

`reconcile_job(namespace, name)` is what every trigger runs (handlers.py: a FineTuneJob or pod
watch event; the scheduler: a due requeue). It reads the job, its pods and its claim from the
informer (informer.py) and a running pod's log tail from its follow stream (logfollow.py),
decides, applies. Only writes reach the API server from a pass. A per-job lock keeps two triggers of one job from interleaving; jobs never wait on each
other. Errors are logged in one line and retried after pending_interval; a pass never raises.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from typing import Any

import kopf

from finetune_api.contract import API_VERSION, PLURAL
from finetune_api.spec import FineTuneSpec, SpecError, parse_spec
from finetune_operator.cluster import metrics
from finetune_operator.cluster.events import EventQueue
from finetune_operator.cluster.informer import Informer, Scheduler
from finetune_operator.cluster.kube import ApiError, Kube, resource_path
from finetune_operator.cluster.logfollow import LogFollower
from finetune_operator.decisions.builders import DEFAULT_WORKER_IMAGE, LABEL_JOB, LABEL_RANK, claim_name
from finetune_operator.decisions.fromjob import recorded_source
from finetune_operator.decisions.kueue import gated_by_kueue
from finetune_operator.decisions.observe import LOG_TAIL_LINES, Observed, observe_pod
from finetune_operator.decisions.reconcile import Plan, Settings, reconcile
from finetune_operator.decisions.status import (
    PHASE_SUSPENDED,
    REASON_CONFIG_TOO_LARGE,
    REASON_INVALID_SPEC,
    TERMINAL_PHASES,
)

log = logging.getLogger("finetune_operator")


def settings_from_env() -> Settings:
    env = os.environ.get
    return Settings(
        worker_image=env("FINETUNE_WORKER_IMAGE") or DEFAULT_WORKER_IMAGE,
        grace_seconds=int(env("FINETUNE_GRACE_SECONDS") or 300),
        backoff_base=float(env("FINETUNE_BACKOFF_SECONDS") or 10),
        backoff_max=float(env("FINETUNE_BACKOFF_MAX_SECONDS") or 300),
        progress_interval=float(env("FINETUNE_RESYNC_SECONDS") or 5),
    )


SETTINGS = settings_from_env()
SAFETY_RESYNC = float(os.environ.get("FINETUNE_SAFETY_RESYNC_SECONDS") or 600)
_state: dict[str, Any] = {"kube": None, "locks": {}, "informer": Informer(), "scheduler": None, "task": None,
                          "paused": False, "prune": None, "follower": None, "events": None}


async def _kube() -> Kube:
    if _state["kube"] is None:
        _state["kube"] = await Kube.connect()
    kube: Kube = _state["kube"]
    return kube


def _informer() -> Informer:
    informer: Informer = _state["informer"]
    return informer


def _lock(namespace: str, name: str) -> asyncio.Lock:
    locks: dict[tuple[str, str], asyncio.Lock] = _state["locks"]
    return locks.setdefault((namespace, name), asyncio.Lock())


def _error_text(e: BaseException) -> str:
    if isinstance(e, ApiError):
        return f"{e.status} {e.reason or 'error'}"
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {str(e)[:120]}"


def _follower(kube: Kube) -> LogFollower:
    """The operator's log streams (logfollow.py), made with the client on first use."""
    if _state["follower"] is None:
        _state["follower"] = LogFollower(kube.follow_log, SETTINGS.progress_interval, LOG_TAIL_LINES,
                                         describe=_error_text)  # fmt: skip
    follower: LogFollower = _state["follower"]
    return follower


def _events(kube: Kube) -> EventQueue:
    """The operator's Event poster (events.py), made with the client on first use."""
    if _state["events"] is None:
        _state["events"] = EventQueue(kube.create)
    events: EventQueue = _state["events"]
    return events


async def _claim_exists(kube: Kube, informer: Informer, ns: str, claim: str) -> bool:
    """Claims with the operator's labels come from the watch; a user's own claim is read."""
    return informer.claim_seen(ns, claim) or await kube.get("v1", "persistentvolumeclaims", ns, claim) is not None


async def observe(kube: Kube, informer: Informer, job: dict[str, Any]) -> Observed:
    """The job's pods (a running pod with its log tail, as its stream last delivered it), its
    workspace claim and its spec.model.fromJob source, from the informer. The API is read only for
    a claim a launch needs that the watch cannot show (a user's own claim)."""
    meta = job["metadata"]
    ns, uid, status = str(meta.get("namespace")), meta.get("uid"), job.get("status") or {}
    pods = [
        p for p in informer.pods(ns, meta["name"])
        if not uid or any(o.get("uid") == uid for o in p["metadata"].get("ownerReferences") or [])
    ]  # fmt: skip
    # A deleted pod's final state may be gone from the cache by the time we look; its last watch
    # event carried it (see on_pod_event), so the attempt still gets its real exit code and summary.
    listed = {p["metadata"]["name"] for p in pods}
    for attempt in status.get("attempts") or []:
        body = informer.ended.get((ns, str(attempt.get("pod"))))
        if attempt.get("result") or attempt.get("pod") in listed or body is None:
            continue
        if any(o.get("uid") == uid for o in body["metadata"].get("ownerReferences") or []):
            pods.append(body)
    active = status.get("phase") not in (*TERMINAL_PHASES, PHASE_SUSPENDED) and not (job.get("spec") or {}).get("suspend")
    observations, follower = [], _state["follower"]
    for pod in pods:
        tail, pod_name = None, str(pod["metadata"]["name"])
        # of a gang, only member 0 (global rank 0) prints progress: the others' logs are not read
        member = (pod["metadata"].get("labels") or {}).get(LABEL_RANK, "0")
        if (active and member == "0" and (pod.get("status") or {}).get("phase") == "Running"
                and not pod["metadata"].get("deletionTimestamp")):  # fmt: skip
            tail = _follower(kube).tail(ns, pod_name)  # as its log stream last delivered it: no request
        elif follower is not None:
            follower.stop(ns, pod_name)
        workload = informer.workload(ns, pod_name) if gated_by_kueue(pod) else None  # why Kueue holds it
        observations.append(observe_pod(pod, tail.text if tail else None, tail.error if tail else None, workload))
    try:
        spec = parse_spec(job.get("spec"))
    except SpecError:
        return Observed(pods=tuple(observations), claim_exists=False)
    if not all(o.ended for o in observations):  # reconcile looks at claims and source only to launch
        return Observed(pods=tuple(observations), claim_exists=True)
    launching = status.get("phase") not in TERMINAL_PHASES
    claim = claim_name(meta["name"], spec)
    claim_exists = informer.claim_seen(ns, claim)
    if spec.storage.claim_name and not claim_exists:  # a user's claim: no label, so not watched
        relaunch = launching or status.get("reason") in (REASON_INVALID_SPEC, REASON_CONFIG_TOO_LARGE)
        claim_exists = not relaunch or await _claim_exists(kube, informer, ns, claim)
    source, source_claim = None, None
    if spec.model.from_job and spec.model.from_job != meta["name"] and launching:
        recorded = recorded_source(status, spec.model.from_job)
        if recorded is None:
            source = informer.job(ns, spec.model.from_job)  # reconcile judges it
        else:  # a source deleted with reclaimPolicy Delete takes its claim along
            source_claim = await _claim_exists(kube, informer, ns, recorded.claim)
    secrets = await _secret_keys(kube, ns, spec) if launching else None
    return Observed(pods=tuple(observations), claim_exists=claim_exists, source_job=source,
                    source_claim_exists=source_claim, secrets=secrets)  # fmt: skip


async def _secret_keys(kube: Kube, ns: str, spec: FineTuneSpec) -> dict[str, frozenset[str]] | None:
    """The key names of the Secrets spec.credentials references (read only before a launch, as
    reconcile asks only then). Names and keys only: a value never leaves this function."""
    wanted = sorted({k.secret for k in spec.credentials.secret_keys()})
    if not wanted:
        return None
    found: dict[str, frozenset[str]] = {}
    for secret in wanted:
        try:
            body = await kube.get("v1", "secrets", ns, secret)
        except ApiError as e:
            if e.status != 403:
                raise
            # An install without the `get secrets` grant (README: RBAC): no check before the launch;
            # a missing Secret then holds the pod (CreateContainerConfigError), which status names.
            if not _state.get("secrets_forbidden"):
                _state["secrets_forbidden"] = True
                log.info("no access to Secrets (%s): a missing credential is reported by the pod that waits "
                         "for it, not before its launch", e)  # fmt: skip
            return None
        if body is not None:
            found[secret] = frozenset((body.get("data") or {}) | (body.get("stringData") or {}))
    return found


async def apply(kube: Kube, job: dict[str, Any], plan: Plan, logger: Any, informer: Informer | None = None,
                events: EventQueue | None = None) -> None:  # fmt: skip
    """Carry out a plan: creates (409 = already there), deletes, the status patch, TTL; its Events
    go to `events` (posted off the pass's path), or are posted here without one."""
    meta = job["metadata"]
    ns, name = meta.get("namespace"), meta["name"]
    for obj in plan.create:
        try:
            created = await kube.create(obj)
        except ApiError as e:  # quota, admission, RBAC: say so on the job, retry later
            what = f"cannot create {obj['kind']} {obj['metadata']['name']}: {e}"
            reason = {"reason": "CreateFailed", "message": what}
            await kube.patch(API_VERSION, PLURAL, ns, name, {"status": reason}, subresource="status")
            raise kopf.TemporaryError(what, delay=SETTINGS.pending_interval) from e
        if obj["kind"] == "Pod" and informer is not None:
            informer.created(str(ns), created if isinstance(created, dict) and created.get("metadata") else obj)
        logger.log(logging.DEBUG if created else logging.INFO, "%s %s %s/%s",  # the transition line says it
                   "created" if created else "found existing", obj["kind"], ns, obj["metadata"]["name"])  # fmt: skip
    for d in plan.delete:
        if informer is not None and not informer.deleting(str(ns), d.name):
            continue  # asked already; the watch has not shown its deletionTimestamp yet
        if await kube.delete("v1", "pods", ns, d.name, d.grace_seconds):
            logger.debug("deleting Pod %s/%s", ns, d.name)
    if plan.status is not None:
        written = await kube.patch(API_VERSION, PLURAL, ns, name, {"status": plan.status}, subresource="status")
        if informer is not None:
            informer.wrote(str(ns), name, written)
    for event in plan.events:
        if events is not None:
            events.put(event)
            continue
        try:
            await kube.create(event)
        except ApiError as e:  # an Event is best effort; the status already tells the story
            logger.warning("could not post event %s: %s", event["reason"], e)
    if plan.delete_job:
        logger.info("[%s/%s] ttlSecondsAfterFinished passed: deleting the job", ns, name)
        await kube.delete(API_VERSION, PLURAL, ns, name)


def _log_transition(ns: str, name: str, job: dict[str, Any], plan: Plan) -> None:
    """One line per transition (phase or reason change) or error; nothing for a quiet pass."""
    old, new = job.get("status") or {}, plan.status or {}
    if plan.status is None or (new.get("phase", old.get("phase")), new.get("reason", old.get("reason"))) == (
        old.get("phase"), old.get("reason")
    ):
        return
    level = logging.ERROR if plan.permanent_error else logging.INFO
    log.log(level, "[%s/%s] %s/%s: %s", ns, name, new.get("phase", old.get("phase")),
            new.get("reason", old.get("reason")), new.get("message", old.get("message")))  # fmt: skip


def _schedule(namespace: str, name: str, after: float | None) -> None:
    scheduler: Scheduler | None = _state["scheduler"]
    if scheduler is not None:
        delay = SAFETY_RESYNC if after is None else min(after, SAFETY_RESYNC)
        scheduler.at((namespace, name), time.monotonic() + delay)


async def reconcile_job(namespace: str, name: str, logger: Any = log) -> Plan | None:
    """One level-triggered pass for one job; None when the job is gone or being deleted.
    Errors are logged (one line) and retried after pending_interval; they never raise."""
    async with _lock(namespace, name):
        started = time.perf_counter()
        informer = _informer()
        job = informer.job(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            metrics.observe_phase(namespace, name, None)
            return None
        try:
            kube = await _kube()
            plan = reconcile(job, await observe(kube, informer, job), dt.datetime.now(dt.timezone.utc), SETTINGS)
            _log_transition(namespace, name, job, plan)
            await apply(kube, job, plan, logger, informer, _events(kube))
            if plan.phase in TERMINAL_PHASES and (job.get("status") or {}).get("phase") != plan.phase:
                for other in informer.continuing_from(namespace, name):  # due now, not at their next look
                    _schedule(namespace, other, 0.0)
        except Exception as e:
            metrics.RECONCILE_ERRORS.inc()
            log.warning("[%s/%s] reconcile failed, retrying in %.0fs: %s", namespace, name,
                        SETTINGS.pending_interval, e)  # fmt: skip
            _schedule(namespace, name, SETTINGS.pending_interval)
            return None
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        _schedule(namespace, name, plan.requeue_after)
        metrics.observe_phase(namespace, name, plan.phase)
        metrics.observe_attempts(plan.ended)
        return plan


async def prune_cache(kube: Kube, informer: Informer) -> int:
    """One LIST of FineTuneJobs and one of the operator's pods per namespace the cache knows: what
    the LIST lacks was deleted while a watch was down (kopf's indexes keep it: a re-list sends no
    DELETED). Its jobs are looked at now. Runs every safety resync: a few requests per interval
    for the whole operator, none per job. Returns how many objects were found gone."""
    found = 0
    for ns in sorted(informer.namespaces()):
        for kind, path, selector in (("jobs", resource_path(API_VERSION, PLURAL, ns), None),
                                     ("pods", resource_path("v1", "pods", ns), LABEL_JOB)):  # fmt: skip
            doc = await kube.request("GET", path, params={"labelSelector": selector} if selector else None)
            names = [str(o["metadata"]["name"]) for o in doc.get("items") or []]
            try:
                list_rv = int((doc.get("metadata") or {}).get("resourceVersion") or 0)
            except ValueError:
                continue
            touched = informer.prune(kind, ns, names, list_rv)
            found += len(touched)
            for job in touched:
                _schedule(ns, job, 0.0)
    if found:
        log.warning("%d cached objects were deleted while a watch was down; looking at their jobs again", found)
    return found


async def prune_loop() -> None:
    while True:
        await asyncio.sleep(SAFETY_RESYNC)
        if _state["paused"]:
            continue
        try:
            await prune_cache(await _kube(), _informer())
        except Exception as e:
            log.warning("cache check against the API failed: %s", _error_text(e))
