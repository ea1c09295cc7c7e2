"""kopf handlers: thin. Each one gathers observations, calls `reconcile`, applies the plan.

Every trigger (create, spec update, operator resume, a timer, any event of a child pod) runs the
same `reconcile_job(namespace, name)`: read the job fresh from the API, list its pods, read the
running pod's log tail, check its claim, decide, apply. A per-job lock keeps two triggers of one
job from interleaving; jobs never wait on each other.

Environment (read at import; `finetune-operator run` documents them):
  FINETUNE_WORKER_IMAGE        default worker image (spec.image wins)
  FINETUNE_RESYNC_SECONDS      how often a running job's progress is read from its pod (default 5)
  FINETUNE_TIMER_TICK          timer tick: the resolution of requeues, backoff and TTL (default 1)
  FINETUNE_GRACE_SECONDS       terminationGracePeriodSeconds of worker pods (default 300)
  FINETUNE_BACKOFF_SECONDS     first retry delay after a failure (default 10; doubles, capped at
  FINETUNE_BACKOFF_MAX_SECONDS 300)
  FINETUNE_KUBE_SERVER         plain-URL API server for tests / `kubectl proxy` (see kube.py)
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import os
import time
from typing import Any

import kopf

from . import metrics
from .builders import DEFAULT_WORKER_IMAGE, LABEL_JOB, claim_name
from .contract import API_VERSION, GROUP, PLURAL, VERSION
from .kube import SERVER_ENV, ApiError, Kube
from .observe import LOG_TAIL_LINES, Observed, observe_pod
from .reconcile import Plan, Settings, reconcile, recorded_source
from .spec import SpecError, parse_spec
from .status import TERMINAL_PHASES


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
TIMER_TICK = float(os.environ.get("FINETUNE_TIMER_TICK") or 1.0)
ENDED_CACHE_SIZE = 4096
_state: dict[str, Any] = {"kube": None, "locks": {}, "due": {}, "ended": collections.OrderedDict()}


def _kube() -> Kube:
    if _state["kube"] is None:
        _state["kube"] = Kube()
    kube: Kube = _state["kube"]
    return kube


def _lock(namespace: str, name: str) -> asyncio.Lock:
    locks: dict[tuple[str, str], asyncio.Lock] = _state["locks"]
    return locks.setdefault((namespace, name), asyncio.Lock())


async def observe(kube: Kube, job: dict[str, Any]) -> Observed:
    """List the job's pods (read the log tail of running ones), check its workspace claim, and read
    the spec.model.fromJob source job (same namespace) for reconcile to judge."""
    meta = job["metadata"]
    ns, uid = meta.get("namespace"), meta.get("uid")
    pods = [
        p for p in await kube.list("v1", "pods", ns, {LABEL_JOB: meta["name"]})
        if not uid or any(o.get("uid") == uid for o in p["metadata"].get("ownerReferences") or [])
    ]  # fmt: skip
    # A deleted pod's final state may be gone from the API by the time we list; its last watch
    # event carried it (see on_pod_event), so the attempt still gets its real exit code and summary.
    listed = {p["metadata"]["name"] for p in pods}
    ended: collections.OrderedDict[tuple[str, str], dict[str, Any]] = _state["ended"]
    for attempt in (job.get("status") or {}).get("attempts") or []:
        body = ended.get((str(ns), str(attempt.get("pod"))))
        if attempt.get("result") or attempt.get("pod") in listed or body is None:
            continue
        if any(o.get("uid") == uid for o in body["metadata"].get("ownerReferences") or []):
            pods.append(body)
    observations = []
    for pod in pods:
        tail = None
        if (pod.get("status") or {}).get("phase") == "Running":
            tail = await kube.pod_log(ns, pod["metadata"]["name"], LOG_TAIL_LINES)
        observations.append(observe_pod(pod, tail))
    try:
        spec = parse_spec(job.get("spec"))
    except SpecError:
        return Observed(pods=tuple(observations), claim_exists=False)
    claim = claim_name(meta["name"], spec)
    claim_exists = await kube.get("v1", "persistentvolumeclaims", ns, claim) is not None
    source, source_claim = None, None
    status = job.get("status") or {}
    launching = status.get("phase") not in TERMINAL_PHASES and all(o.ended for o in observations)
    if spec.model.from_job and spec.model.from_job != meta["name"] and launching:  # reconcile only asks then
        recorded = recorded_source(status, spec.model.from_job)
        if recorded is None:
            source = await kube.get(API_VERSION, PLURAL, ns, spec.model.from_job)  # reconcile judges it
        else:  # a source deleted with reclaimPolicy Delete takes its claim along
            source_claim = await kube.get("v1", "persistentvolumeclaims", ns, recorded.claim) is not None
    secrets = None
    if launching and spec.credentials.secret_keys():  # names and keys only: a value never leaves here
        secrets = {}
        for secret in sorted({k.secret for k in spec.credentials.secret_keys()}):
            found = await kube.get("v1", "secrets", ns, secret)
            if found is not None:
                secrets[secret] = frozenset((found.get("data") or {}) | (found.get("stringData") or {}))
    return Observed(pods=tuple(observations), claim_exists=claim_exists, source_job=source,
                    source_claim_exists=source_claim, secrets=secrets)  # fmt: skip


async def apply(kube: Kube, job: dict[str, Any], plan: Plan, logger: Any) -> None:
    """Carry out a plan: creates (409 = already there), deletes, the status patch, Events, TTL."""
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
        logger.info(
            "%s %s/%s", "created" if created else "found existing", obj["kind"], obj["metadata"]["name"]
        )
    for d in plan.delete:
        await kube.delete("v1", "pods", ns, d.name, d.grace_seconds)
    if plan.status is not None:
        await kube.patch(API_VERSION, PLURAL, ns, name, {"status": plan.status}, subresource="status")
    for event in plan.events:
        try:
            await kube.create(event)
        except ApiError as e:  # an Event is best effort; the status already tells the story
            logger.warning("could not post event %s: %s", event["reason"], e)
    if plan.delete_job:
        logger.info("ttlSecondsAfterFinished passed: deleting the job")
        await kube.delete(API_VERSION, PLURAL, ns, name)


async def _wake_continuations(kube: Kube, namespace: str, name: str) -> None:
    """A job just finished: jobs continuing from it (spec.model.fromJob) are due now, not at their
    next pending_interval."""
    for other in await kube.list(API_VERSION, PLURAL, namespace):
        if ((other.get("spec") or {}).get("model") or {}).get("fromJob") == name:
            _state["due"][(namespace, other["metadata"]["name"])] = 0.0


async def reconcile_job(namespace: str, name: str, logger: Any) -> Plan | None:
    """One level-triggered pass for one job; None when the job is gone or being deleted."""
    async with _lock(namespace, name):
        started = time.perf_counter()
        kube = _kube()
        try:
            job = await kube.get(API_VERSION, PLURAL, namespace, name)
            if job is None or job["metadata"].get("deletionTimestamp"):
                metrics.observe_phase(namespace, name, None)
                return None
            plan = reconcile(job, await observe(kube, job), dt.datetime.now(dt.timezone.utc), SETTINGS)
            await apply(kube, job, plan, logger)
            if plan.phase in TERMINAL_PHASES and (job.get("status") or {}).get("phase") != plan.phase:
                await _wake_continuations(kube, namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            _state["due"][(namespace, name)] = (
                time.monotonic() + SETTINGS.pending_interval
            )  # no hot retry loop
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        due = float("inf") if plan.requeue_after is None else time.monotonic() + plan.requeue_after
        _state["due"][(namespace, name)] = due
        metrics.observe_phase(namespace, name, plan.phase)
        metrics.observe_attempts(plan.ended)
        return plan


# -- kopf wiring --------------------------------------------------------------------------------


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Startup settings: watch/request timeouts, our own Events only, bookkeeping in annotations."""
    global SETTINGS
    SETTINGS = settings_from_env()
    _state["locks"] = {}
    _state["due"] = {}
    _state["ended"] = collections.OrderedDict()
    _state["kube"] = None
    settings.posting.level = max(settings.posting.level, logging.WARNING)  # we post our own Events
    settings.watching.server_timeout = settings.watching.server_timeout or 300
    settings.watching.client_timeout = settings.watching.client_timeout or 330
    settings.watching.connect_timeout = settings.watching.connect_timeout or 30
    settings.networking.request_timeout = min(settings.networking.request_timeout or 60, 60)
    # watch only our pods, server-side: a cluster's other pods cost neither bandwidth nor memory
    settings.watching.label_selectors["v1", "pods"] = LABEL_JOB
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    if _state["kube"] is not None:
        await _state["kube"].close()
        _state["kube"] = None


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """FINETUNE_KUBE_SERVER when set, else the service account, else a kubeconfig."""
    if os.environ.get(SERVER_ENV):
        return kopf.ConnectionInfo(server=os.environ[SERVER_ENV], insecure=True, default_namespace="default")
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def on_change(name: str, namespace: str | None, logger: Any, **_: Any) -> None:
    plan = await reconcile_job(str(namespace), name, logger)
    if plan is not None and plan.permanent_error:
        raise kopf.PermanentError(plan.permanent_error)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TIMER_TICK, initial_delay=TIMER_TICK)
async def on_timer(name: str, namespace: str | None, status: Any, spec: Any, logger: Any, **_: Any) -> None:
    """Requeues: reconcile when the last plan's requeue_after is due (live progress, backoff, TTL).
    A tick that is not due costs a dict lookup; finished jobs without a TTL are never due."""
    namespace = str(namespace)
    due = _state["due"].get((namespace, name))
    if due is None and status.get("phase") in TERMINAL_PHASES and spec.get("ttlSecondsAfterFinished") is None:
        return
    if due is None or time.monotonic() >= due:
        await reconcile_job(namespace, name, logger)


@kopf.on.event("v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def on_pod_event(body: Any, namespace: str | None, logger: Any, **_: Any) -> None:
    owner = next((o for o in body.get("metadata", {}).get("ownerReferences") or []
                  if o.get("apiVersion") == API_VERSION), None)  # fmt: skip
    if owner is None:
        return
    if (body.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        ended: collections.OrderedDict[tuple[str, str], dict[str, Any]] = _state["ended"]
        ended[(str(namespace), body["metadata"]["name"])] = dict(body)
        while len(ended) > ENDED_CACHE_SIZE:
            ended.popitem(last=False)
    await reconcile_job(str(namespace), owner["name"], logger)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def on_delete(name: str, namespace: str | None, **_: Any) -> None:
    """No finalizer (optional): children go through ownerReferences; this only updates metrics."""
    namespace = str(namespace)
    metrics.observe_phase(namespace, name, None)
    _state["due"].pop((namespace, name), None)
    _state["locks"].pop((namespace, name), None)
