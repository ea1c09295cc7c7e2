"""s3:// for the worker: data files and model prefixes read into a workspace cache, checked unchanged.

Read through fsspec/s3fs with the conventional environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION), so the worker runs the same in
a pod (the operator maps spec.credentials.s3 to these) and on a laptop.

Cache: `<workspace>/.cache/remote/<hash of the URL>/` holds the download and `version.json`, the
object's identity when the job first read it (ETag, size, last-modified; for a prefix, those of
every object under it). A resumed attempt finds the cache current and downloads nothing; an object
that changed since (ETag or size differ) fails the job (InvalidInput): a run that resumes from a
checkpoint must not silently continue on other data. A download lands in a temporary name first,
so a kill mid-download leaves no file that looks complete.

Errors: not found, access denied, bad credentials -> InvalidInput naming the URL and what to check;
unreachable, timeouts, 5xx, throttling -> TransientError (the operator retries with backoff).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from finetune_api.remote import AWS_ENDPOINT_ENV, split_s3

from .errors import InvalidInput, TransientError

CACHE_DIR = ".cache/remote"
VERSION_FILE = "version.json"
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}  # fmt: skip
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "AllAccessDisabled", "403", "401"}  # fmt: skip
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
CREDENTIALS_HINT = ("check spec.credentials.s3 (its Secret's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the "
                    "endpoint) and the bucket's policy")  # fmt: skip


def filesystem() -> Any:
    """An s3fs filesystem configured from the environment (a fresh one: no stale cached listings)."""
    try:
        import s3fs
    except ImportError:
        raise InvalidInput("s3:// needs s3fs: pip install 'finetune-operator[worker]'") from None
    client: dict[str, Any] = {}
    if os.environ.get(AWS_ENDPOINT_ENV):
        client["endpoint_url"] = os.environ[AWS_ENDPOINT_ENV]
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True, use_listings_cache=False, client_kwargs=client,
        config_kwargs={"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 2}},
    )  # fmt: skip
    fs.retries = 3  # s3fs's own retry of throttling/5xx; beyond that the operator's backoff retries the pod
    return fs


def _code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error") or {}
        code = str(err.get("Code") or (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")
        if code:
            return code
    return ""


_NETWORK = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
            "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
            "ClientError", "ProxyConnectionError", "HTTPClientError"}  # fmt: skip


def classify(e: BaseException, url: str, what: str) -> BaseException:
    """The worker error for a failed S3 call on `url` (`what`: e.g. 'read spec.dataset.path'); anything
    that is neither the service's answer nor the network (a bug) is returned as it is."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(c).__name__ for c in chain}
    codes = {_code(c) for c in chain} - {""}
    text = f"{type(e).__name__}: {e}"[:300]
    if codes & _AUTH_CODES or names & {"NoCredentialsError", "PartialCredentialsError"} or isinstance(e, PermissionError):
        return InvalidInput(f"cannot {what}: access to {url} denied ({text}); {CREDENTIALS_HINT}")
    if codes & _MISSING_CODES or isinstance(e, FileNotFoundError):
        return InvalidInput(f"cannot {what}: {url} does not exist ({text}); check the bucket and key")
    if codes or names & _NETWORK or isinstance(e, (OSError, TimeoutError)):
        return TransientError(f"cannot {what}: {url} unreachable or failing ({text}); retried with backoff")
    return e


def _cache_root(workspace: Path, url: str) -> Path:
    return Path(workspace) / CACHE_DIR / hashlib.sha256(url.encode()).hexdigest()[:24]


def _identity(info: dict[str, Any]) -> dict[str, Any]:
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("LastModified") or info.get("last_modified")
    return {"etag": str(etag).strip('"') if etag else None, "size": int(info.get("size") or 0),
            "mtime": str(mtime) if mtime is not None else None}  # fmt: skip


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    if old.get("etag") and new.get("etag"):
        return bool(old["etag"] != new["etag"] or old.get("size") != new.get("size"))
    return bool(old.get("size") != new.get("size") or old.get("mtime") != new.get("mtime"))


def _check_unchanged(root: Path, url: str, field: str, current: dict[str, Any]) -> bool:
    """True when the cache holds this version; InvalidInput when the job first read another one."""
    rec = root / VERSION_FILE
    if not rec.is_file():
        return False
    first = json.loads(rec.read_text())
    if not first.get("complete"):  # an attempt killed mid-download: nothing was read from it yet
        return False
    old, new = first.get("objects") or {}, current
    if set(old) != set(new) or any(_changed(old[k], new[k]) for k in old):
        diff = sorted(k for k in set(old) | set(new) if k not in old or k not in new or _changed(old[k], new[k]))
        raise InvalidInput(
            f"{field}: {url} changed since this job first read it (at {first.get('readAt')}; changed: "
            f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}): a resumed run would continue on other "
            "data than it started with. Restore the original object, or start a new FineTuneJob for the new data"
        )
    return True


def _record(root: Path, url: str, objects: dict[str, Any], complete: bool) -> None:
    tmp = root / (VERSION_FILE + ".tmp")
    tmp.write_text(json.dumps({"url": url, "objects": objects, "complete": complete,
                               "readAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))  # fmt: skip
    os.replace(tmp, root / VERSION_FILE)


def fetch_file(url: str, workspace: Path, field: str) -> Path:
    """The object at `url` as a local file in the workspace cache (downloaded once per job).

    Raises:
        InvalidInput: missing, denied, or changed since the job first read it.
        TransientError: the service could not be reached or failed.
    """
    fs = filesystem()
    try:
        info = fs.info(url)
    except Exception as e:
        raise classify(e, url, f"read {field}") from None
    if info.get("type") == "directory":
        raise InvalidInput(f"{field}: {url} is a prefix, not an object (name a .jsonl, .csv or .parquet file)")
    root = _cache_root(workspace, url)
    root.mkdir(parents=True, exist_ok=True)
    objects = {split_s3(url)[1]: _identity(info)}
    local = root / Path(split_s3(url)[1]).name
    if _check_unchanged(root, url, field, objects) and local.is_file():
        return local
    _record(root, url, objects, complete=False)  # the version this job reads, from now on
    _download(fs, url, local, field)
    _record(root, url, objects, complete=True)
    return local


def fetch_prefix(url: str, workspace: Path, field: str) -> Path:
    """Every object under the prefix `url` as a local directory in the workspace cache (a model).

    Raises:
        InvalidInput: nothing there, denied, or changed since the job first read it.
        TransientError: the service could not be reached or failed.
    """
    fs = filesystem()
    prefix = url.rstrip("/") + "/"
    try:
        listing = fs.find(prefix, detail=True)
    except Exception as e:
        raise classify(e, url, f"list {field}") from None
    bucket_prefix = prefix[len("s3://"):]
    objects = {k[len(bucket_prefix):]: _identity(v) for k, v in listing.items()
               if v.get("type") != "directory" and k.startswith(bucket_prefix) and not k.endswith("/")}  # fmt: skip
    if not objects:
        raise InvalidInput(f"{field}: no objects under {prefix}; upload the model directory there "
                           "(config.json, weights, tokenizer files)")  # fmt: skip
    root = _cache_root(workspace, prefix)
    root.mkdir(parents=True, exist_ok=True)
    local = root / "model"
    if _check_unchanged(root, url, field, objects) and local.is_dir():
        return local
    _record(root, url, objects, complete=False)
    staging = root / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for rel in sorted(objects):
        if ".." in rel.split("/"):
            raise InvalidInput(f"{field}: object {prefix}{rel} has a '..' segment; refusing to write it")
        _download(fs, prefix + rel, staging / rel, field)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(staging, local)
    _record(root, url, objects, complete=True)
    return local


def _download(fs: Any, url: str, local: Path, field: str) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".download")
    try:
        fs.get_file(url, str(tmp))
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise classify(e, url, f"download {field}") from None
    os.replace(tmp, local)
