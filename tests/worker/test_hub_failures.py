"""Hub failures are classed as the operator needs them: transient ones exit 1 (retried, said so),
permanent ones exit 2 naming the repository and what to do. The worker CLI runs against a local
HTTP endpoint on 127.0.0.1 (HF_ENDPOINT) that refuses connections, never answers, or answers
404 / 401 / 403 / 429 / 503, for a hub base model and for a hub dataset. Nothing reaches the real hub.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.worker
REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"anchor": f"question {i}", "positive": f"answer {i}"} for i in range(4)]


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status named in the repository id (`org/answer-404`)."""

    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        code = next((c for c in (401, 403, 404, 429, 503) if f"answer-{c}" in self.path), 503)
        body = json.dumps({"error": "test hub"}).encode()
        self.send_response(code)
        if code == 404:  # what the real hub sends for a repository that does not exist
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, str]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections (the kernel's backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    closed = socket.socket()  # a port nobody listens on: connection refused
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    yield {"answers": f"http://127.0.0.1:{server.server_address[1]}",
           "silent": f"http://127.0.0.1:{silent.getsockname()[1]}",
           "refused": f"http://127.0.0.1:{refused_port}"}
    server.shutdown()
    silent.close()


def _run(tmp_path: Path, endpoint: str, *, model: str | None = None, dataset: str | None = None,
         offline: bool = False) -> subprocess.CompletedProcess[str]:
    spec = {"model": {"base": model or "builtin:all-MiniLM-L6-v2"},
            "dataset": {"hub": dataset} if dataset else {"inline": RECORDS},
            "training": {"maxSteps": 1, "batchSize": 2}, "resources": {"gpus": 0}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"spec": spec}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1" if offline else "0", HF_DATASETS_OFFLINE="1" if offline else "0",
               TRANSFORMERS_OFFLINE="1" if offline else "0", HF_HUB_ETAG_TIMEOUT="1", HF_HUB_DOWNLOAD_TIMEOUT="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1",
               FINETUNE_TERMINATION_LOG=str(tmp_path / "termination-log"),
               PYTHONPATH=os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "finetune_worker.cli", "train", "--config", str(config),
                           "--workspace", str(tmp_path / "ws")], env=env, capture_output=True, text=True, timeout=120)


CASES = [  # (endpoint, repository, exit code, words the message must carry)
    ("refused", "org/model", 1, ["transient", "cannot reach the hub", "org/model"]),
    ("silent", "org/model", 1, ["transient", "timed out", "org/model"]),
    ("answers", "org/answer-503", 1, ["transient", "HTTP 503", "org/answer-503"]),
    ("answers", "org/answer-429", 1, ["transient", "rate limited"]),
    ("answers", "org/answer-404", 2, ["invalid input", "'org/answer-404' not found", "check the name", "HF_TOKEN"]),
    ("answers", "org/answer-401", 2, ["invalid input", "access denied (HTTP 401)", "HF_TOKEN"]),
    ("answers", "org/answer-403", 2, ["invalid input", "access denied (HTTP 403)", "HF_TOKEN"]),
]


@pytest.mark.parametrize("kind", ["model", "dataset"])
@pytest.mark.parametrize(("where", "repo", "code", "words"), CASES, ids=[f"{c[0]}-{c[1][4:]}" for c in CASES])
def test_hub_failure_class(tmp_path: Path, endpoints: dict[str, str], kind: str, where: str, repo: str,
                           code: int, words: list[str]) -> None:
    r = _run(tmp_path, endpoints[where], **{kind: repo})
    field = "spec.model.base: hub model" if kind == "model" else "spec.dataset.hub: hub dataset"
    assert r.returncode == code, r.stderr
    assert field in r.stderr and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["result"] == ("invalid" if code == 2 else "failed")
    assert ("transient" in summary["message"]) == (code == 1)


def test_offline_and_not_cached_is_permanent_and_says_so(tmp_path: Path, endpoints: dict[str, str]) -> None:
    """HF_HUB_OFFLINE set and the dataset not cached: no retry can help (exit 2, says what to do)."""
    r = _run(tmp_path, endpoints["refused"], dataset="org/not-cached", offline=True)
    assert r.returncode == 2, r.stderr
    assert "not in the local cache and HF_HUB_OFFLINE is set" in r.stderr, r.stderr
