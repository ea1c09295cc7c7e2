"""Pure builders of the children a FineTuneJob owns: worker pods, the workspace PVC, Events.

Every function returns a plain dict (a Kubernetes manifest) and deep-copies whatever it takes
from the user's spec, so a later mutation of a manifest can never leak back into the job object.
No I/O, no kopf, no API client.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from finetune_api.contract import (
    API_VERSION,
    CONFIG_ENV,
    DEFAULT_WORKSPACE,
    EXPORT_DIR,
    GROUP,
    KIND,
    SOURCE_EXPORT_ENV,
)
from finetune_api.remote import credential_env
from finetune_api.spec import FineTuneSpec

LABEL_JOB = f"{GROUP}/job"
LABEL_ROLE = f"{GROUP}/role"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_RANK = f"{GROUP}/rank"  # a multi-node gang's member (gang.py)
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue's WorkloadPriorityClass of a pod: a FineTuneJob labelled with it (as a Job would be) passes
# it to its pods, so Kueue orders and preempts by it (spec.priorityClassName, a PriorityClass, also
# counts for Kueue, and for the kube-scheduler's own preemption too)
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
ROLE_TRAIN = "train"
ROLE_EXPORT = "export"
ROLES = (ROLE_TRAIN, ROLE_EXPORT)
DEFAULT_WORKER_IMAGE = "ghcr.io/finetune-operator/worker:0.1.0"
WORKER_COMMAND = "finetune-worker"
WORKSPACE_VOLUME = "workspace"
SOURCE_VOLUME = "source-workspace"
# spec.model.fromJob: the source job's export is mounted read-only at <JOBS_ROOT>/<job>/export and
# SOURCE_EXPORT_ENV names that mount for the worker (finetune_worker.modelsrc).
JOBS_ROOT = "/finetune/jobs"
CONTAINER_NAME = "worker"
WORKER_UID = 1000
CONFIG_ENV_MAX_BYTES = 100 * 1024  # what we allow in one env var (the kubelet's limit is near 128 KiB)
COMPONENT = "finetune-operator"


def rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_name(job_name: str, role: str, attempt: int) -> str:
    """Deterministic child name, `<job>-train-3`: creating it twice is a 409, never a duplicate."""
    return f"{job_name}-{role}-{attempt}"


def claim_name(job_name: str, spec: FineTuneSpec) -> str:
    return spec.storage.claim_name or f"{job_name}-workspace"


@dataclass(frozen=True)
class SourceWorkspace:
    """The job a `spec.model.fromJob` continues from: its name and its workspace claim."""

    job: str
    claim: str


def needs_source(spec: FineTuneSpec, role: str) -> bool:
    """Whether a `role` pod reads the fromJob source's export: training always (it is the base);
    export only to merge a LoRA adapter onto it (a full fine-tune's result is self-contained)."""
    return spec.model.from_job is not None and (role == ROLE_TRAIN or spec.lora is not None)


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    meta = job["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_labels(job_name: str, role: str | None = None, attempt: int | None = None) -> dict[str, str]:
    labels = {LABEL_JOB: job_name, "app.kubernetes.io/managed-by": COMPONENT}
    if role is not None:
        labels[LABEL_ROLE] = role
    if attempt is not None:
        labels[LABEL_ATTEMPT] = str(attempt)
    return labels


def worker_config(job: dict[str, Any]) -> str:
    """The JSON a worker pod receives in FINETUNE_CONFIG: the FineTuneJob as observed."""
    meta = job.get("metadata") or {}
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid") if k in meta},
        "spec": job.get("spec") or {},
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def config_too_large(job: dict[str, Any]) -> str | None:
    """A user-facing message when the worker config cannot travel in an env var, else None."""
    size = len(worker_config(job).encode())
    if size <= CONFIG_ENV_MAX_BYTES:
        return None
    return (
        f"the job's spec is {size // 1024} KiB as JSON; worker pods receive it in an environment "
        f"variable capped at {CONFIG_ENV_MAX_BYTES // 1024} KiB. Move spec.dataset.inline (or eval.inline) "
        "records into a file on the workspace and set spec.dataset.path instead"
    )


def build_pvc(job: dict[str, Any], spec: FineTuneSpec) -> dict[str, Any]:
    """The workspace claim. It gets an ownerReference (and so dies with the job) only when
    storage.reclaimPolicy is Delete; with Retain it outlives the job and keeps checkpoints."""
    name = job["metadata"]["name"]
    meta: dict[str, Any] = {
        "name": claim_name(name, spec),
        "namespace": job["metadata"].get("namespace"),
        "labels": child_labels(name),
    }
    if spec.storage.reclaim_policy == "Delete":
        meta["ownerReferences"] = [owner_reference(job)]
    pvc_spec: dict[str, Any] = {
        "accessModes": list(spec.storage.access_modes),
        "resources": {"requests": {"storage": spec.storage.size}},
    }
    if spec.storage.storage_class_name:
        pvc_spec["storageClassName"] = spec.storage.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": pvc_spec}


def _resources(spec: FineTuneSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, Any] = {"cpu": r.cpu, "memory": r.memory}
    limits: dict[str, Any] = {"memory": r.memory}
    if r.gpus > 0:
        requests[r.gpu_resource] = r.gpus
        limits[r.gpu_resource] = r.gpus
    return {"requests": requests, "limits": limits}


# The worker's security context: non-root, no escalation, nothing the kernel grants by default.
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# The pod's: the workspace volume owned by the worker's group (fsGroup), seccomp on.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": WORKER_UID, "fsGroup": WORKER_UID,
                "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def build_pod(
    job: dict[str, Any],
    spec: FineTuneSpec,
    role: str,
    attempt: int,
    *,
    image: str | None = None,
    grace_seconds: int = 300,
    source: SourceWorkspace | None = None,
) -> dict[str, Any]:
    """A worker pod for `role` (train or export), attempt number `attempt`.

    Args:
        job: the FineTuneJob object (metadata.name/namespace/uid are used).
        spec: its parsed spec.
        role: `train` or `export`.
        attempt: 1-based attempt number of that role; part of the pod name.
        image: the operator's default worker image (spec.image wins).
        grace_seconds: terminationGracePeriodSeconds, long enough for a checkpoint on SIGTERM.
        source: the fromJob source: its claim's `export/` is mounted read-only at
            `JOBS_ROOT/<job>/export`, and `FINETUNE_SOURCE_EXPORT` names that mount for the
            worker (reconcile refuses a source on this job's own claim).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    name = job["metadata"]["name"]
    labels = child_labels(name, role, attempt)
    if spec.queue_name:
        labels[QUEUE_LABEL] = spec.queue_name
        priority = (job["metadata"].get("labels") or {}).get(PRIORITY_LABEL)
        if priority:
            labels[PRIORITY_LABEL] = str(priority)
    container = _container(job, spec, role, attempt, spec.image or image or DEFAULT_WORKER_IMAGE)
    volumes = _volumes(spec, role, name, container, source)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, role, attempt),
            "namespace": job["metadata"].get("namespace"),
            "labels": labels,
            "annotations": {f"{GROUP}/generation": str(job["metadata"].get("generation", ""))},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": _pod_spec(spec, container, volumes, grace_seconds),
    }


def _container(job: dict[str, Any], spec: FineTuneSpec, role: str, attempt: int, image: str) -> dict[str, Any]:
    """The worker container: its command, the job's spec as FINETUNE_CONFIG, the workspace mount."""
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [WORKER_COMMAND, role, "--workspace", DEFAULT_WORKSPACE],
        "env": [
            {"name": CONFIG_ENV, "value": worker_config(job)},
            {"name": "FINETUNE_JOB_NAME", "value": job["metadata"]["name"]},
            {"name": "FINETUNE_ATTEMPT", "value": str(attempt)},
            {"name": "HOME", "value": f"{DEFAULT_WORKSPACE}/.home"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": _resources(spec),
        "volumeMounts": [{"name": WORKSPACE_VOLUME, "mountPath": DEFAULT_WORKSPACE}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }


def _volumes(spec: FineTuneSpec, role: str, name: str, container: dict[str, Any],
             source: SourceWorkspace | None) -> list[dict[str, Any]]:  # fmt: skip
    """The pod's volumes: the workspace claim, the fromJob source's export (read-only) and the
    credentials' Secrets; their mounts and variables are added to `container`."""
    volumes: list[dict[str, Any]] = [
        {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": claim_name(name, spec)}}
    ]
    if source is not None:
        mount = f"{JOBS_ROOT}/{source.job}/{EXPORT_DIR}"
        volumes.append({"name": SOURCE_VOLUME,
                        "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}})  # fmt: skip
        container["volumeMounts"].append({"name": SOURCE_VOLUME, "mountPath": mount,
                                          "subPath": EXPORT_DIR, "readOnly": True})  # fmt: skip
        container["env"].append({"name": SOURCE_EXPORT_ENV, "value": mount})
    cred_env, cred_volumes, cred_mounts = credential_env(spec.credentials, registry=role == ROLE_EXPORT)
    container["env"] += cred_env
    container["volumeMounts"] += cred_mounts
    return volumes + cred_volumes


def _pod_spec(spec: FineTuneSpec, container: dict[str, Any], volumes: list[dict[str, Any]],
              grace_seconds: int) -> dict[str, Any]:  # fmt: skip
    """Never restarted in place (the operator makes the next attempt), no API token, no service
    links; placement from the spec."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_seconds,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = copy.deepcopy(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(list(spec.tolerations))
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    return pod_spec


def build_event(
    job: dict[str, Any], type_: str, reason: str, message: str, now: dt.datetime, seq: int = 0
) -> dict[str, Any]:
    """A core/v1 Event about the job, as `kubectl describe ftj` lists them."""
    meta = job["metadata"]
    stamp = rfc3339(now)
    digest = hashlib.sha1(
        f"{meta.get('uid', '')}{reason}{message}{now.isoformat()}{seq}".encode()
    ).hexdigest()[:10]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{digest}", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid", ""),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
    }
