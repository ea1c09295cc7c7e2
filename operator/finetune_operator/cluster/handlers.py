"""kopf handlers: thin wiring. Watches feed the informer; every trigger runs passes.reconcile_job.

kopf indexes hold the FineTuneJobs, their pods and their claims (filled from watches before any
handler runs); a FineTuneJob or pod event runs the job's pass (passes.py), and one operator-wide
scheduler task (informer.Scheduler, started here at startup) runs the passes that are due:
backoff, TTL, the progress update of a running pod, the safety resync. A running pod's log is
followed by one stream (logfollow.py), not read per interval.

No finalizer: no kopf timer, daemon or mandatory deletion handler is registered for FineTuneJobs
(kopf adds its finalizer for those, and removes it from jobs of older versions on sight); children
go with the job through ownerReferences.

Environment (read at startup; README "Operator settings and metrics"):
  FINETUNE_WORKER_IMAGE          default worker image (spec.image wins)
  FINETUNE_RESYNC_SECONDS        how often, at most, a running pod's progress (followed in its log)
                                 is written to status (default 5)
  FINETUNE_SAFETY_RESYNC_SECONDS every job is reconciled from the cache at least this often (600)
  FINETUNE_GRACE_SECONDS         terminationGracePeriodSeconds of worker pods (default 300)
  FINETUNE_BACKOFF_SECONDS       first retry delay after a failure (default 10; doubles, capped at
  FINETUNE_BACKOFF_MAX_SECONDS   300)
  FINETUNE_PEERING_LIFETIME      HA: seconds a replica's peering record lives (default 60)
  FINETUNE_KUBE_SERVER           plain-URL API server for tests / `kubectl proxy` (see kube.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import kopf

from finetune_api.contract import API_VERSION, GROUP, PLURAL, VERSION
from finetune_operator.cluster import metrics, passes
from finetune_operator.cluster.informer import Informer, Scheduler
from finetune_operator.cluster.kube import ApiError, credentials, load_configuration
from finetune_operator.cluster.passes import _state, apply, log, observe, reconcile_job
from finetune_operator.decisions.builders import LABEL_JOB
from finetune_operator.decisions.kueue import (
    WORKLOAD_GROUP,
    WORKLOAD_PLURAL,
    WORKLOAD_VERSION,
    workload_pods,
    workload_view,
)

__all__ = ["apply", "login", "observe", "reconcile_job"]


# -- kopf wiring --------------------------------------------------------------------------------


class _QuietSuccess(logging.Filter):
    """kopf logs "Handler '...' succeeded." at INFO for every event (and "Activity '...' succeeded."
    at startup): DEBUG here, dropped unless the operator runs with --verbose. Installed on the
    kopf.objects logger and, by `finetune-operator run`, on the root handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).endswith(" succeeded."):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


QUIET_SUCCESS = _QuietSuccess()
PEERING_LOGGER = "kopf._core.engines.peering"
PEERING_API = "kopf.dev/v1"


class _PeeringState(logging.Handler):
    """Whether kopf paused this replica for a peer (HA standby). kopf keeps that toggle to itself and
    stops only its own watch streams; our scheduler must stop too, so it follows kopf's peering
    lines ("Pausing operations ...", "Resuming operations ...", kopf 1.45)."""

    def emit(self, record: logging.LogRecord) -> None:
        text = str(record.msg)
        if text.startswith("Pausing "):
            _state["paused"] = True
            metrics.set_active(False)
            follower = _state["follower"]
            if follower is not None:  # a standby reads no logs; the active replica follows them
                _state["follower"] = None
                with contextlib.suppress(RuntimeError):  # no running loop: nothing is followed either
                    asyncio.get_running_loop().create_task(follower.close())
        elif text.startswith("Resuming operations"):
            _state["paused"] = False
            metrics.set_active(True)


PEERING_STATE = _PeeringState()


async def _join_peering(settings: kopf.OperatorSettings) -> None:
    """Cluster-wide peering, whichever namespaces are served (one object to create and grant); the
    ClusterKopfPeering is created if missing, so an install needs only its CRD."""
    settings.peering.clusterwide = True
    settings.peering.lifetime = int(os.environ.get("FINETUNE_PEERING_LIFETIME") or 60)
    _state["paused"] = settings.peering.mandatory  # kopf starts a mandatory peer paused
    metrics.set_active(not _state["paused"])
    peering = logging.getLogger(PEERING_LOGGER)
    peering.setLevel(min(peering.getEffectiveLevel(), logging.INFO))
    if PEERING_STATE not in peering.handlers:
        peering.addHandler(PEERING_STATE)
    obj = {"apiVersion": PEERING_API, "kind": "ClusterKopfPeering", "metadata": {"name": settings.peering.name}}
    kube = await passes._kube()
    try:
        await kube.request("POST", f"/apis/{PEERING_API}/clusterkopfpeerings", body=obj)
        log.info("created ClusterKopfPeering %s", settings.peering.name)
    except ApiError as e:  # kopf keeps this replica paused without its peering: say what to do
        if e.status != 409:
            log.error("peering %r: cannot create the ClusterKopfPeering (%s); this replica stays paused until it "
                      "exists: apply manifests/peering (its CRD), grant create on clusterkopfpeerings, or run "
                      "with no --peering for a single replica", settings.peering.name, e)  # fmt: skip


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """No handler here reacts to a diff (no on.create/update/field): kopf still built a deep-copied
    "essence" of every object on every event to diff against (6% of the operator's CPU with 500
    jobs created at once, py-spy). Nothing to diff: an empty essence, and nothing stored."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    """Startup settings: watch/request timeouts, our own Events only, server-side label selectors;
    the informer over kopf's indexes; the scheduler task."""
    passes.SETTINGS = passes.settings_from_env()
    passes.SAFETY_RESYNC = float(os.environ.get("FINETUNE_SAFETY_RESYNC_SECONDS") or 600)
    _state["locks"] = {}
    _state["kube"] = None
    _state["follower"] = None
    _state["events"] = None
    _state["informer"] = Informer(kwargs["ftj_jobs"], kwargs["ftj_pods"], kwargs["ftj_claims"], kwargs["ftj_workloads"])
    _state["paused"] = False
    if not settings.peering.standalone:
        await _join_peering(settings)
    scheduler = Scheduler(lambda ns, name: reconcile_job(ns, name), paused=lambda: bool(_state["paused"]))
    _state["scheduler"] = scheduler
    _state["task"] = asyncio.create_task(scheduler.loop(), name="finetune-scheduler")
    _state["prune"] = asyncio.create_task(passes.prune_loop(), name="finetune-cache-check")
    logging.getLogger("kopf.objects").addFilter(QUIET_SUCCESS)
    settings.posting.level = max(settings.posting.level, logging.WARNING)  # we post our own Events
    watch_timeout = int(os.environ.get("FINETUNE_WATCH_TIMEOUT_SECONDS") or 300)  # timeoutSeconds: an integer
    settings.watching.server_timeout = settings.watching.server_timeout or watch_timeout
    settings.watching.client_timeout = settings.watching.client_timeout or watch_timeout + 30
    settings.watching.connect_timeout = settings.watching.connect_timeout or 30
    settings.networking.request_timeout = min(settings.networking.request_timeout or 60, 60)
    # watch only our pods and claims, server-side: a cluster's others cost neither bandwidth nor memory
    settings.watching.label_selectors["v1", "pods"] = LABEL_JOB
    settings.watching.label_selectors["v1", "persistentvolumeclaims"] = LABEL_JOB
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = _NoDiffBase(prefix=GROUP, key="last-handled-configuration")


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    task: asyncio.Task[Any] | None = _state["task"]
    if task is not None:
        _state["prune"].cancel()
        task.cancel()
        await asyncio.gather(task, _state["prune"], return_exceptions=True)
        await _state["scheduler"].stop()
        _state["task"] = _state["scheduler"] = _state["prune"] = None
    if _state["follower"] is not None:
        await _state["follower"].close()
        _state["follower"] = None
    if _state["events"] is not None:  # what a last pass queued, for a few seconds at most
        await _state["events"].close()
        _state["events"] = None
    if _state["kube"] is not None:
        await _state["kube"].close()
        _state["kube"] = None


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf logs in with the operator's own client configuration (kube.py): FINETUNE_KUBE_SERVER,
    else the service account, else the kubeconfig (exec plugins included). It carries an
    expiration, so kopf logs in again (re-reading a rotated token) before it goes stale."""
    creds = await credentials(await load_configuration())
    return kopf.ConnectionInfo(
        server=creds.server, ca_path=creds.ca_path, insecure=creds.insecure, token=creds.token,
        certificate_path=creds.certificate_path, private_key_path=creds.private_key_path,
        expiration=creds.expiration, default_namespace="default",
    )  # fmt: skip


# The index functions are async though they never await: kopf runs a sync handler in a thread
# pool, a hop per watch event that cost latency in a burst of creates (bench_apiserver.py (b)).


@kopf.index(GROUP, VERSION, PLURAL)
async def ftj_jobs(namespace: str | None, name: str, body: Any, **_: Any) -> dict[Any, Any]:
    return {(str(namespace), name): dict(body)}


@kopf.index("v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def ftj_pods(namespace: str | None, labels: Any, body: Any, **_: Any) -> dict[Any, Any]:
    return {(str(namespace), labels[LABEL_JOB]): dict(body)}


@kopf.index("v1", "persistentvolumeclaims", labels={LABEL_JOB: kopf.PRESENT})
async def ftj_claims(namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    return {(str(namespace), name): True}


# Kueue's Workloads (README "Kueue"): why a queued pod waits is said there, not on the pod. kopf
# watches them only where Kueue's CRD exists (it follows CRDs as they come and go); the index keeps
# a small view per pod a Workload stands for, and a change looks at that pod's job again. Read
# only: the operator never writes a Workload (RBAC: get, list, watch).


@kopf.index(WORKLOAD_GROUP, WORKLOAD_VERSION, WORKLOAD_PLURAL)
async def ftj_workloads(namespace: str | None, body: Any, **_: Any) -> dict[Any, Any]:
    view = workload_view(dict(body))
    return {(str(namespace), pod): view for pod in workload_pods(dict(body))}


@kopf.on.event(WORKLOAD_GROUP, WORKLOAD_VERSION, WORKLOAD_PLURAL)
async def on_workload_event(namespace: str | None, body: Any, **_: Any) -> None:
    informer = passes._informer()
    jobs = {informer.job_of_pod(str(namespace), pod) for pod in workload_pods(dict(body))}
    for job in sorted(j for j in jobs if j):
        await reconcile_job(str(namespace), job)


async def _own_echo(namespace: str, job: str, mine: Callable[[], bool]) -> bool:
    """Whether a watch event is the echo of this process's own write for `job` (`mine()` asks the
    informer). The watch may deliver it before the writing pass has read the server's answer:
    then that pass still holds the job's lock, and the question is asked again once it is done
    (else a second pass ran on the echo, and wrote progress that moved a step meanwhile)."""
    if mine():
        return True
    lock = passes._lock(namespace, job)
    if not lock.locked():
        return False
    async with lock:
        pass
    return mine()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_job_event(type: str | None, name: str, namespace: str | None, body: Any, **_: Any) -> None:
    namespace = str(namespace)
    informer = passes._informer()
    if type == "MODIFIED" and await _own_echo(namespace, name, lambda: informer.own_write(namespace, name, body)):
        return  # our own status patch coming back: nothing the writing pass did not know
    if type == "DELETED":
        metrics.observe_phase(namespace, name, None)
        passes._informer().forget_job(namespace, name)
        if _state["scheduler"] is not None:
            _state["scheduler"].forget((namespace, name))
        _state["locks"].pop((namespace, name), None)
        return
    await reconcile_job(namespace, name)


@kopf.on.event("v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def on_pod_event(type: str | None, body: Any, namespace: str | None, **_: Any) -> None:
    owner = next((o for o in body.get("metadata", {}).get("ownerReferences") or []
                  if o.get("apiVersion") == API_VERSION), None)  # fmt: skip
    if owner is None:
        return
    informer = passes._informer()
    if type == "ADDED" and await _own_echo(str(namespace), str(owner["name"]),
                                           lambda: informer.own_create(str(namespace), body)):  # fmt: skip
        return  # the pod we created, unchanged: the creating pass counted it already
    informer.pod_event(str(namespace), body, deleted=type == "DELETED")
    if type == "DELETED" and _state["follower"] is not None:
        _state["follower"].stop(str(namespace), body["metadata"]["name"])
    await reconcile_job(str(namespace), owner["name"])
