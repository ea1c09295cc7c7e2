"""Fetching from the Hugging Face Hub, with every failure sorted into the class the operator acts on.

| what went wrong                                              | raised         | exit | the operator          |
|--------------------------------------------------------------|----------------|------|-----------------------|
| hub unreachable, connection refused/reset, timeout           | TransientError | 1    | retries with backoff  |
| hub answers 5xx, 408 or 429 (rate limit)                     | TransientError | 1    | retries with backoff  |
| repository not found (404, or 401 for a private repo)        | InvalidInput   | 2    | Failed, never retried |
| access denied (401/403) or gated                             | InvalidInput   | 2    | Failed, never retried |
| revision or file not found                                   | InvalidInput   | 2    | Failed, never retried |
| not in the local cache while HF_HUB_OFFLINE is set           | InvalidInput   | 2    | Failed, never retried |

`check_repo` asks the hub about the repository once, before anything heavy loads (a missing model
fails in a second, not after torch); `classify` sorts what a later download raised.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

from .errors import InvalidInput, TransientError

RepoType = Literal["model", "dataset"]
TOKEN_HINT = "give the job a token that can read it (HF_TOKEN)"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def classify(exc: BaseException, repo_id: str, repo_type: RepoType, field: str,
             revision: str | None = None) -> InvalidInput | TransientError | None:
    """The failure class of an error raised while fetching `repo_id`, or None when it is not a fetch
    failure (the caller decides). The message names the field, the repository and what to do."""
    from huggingface_hub import errors as hf

    kind = "hub dataset" if repo_type == "dataset" else "hub model"
    what = f"{field}: {kind} {repo_id!r}"
    page = f"{_endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    if offline() and any(isinstance(e, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, ConnectionError))
                         for e in _chain(exc)):  # offline, nothing can be reached: only the cache counts
        return InvalidInput(f"{what} is not in the local cache and HF_HUB_OFFLINE is set: download it "
                            "first, unset HF_HUB_OFFLINE, or use a local path")
    for e in _chain(exc):
        status = _status(e)
        if isinstance(e, hf.GatedRepoError):
            return InvalidInput(f"{what} is gated: accept its conditions at {page} and {TOKEN_HINT}")
        if isinstance(e, hf.RevisionNotFoundError):
            return InvalidInput(f"{what}: revision {revision!r} not found; check the revision field "
                                f"(a branch, tag or commit of {page})")
        if isinstance(e, hf.DisabledRepoError):
            return InvalidInput(f"{what} is disabled on the hub; use another repository")
        if isinstance(e, hf.RepositoryNotFoundError):
            return InvalidInput(f"{what} not found at {_endpoint()} (HTTP {status}): check the name, "
                                f"or if it is private or gated, {TOKEN_HINT}")
        if isinstance(e, hf.EntryNotFoundError) and not isinstance(e, hf.LocalEntryNotFoundError):
            return InvalidInput(f"{what}: a file is missing from the repository ({_first_line(e)}); "
                                "is it a sentence-transformers / datasets repository?")
        if status is not None:
            return _by_status(status, what, getattr(e.response, "url", None) or page)  # type: ignore[attr-defined]
        transient = _network(e)
        if transient:
            return TransientError(f"{what}: {transient} at {_endpoint()} ({type(e).__name__}: {_first_line(e)})")
    return None


def _by_status(status: int, what: str, url: object) -> InvalidInput | TransientError:
    if status in (408, 429) or status >= 500:
        why = "rate limited by the hub (HTTP 429)" if status == 429 else f"the hub answered HTTP {status}"
        return TransientError(f"{what}: {why} for {url}")
    if status in (401, 403):
        return InvalidInput(f"{what}: access denied (HTTP {status}) at {url}: check the name, and {TOKEN_HINT}")
    if status == 404:
        return InvalidInput(f"{what} not found (HTTP 404 at {url}): check the name, or if it is private, "
                            f"{TOKEN_HINT}")
    return InvalidInput(f"{what}: the hub refused the request (HTTP {status} at {url})")


def _network(e: BaseException) -> str | None:
    """'timed out' / 'cannot reach the hub' for network trouble, else None."""
    from huggingface_hub import errors as hf

    name = type(e).__name__
    if isinstance(e, TimeoutError) or "Timeout" in name:
        return "timed out reaching the hub"
    if isinstance(e, hf.LocalEntryNotFoundError):  # not offline: the hub could not be reached, nothing cached
        return "cannot reach the hub (and it is not cached)"
    if isinstance(e, ConnectionError) or name in ("ConnectError", "ReadError", "WriteError", "NetworkError",
                                                   "RemoteProtocolError", "ProxyError"):
        return "cannot reach the hub"
    return None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(e).__name__
    return text[:300]


def check_repo(repo_id: str, repo_type: RepoType, field: str, revision: str | None = None) -> None:
    """Ask the hub whether `repo_id` exists and can be read (one request), unless HF_HUB_OFFLINE is set
    (then the cache answers at load time).

    Raises:
        InvalidInput: not found, access denied or gated, bad revision (permanent).
        TransientError: unreachable, timed out, 5xx or rate limited (retried).
    """
    if offline():
        return
    from huggingface_hub import HfApi, constants

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:
        classified = classify(e, repo_id, repo_type, field, revision)
        if classified is None:
            raise
        raise classified from None
