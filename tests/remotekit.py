"""Real servers on loopback for the remote tests, started and stopped by the tests themselves.

- S3: moto in server mode (ThreadedMotoServer), a real HTTP S3 API.
- A fault proxy in front of it: forwards every request, and on demand answers 503 (a server going
  down mid-push) or holds requests (so a test can kill a worker mid-push).
- OCI: Debian's `docker-registry` (the CNCF distribution registry) with filesystem storage and
  htpasswd auth; skipped with the reason where the binary is missing.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BIN = os.environ.get("FINETUNE_TEST_REGISTRY", "/usr/bin/docker-registry")
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> tuple[int, str]:
    """GET `url`: (status, body), or (0, "") while nothing answers (a server still starting)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An S3 API on loopback; yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.skip("needs moto[server] (the [dev] extra): pip install -e '.[dev]'")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _wait_port(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    return {**S3_KEYS, "AWS_ENDPOINT_URL": endpoint}


def s3fs_for(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(key=S3_KEYS["AWS_ACCESS_KEY_ID"], secret=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                             skip_instance_cache=True, use_listings_cache=False)  # fmt: skip


def make_bucket(endpoint: str, name: str) -> None:
    import boto3  # moto's own dependency

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)


class FaultProxy:
    """An HTTP proxy to `upstream` on its own loopback port. `fail_after_puts = N`: after N
    successful PUTs every request gets 503 (the service down mid-push); `hold_put = TEXT`: a PUT
    whose path contains TEXT waits until released (a push stuck mid-way, to be killed)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.puts = 0
        self.gets: list[str] = []  # paths of GET requests (downloads and listings)
        self.fail_after_puts: int | None = None
        self.hold_put: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                is_put = self.command == "PUT"
                if self.command == "GET":
                    proxy.gets.append(self.path)
                if proxy.fail_after_puts is not None and proxy.puts >= proxy.fail_after_puts:
                    self._reply(503, b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>", {})
                    return
                if is_put and proxy.hold_put is not None and proxy.hold_put in self.path:
                    proxy.held.set()
                    proxy.release.wait(120)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if is_put and resp.status < 300:
                    proxy.puts += 1
                self._reply(resp.status, data, dict(resp.getheaders()))
                conn.close()

            def _reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def heal(self) -> None:
        self.fail_after_puts = None
        self.hold_put = None
        self.release.set()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # the htpasswd format distribution reads is bcrypt

            return str(crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH)))
        except (ImportError, AttributeError, ValueError):
            pass
    try:
        import bcrypt

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode())
    except ImportError:
        pytest.skip("no bcrypt for the registry's htpasswd file (Python's crypt module or the bcrypt package)")


@contextlib.contextmanager
def oci_registry(tmp: Path, user: str = "pusher", password: str = "push-secret") -> Iterator[str]:
    """The distribution registry on loopback with htpasswd auth; yields `127.0.0.1:PORT`."""
    if not (os.path.isfile(REGISTRY_BIN) and os.access(REGISTRY_BIN, os.X_OK)):
        pytest.skip(f"needs the CNCF distribution registry at {REGISTRY_BIN} (apt-get install docker-registry)")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (tmp / "htpasswd").write_text(f"{user}:{_bcrypt(password)}\n")
    (tmp / "config.yml").write_text(json.dumps({
        "version": 0.1, "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "loopback-only"},
        "auth": {"htpasswd": {"realm": "test-registry", "path": str(tmp / "htpasswd")}},
    }))  # fmt: skip
    log = open(tmp / "registry.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(tmp / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def docker_config(directory: Path, registry: str, user: str = "pusher", password: str = "push-secret") -> Path:
    """A DOCKER_CONFIG directory (config.json), as a kubernetes.io/dockerconfigjson Secret holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return directory


def oras_pull(registry: str, target: str, out: Path, user: str = "pusher", password: str = "push-secret") -> dict[str, Any]:
    """Pull an artifact back with ORAS's own client; returns its manifest."""
    import oras.client

    client = oras.client.OrasClient(hostname=registry, insecure=True, auth_backend="basic")
    client.auth.set_basic_auth(user, password)
    out.mkdir(parents=True, exist_ok=True)
    client.pull(target=target, outdir=str(out))
    return dict(client.get_manifest(target))


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
