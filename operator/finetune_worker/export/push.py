"""Push the published, verified export to `spec.export.push` targets: s3:// prefixes and OCI registries.

Runs after the publish (or when the export pod finds its export already published and current,
e.g. a rerun after a failed push): the merge and verification never run again for a push.

s3://bucket/prefix/ - every file of `export/` under the prefix with its relative path, through
  s3fs (multipart for large shards), and `metadata.json` LAST: it is the completion marker. A
  re-push first removes an older marker (so a kill mid-push never leaves old marker + new files
  that look complete), then files the old export listed that the new one lacks. A target whose
  marker already has this export's fingerprint and every file at its size is left alone.
oci://registry/repository:tag - one OCI artifact (image manifest v1.1):
    artifactType  application/vnd.finetune.dev.model.v1
    config        metadata.json, application/vnd.finetune.dev.model.config.v1+json
    layers        one per file, application/vnd.finetune.dev.model.file.v1, titled
                  (org.opencontainers.image.title) with its path under export/, so `oras pull`
                  lays the export out again
    annotations   org.opencontainers.image.{created,title,description,version,source} and
                  dev.finetune.{base-model,data,steps,loss,formats,metrics,max-deviation,fingerprint}
  Blobs first (a blob the registry has is skipped), the manifest last: a kill mid-push leaves
  unreferenced blobs, never a tag. Credentials: DOCKER_CONFIG/config.json (the dockerconfigjson
  Secret), else ~/.docker/config.json. Plain HTTP only for loopback registries and those listed
  in FINETUNE_INSECURE_REGISTRIES (comma-separated host[:port]).

Errors: denied, bad credentials, not found -> InvalidInput (exit 2, names the target and what to
check); unreachable, timeouts, 429, 5xx -> TransientError (exit 1, the operator retries the push).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_api.contract import EXPORT_METADATA
from finetune_api.remote import DOCKER_CONFIG_ENV, OCI_SCHEME, OciRef, parse_oci_ref

from ..errors import InvalidInput, Preempted, TransientError
from ..summary import emit

ARTIFACT_TYPE = "application/vnd.finetune.dev.model.v1"
CONFIG_MEDIA_TYPE = "application/vnd.finetune.dev.model.config.v1+json"
FILE_MEDIA_TYPE = "application/vnd.finetune.dev.model.file.v1"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INSECURE_ENV = "FINETUNE_INSECURE_REGISTRIES"
CHUNKED_ABOVE = 256 * 2**20  # blobs above this go up in chunks (a plain PUT holds the file in memory)
CHUNK = 64 * 2**20


def export_files(export: Path) -> list[str]:
    """Relative paths of the export's files, metadata.json last."""
    files = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file())
    return [f for f in files if f != EXPORT_METADATA] + [EXPORT_METADATA]


def push_all(targets: tuple[str, ...], export: Path, meta: dict[str, Any],
             check_stop: Callable[[str], None]) -> list[dict[str, Any]]:
    """Push `export` to each target; returns [{target, digest, bytes}] for status.export.pushed.

    check_stop: called between files; raises to stop (a SIGTERM: the operator retries the push).
    """
    pushed = []
    for target in targets:
        emit("export", stage="pushing", target=target)
        if target.startswith(OCI_SCHEME):
            entry = push_oci(export, parse_oci_ref(target), meta, check_stop)
        else:
            entry = push_s3(export, target, meta, check_stop)
        entry = {"target": target, **entry}
        emit("export", stage="pushed", **entry)
        pushed.append(entry)
    return pushed


# -- S3 -----------------------------------------------------------------------------------------


def push_s3(export: Path, target: str, meta: dict[str, Any], check_stop: Callable[[str], None]) -> dict[str, Any]:
    from ..objectstore import classify, filesystem

    fs = filesystem()
    prefix = target.rstrip("/") + "/"
    marker = prefix + EXPORT_METADATA
    files = export_files(export)
    sizes = {rel: (export / rel).stat().st_size for rel in files}
    try:
        listing = {k: v for k, v in fs.find(prefix, detail=True).items() if v.get("type") != "directory"}
        remote = {k[len(prefix) - len("s3://"):]: int(v.get("size") or 0) for k, v in listing.items()}
        old = json.loads(fs.cat_file(marker)) if EXPORT_METADATA in remote else None
        if old is not None and old.get("fingerprint") == meta.get("fingerprint") and all(
            remote.get(rel) == size for rel, size in sizes.items()
        ):
            emit("export", stage="push-current", target=target)
        else:
            if old is not None:  # the completion marker goes first: nothing half-pushed looks complete
                fs.rm_file(marker)
            check_stop(f"before pushing to {target}")
            # one call for every file: s3fs uploads them concurrently, multipart for large shards
            fs.put([str(export / rel) for rel in files[:-1]], [prefix + rel for rel in files[:-1]])
            check_stop(f"while pushing to {target}")
            stale = [prefix + rel for rel in (old or {}).get("files") or {} if rel not in sizes and rel in remote]
            if stale:
                fs.rm(stale)
            fs.put_file(str(export / EXPORT_METADATA), marker)
        etag = str(fs.info(marker).get("ETag") or "").strip('"')
    except (InvalidInput, TransientError, Preempted):
        raise
    except Exception as e:
        raise classify(e, target, "push the export to spec.export.push target") from None
    return {"digest": f"etag:{etag}", "bytes": sum(sizes.values())}


# -- OCI ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 * 2**20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def annotations(meta: dict[str, Any], ref: OciRef) -> dict[str, str]:
    t = meta.get("training") or {}
    out = {
        "org.opencontainers.image.created": str(meta.get("createdAt") or ""),
        "org.opencontainers.image.title": str(meta.get("job") or ref.repository),
        "org.opencontainers.image.description": "Embedding model fine-tuned and verified by finetune-operator",
        "org.opencontainers.image.version": ref.tag,
        "org.opencontainers.image.source": "https://finetune.dev",
        "dev.finetune.base-model": str(meta.get("baseModelSpec") or meta.get("baseModel") or ""),
        "dev.finetune.data": str((meta.get("data") or {}).get("source") or ""),
        "dev.finetune.steps": str(t.get("steps") if t.get("steps") is not None else ""),
        "dev.finetune.loss": str(t.get("loss") or ""),
        "dev.finetune.formats": ",".join(meta.get("formats") or []),
        "dev.finetune.metrics": json.dumps(meta.get("metrics") or {}, sort_keys=True),
        "dev.finetune.max-deviation": "" if meta.get("maxDeviation") is None else str(meta["maxDeviation"]),
        "dev.finetune.fingerprint": str(meta.get("fingerprint") or ""),
    }
    return {k: v for k, v in out.items() if v}


def plain_http(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    listed = {h.strip() for h in os.environ.get(INSECURE_ENV, "").split(",") if h.strip()}
    return host in ("localhost", "127.0.0.1", "[::1]") or registry in listed or host in listed


def registry_client(ref: OciRef) -> tuple[Any, Any]:
    """An ORAS registry client for `ref` with the docker config's credentials loaded, and the container."""
    try:
        import oras.auth.token
        import oras.provider
    except ImportError:
        raise InvalidInput("oci:// push targets need oras: pip install 'finetune-operator[worker]'") from None

    class Auth(oras.auth.token.TokenAuth):  # type: ignore[misc]
        """Token auth (Docker Hub, GHCR, Harbor), plus the Basic challenge of an htpasswd registry."""

        def authenticate_request(self, original: Any, headers: dict[str, str], refresh: bool = False) -> Any:
            challenge = original.headers.get("Www-Authenticate") or ""
            if challenge.lower().startswith("basic"):
                basic = getattr(self, "_basic_auth", None)
                return ({**(headers or {}), "Authorization": f"Basic {basic}"}, True) if basic else (headers, False)
            return super().authenticate_request(original, headers, refresh)

    class Registry(oras.provider.Registry):  # type: ignore[misc]
        # one try per request: the operator's backoff retries the push, not minutes of sleeps here
        do_request = oras.provider.Registry.do_request.__wrapped__

    reg = Registry(hostname=ref.registry, insecure=plain_http(ref.registry))
    reg.auth = Auth()
    reg.auth.session = reg.session
    reg.auth.prefix = reg.prefix
    reg.auth._tls_verify = reg._tls_verify
    container = reg.get_container(ref.target)
    config_dir = os.environ.get(DOCKER_CONFIG_ENV)
    reg.auth.load_configs(container, configs=[os.path.join(config_dir, "config.json")] if config_dir else None)
    basic = getattr(reg.auth, "_basic_auth", None)
    if basic:  # sent up front: an htpasswd registry would otherwise get every upload twice (401, retry)
        reg.session.headers["Authorization"] = f"Basic {basic}"
    return reg, container


def _check(response: Any, target: str, what: str) -> None:
    code = int(response.status_code)
    if code in (200, 201, 202):
        return
    try:
        detail = "; ".join(str(e.get("message") or e.get("code")) for e in response.json().get("errors") or [])
    except Exception:
        detail = str(getattr(response, "reason", "") or "")
    said = f"HTTP {code}" + (f" ({detail})" if detail else "")
    if code in (401, 403):
        raise InvalidInput(f"push to {target} denied while {what}: {said}; check spec.credentials.registry "
                           "(a kubernetes.io/dockerconfigjson Secret with an entry for this registry) and "
                           "that the account may push to this repository")  # fmt: skip
    if code == 404:
        raise InvalidInput(f"push to {target} failed while {what}: {said}; check the registry and repository name")
    if code == 429 or code >= 500:
        raise TransientError(f"push to {target} failed while {what}: {said}; retried with backoff")
    raise RuntimeError(f"push to {target} failed while {what}: {said}")


def _upload(reg: Any, container: Any, path: Path, layer: dict[str, Any], target: str, rel: str) -> None:
    """One blob: skipped when the registry has it (a re-push sends only what is missing)."""
    from oras.utils import append_url_params

    head = reg.do_request(f"{reg.prefix}://{container.get_blob_url(layer['digest'])}", "HEAD")
    if head.status_code == 200:
        return
    if head.status_code != 404:
        _check(head, target, f"checking for {rel}")
    if layer["size"] > CHUNKED_ABOVE:
        _check(reg.chunked_upload(str(path), container, layer, chunk_size=CHUNK), target, f"uploading {rel}")
        return
    start = reg.do_request(f"{reg.prefix}://{container.upload_blob_url()}", "POST",
                           headers={"Content-Type": "application/octet-stream", "Content-Length": "0"})  # fmt: skip
    _check(start, target, f"starting the upload of {rel}")
    url = append_url_params(reg._get_location(start, container), {"digest": layer["digest"]})
    with path.open("rb") as f:  # streamed, not read into memory
        done = reg.do_request(url, "PUT", data=f, headers={"Content-Length": str(layer["size"]),
                                                          "Content-Type": "application/octet-stream"})  # fmt: skip
    _check(done, target, f"uploading {rel}")


def push_oci(export: Path, ref: OciRef, meta: dict[str, Any], check_stop: Callable[[str], None]) -> dict[str, Any]:
    import requests

    target = OCI_SCHEME + ref.target
    try:
        reg, container = registry_client(ref)
        layers = []
        for rel in export_files(export):
            check_stop(f"while pushing to {target}")
            path = export / rel
            size = path.stat().st_size
            layer = {"mediaType": FILE_MEDIA_TYPE, "digest": _sha256(path), "size": size,
                     "annotations": {"org.opencontainers.image.title": rel}}  # fmt: skip
            _upload(reg, container, path, layer, target, rel)
            layers.append(layer)
        config_path = export / EXPORT_METADATA
        config = {"mediaType": CONFIG_MEDIA_TYPE, "digest": _sha256(config_path), "size": config_path.stat().st_size}
        _upload(reg, container, config_path, config, target, "the config")
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                    "config": config, "layers": layers, "annotations": annotations(meta, ref)}  # fmt: skip
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        response = reg.do_request(f"{reg.prefix}://{container.manifest_url()}", "PUT",
                                  headers={"Content-Type": MANIFEST_MEDIA_TYPE}, data=body)  # fmt: skip
        _check(response, target, "writing the manifest")
    except (InvalidInput, TransientError):
        raise
    except (requests.ConnectionError, requests.Timeout) as e:
        raise TransientError(f"push to {target}: registry unreachable ({type(e).__name__}: {str(e)[:200]}); "
                             "retried with backoff") from None  # fmt: skip
    except ValueError as e:
        if "authentication" in str(e):  # a challenge we hold no credentials for
            raise InvalidInput(f"push to {target}: the registry asks for credentials and none are configured for "
                               f"{ref.registry}; set spec.credentials.registry (a dockerconfigjson Secret)") from None
        raise
    return {"digest": "sha256:" + hashlib.sha256(body).hexdigest(), "bytes": sum(int(x["size"]) for x in layers)}
