"""Where the operator's API credentials come from, and how they stay fresh (kube.py's client and
kopf's login both take them from here).

Where to connect, first match wins:
  1. env FINETUNE_KUBE_SERVER: a plain URL, no auth (the tier-3 emulator, `kubectl proxy`);
  2. the in-cluster service account (KUBERNETES_SERVICE_HOST, the mounted token and CA);
  3. a kubeconfig (env KUBECONFIG or ~/.kube/config), current context, as kubectl reads it.

kubernetes_asyncio loads all three. What it leaves to us:
  - an exec plugin's token: the library caches it until its expirationTimestamp; a refresh hook
    runs the plugin again then (`_exec_refresher`);
  - an exec plugin that answers with a client certificate (Teleport's `tsh`, some OIDC helpers):
    the library writes it to files once, keeps no expiry and never runs the plugin again, and a
    TLS context built from those files outlives them. Here, as client-go does, the plugin runs
    again when its expirationTimestamp is near or the server refused the certificate (401), the
    new certificate goes to new files (private to this user, removed at exit), and
    `cert_generation` tells the client to build a new session (kube.Kube). kopf's login loads
    afresh each time and carries the expiry, so kopf logs in again before it is due.

`credentials()` turns the loaded configuration into what kopf's login handler returns
(handlers.login), with an expiration so kopf logs in again when a credential is due to rotate.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.dateutil import parse_rfc3339
from kubernetes_asyncio.config.exec_provider import ExecProvider
from kubernetes_asyncio.config.kube_config import ConfigNode

SERVER_ENV = "FINETUNE_KUBE_SERVER"
# kopf re-logs-in after this long with in-cluster credentials: the kubelet rotates the mounted
# token well before its (>= 1 h) expiry, and the library re-reads the file every minute.
IN_CLUSTER_RELOGIN = dt.timedelta(minutes=10)
# An exec plugin's certificate is replaced this long before its expirationTimestamp.
CERT_SKEW = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class Credentials:
    """What kopf's login needs, taken from the client's loaded configuration."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    expiration: dt.datetime | None = None


@dataclass
class Loaded:
    """A kubernetes_asyncio Configuration and how it was found (`source`)."""

    configuration: Configuration
    source: str  # "env" | "in-cluster" | "kubeconfig"
    loader: Any = None  # the KubeConfigLoader, for exec plugin expiry
    # the kubeconfig user's `exec` section when its plugin answers with a client certificate
    exec_cert: dict[str, Any] | None = None
    cert_expiry: dt.datetime | None = None  # None: the plugin gave none (replaced when refused)
    cert_generation: int = 0  # +1 per certificate from a re-run of the plugin
    _lock: asyncio.Lock | None = field(default=None, repr=False)


def _exec_refresher(loader: Any) -> Any:
    """An async refresh hook: re-run the kubeconfig's exec plugin once its credential expires
    (the library caches it until `expirationTimestamp`)."""

    async def refresh(configuration: Configuration, *_: Any) -> None:
        if hasattr(loader, "exec_plugin_expiry"):
            await loader.load_from_exec_plugin()  # returns at once while not expired
            configuration.api_key["BearerToken"] = loader.token

    return refresh


async def load_configuration() -> Loaded:
    """Find the API server (see the module docstring).

    Raises:
        RuntimeError: no server found, or the kubeconfig/service account is unusable.
    """
    cfg = Configuration()
    if os.environ.get(SERVER_ENV):
        cfg.host = os.environ[SERVER_ENV].rstrip("/")
        cfg.verify_ssl = False
        return Loaded(cfg, "env")
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            kube_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # re-reads the token file
        except ConfigException as e:
            raise RuntimeError(f"in-cluster configuration: {e}") from e
        return Loaded(cfg, "in-cluster")
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    if not os.path.isfile(path):
        raise RuntimeError(
            f"no Kubernetes API server: set {SERVER_ENV}, run in a cluster, or provide a kubeconfig ({path})"
        )
    try:
        loader = await kube_config.load_kube_config(config_file=path, client_configuration=cfg,
                                                    persist_config=False)  # fmt: skip
    except (ConfigException, OSError, KeyError) as e:
        raise RuntimeError(f"kubeconfig {path}: {e}") from e
    if hasattr(loader, "exec_plugin_expiry"):
        cfg.refresh_api_key_hook = _exec_refresher(loader)
    exec_cfg = _current_exec(path)
    if exec_cfg is None or not cfg.cert_file or getattr(loader, "token", None):
        return Loaded(cfg, "kubeconfig", loader)
    # the plugin answered with a certificate: run it once more, for the expiry the library drops
    loaded = Loaded(cfg, "kubeconfig", loader, exec_cert=exec_cfg)
    try:
        await refresh_exec_cert(loaded, force=True)
    except ConfigException as e:
        raise RuntimeError(f"kubeconfig {path}: {e}") from e
    return loaded


async def credentials(loaded: Loaded, now: dt.datetime | None = None) -> Credentials:
    """The loaded configuration as kopf's login needs it (token refreshed first)."""
    cfg = loaded.configuration
    now = now or dt.datetime.now(dt.timezone.utc)
    await refresh_exec_cert(loaded, now)  # when due
    if loaded.source == "env":
        return Credentials(server=str(cfg.host), insecure=True)
    header = await cfg.get_api_key_with_prefix("BearerToken") if "BearerToken" in cfg.api_key else None
    token = header.split(" ", 1)[1] if header and header.startswith("Bearer ") else None
    expiration = None
    if loaded.source == "in-cluster":
        expiration = now + IN_CLUSTER_RELOGIN
    elif loaded.exec_cert is not None:
        expiration = loaded.cert_expiry
    elif getattr(loaded.loader, "exec_plugin_expiry", None) is not None:
        expiration = loaded.loader.exec_plugin_expiry
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=dt.timezone.utc)
    return Credentials(
        server=str(cfg.host), ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl, token=token,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file, expiration=expiration,
    )  # fmt: skip


def _current_exec(path: str) -> dict[str, Any] | None:
    """The `exec` section of the current context's user in the kubeconfig at `path`, if any."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        ctx = next(c["context"] for c in doc.get("contexts") or [] if c.get("name") == doc.get("current-context"))
        user = next(u.get("user") or {} for u in doc.get("users") or [] if u.get("name") == ctx.get("user"))
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    exec_cfg = user.get("exec") if isinstance(user, dict) else None
    return exec_cfg if isinstance(exec_cfg, dict) else None


_cert_dir: str | None = None


def _write_private(name: str, data: str) -> str:
    """`data` (PEM, as an ExecCredential carries it) in a file only this user can read, under one
    directory removed at exit."""
    global _cert_dir
    if _cert_dir is None:
        _cert_dir = tempfile.mkdtemp(prefix="finetune-operator-exec-")
        atexit.register(shutil.rmtree, _cert_dir, True)
    raw = data.encode()
    path = os.path.join(_cert_dir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return path


async def refresh_exec_cert(loaded: Loaded, now: dt.datetime | None = None, *, force: bool = False,
                            seen: int | None = None) -> bool:  # fmt: skip
    """Run the exec plugin again for a new client certificate when the current one is due (or
    `force`: the server refused it). `seen`: the generation the caller used; when another caller
    rotated since, that newer certificate is taken instead of running the plugin again.
    True when the configuration now holds a certificate the caller has not used.

    Raises:
        ConfigException: the plugin failed or answered without a certificate.
    """
    if loaded.exec_cert is None:
        return False
    now = now or dt.datetime.now(dt.timezone.utc)
    if not force and not _due(loaded, now):
        return False  # every request asks: no lock while the certificate is good
    if loaded._lock is None:
        loaded._lock = asyncio.Lock()
    async with loaded._lock:
        if seen is not None and loaded.cert_generation != seen:
            return True
        if not force and not _due(loaded, now):
            return False  # replaced by the caller the lock was waited for
        status = await ExecProvider(ConfigNode("exec", loaded.exec_cert)).run()
        if not status.get("clientCertificateData") or not status.get("clientKeyData"):
            raise ConfigException("exec: the plugin answered without clientCertificateData and clientKeyData")
        gen = loaded.cert_generation + 1
        cfg = loaded.configuration
        cfg.cert_file = _write_private(f"client-{gen}.crt", str(status["clientCertificateData"]))
        cfg.key_file = _write_private(f"client-{gen}.key", str(status["clientKeyData"]))
        for old in (f"client-{gen - 2}.crt", f"client-{gen - 2}.key"):  # the one before stays for kopf
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(os.path.dirname(cfg.cert_file), old))
        expiry = status.get("expirationTimestamp")
        loaded.cert_expiry = None  # none given, or unreadable: replaced when refused
        if expiry:
            with contextlib.suppress(ValueError):  # the library's parser, as for a token's expiry
                loaded.cert_expiry = parse_rfc3339(str(expiry))
        loaded.cert_generation = gen
        return True


def _due(loaded: Loaded, now: dt.datetime) -> bool:
    return loaded.cert_expiry is not None and now >= loaded.cert_expiry - CERT_SKEW
