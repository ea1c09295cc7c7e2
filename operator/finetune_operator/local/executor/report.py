"""Report: what a kubelet tells the API server about a pod. Its PodStatus dict (Running, or
terminated with the exit code, a reason and the termination message: the termination log, or
with FallbackToLogsOnError the tail of the log of a failed container), and its log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_operator.local.executor.state import LocalPod, PodTable

TERMINATION_MESSAGE_MAX_BYTES = 4096  # what the kubelet keeps of /dev/termination-log
FALLBACK_LOG_LINES = 80  # FallbackToLogsOnError: the last 80 lines ...
FALLBACK_LOG_BYTES = 2048  # ... or 2 KiB, whichever is smaller (kubelet's limits)


class PodReporter:
    """Reads the pods of `table` as a kubelet reports them."""

    def __init__(self, table: PodTable) -> None:
        self._pods = table

    def status(self, name: str) -> dict[str, Any] | None:
        """The pod's Kubernetes PodStatus dict, or None if no such pod was started (or it was deleted)."""
        record = self._pods.get(name)
        return None if record is None else pod_status(record)

    def logs(self, name: str, tail_lines: int | None = None) -> str:
        """The pod's combined stdout+stderr, or its last `tail_lines` lines.

        Raises:
            KeyError: no such pod.
        """
        text = read_log(self._pods[name])
        if tail_lines is None:
            return text
        if tail_lines <= 0:
            return ""
        return "".join(text.splitlines(keepends=True)[-tail_lines:])

    def log_bytes(self, name: str, offset: int = 0, tail_lines: int | None = None) -> tuple[bytes, int, bool]:
        """What a follow stream (`kubectl logs -f`) sends: see `read_log_bytes`, plus whether the
        pod's process had ended before the read (then the bytes are all there will be).

        Raises:
            KeyError: no such pod.
        """
        record = self._pods[name]
        ended = record.done.is_set()
        return (*read_log_bytes(record.dir / "log", offset, tail_lines), ended)


def pod_status(record: LocalPod) -> dict[str, Any]:
    cstatus: dict[str, Any] = {"name": record.container, "restartCount": 0, "ready": False}
    if not record.done.is_set():
        cstatus["ready"] = True
        cstatus["state"] = {"running": {"startedAt": record.started_at}}
        return {"phase": "Running", "startTime": record.started_at, "containerStatuses": [cstatus]}
    code = record.exit_code if record.exit_code is not None else 1
    terminated = {
        "exitCode": code,
        "reason": record.reason or ("Completed" if code == 0 else "Error"),
        "startedAt": record.started_at,
        "finishedAt": record.finished_at,
    }
    message = termination_message(record, code)
    if message:
        terminated["message"] = message
    cstatus["state"] = {"terminated": terminated}
    return {
        "phase": "Succeeded" if code == 0 else "Failed",
        "startTime": record.started_at,
        "containerStatuses": [cstatus],
    }


def termination_message(record: LocalPod, code: int) -> str:
    try:
        raw = (record.dir / "termination-log").read_bytes()[:TERMINATION_MESSAGE_MAX_BYTES]
    except OSError:
        raw = b""
    message = raw.decode("utf-8", "replace")
    if not message.strip() and code != 0 and record.fallback_to_logs:
        tail = "\n".join(read_log(record).splitlines()[-FALLBACK_LOG_LINES:])
        message = tail.encode()[-FALLBACK_LOG_BYTES:].decode("utf-8", "ignore")
    return message


def read_log(record: LocalPod) -> str:
    try:
        return (record.dir / "log").read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def read_log_bytes(path: Path, offset: int = 0, tail_lines: int | None = None) -> tuple[bytes, int]:
    """A log file from byte `offset` on (only its last `tail_lines` lines when given), and the offset
    to read on from next time. A missing file is an empty log."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        data = b""
    end = offset + len(data)
    if tail_lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail_lines:]) if tail_lines > 0 else b""
    return data, end
