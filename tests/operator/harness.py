"""Tier-3 harness: an emulated API server, a test kubelet and the real kopf operator, all in-process.

Building blocks (no pytest here; fixtures live in conftest.py, benchmarks import this module):

- `Cluster(root)`: kmock's KubernetesEmulator with the kmock 0.8 gaps fixed (kube_emulator.py
  lists each fix and the symptom it prevents) serving on 127.0.0.1 in its own thread and event
  loop, with the FineTuneJob resource from crds/ (or an in-code registration while that file is
  missing) and namespace `default`; plus, unless `kubelet=False`, a TestKubelet (kubelet_sim.py)
  that runs the pods as local processes with the LocalPodExecutor. Synchronous helpers for tests:
  create/get/list/patch/delete/wait_for/history/events.
- `OperatorRunner` / `run_operator(cluster)`: the real kopf operator (`finetune_operator.cluster.handlers`,
  or a registry you pass) in its own thread with its own event loop — kopf in the emulator's loop
  cannot shut down cleanly — logged in to the emulator through a login handler, with
  FINETUNE_KUBE_SERVER set for the operator's own API client. Stoppable and restartable.
- `start_cluster_and_operator(root)`: both at once, for benchmarks (returns a stop callable).

Notes for operator code under test: the emulator supports equality and set-based label selectors
and field selectors on list and watch, finalizers, graceful pod deletion through the kubelet and
ownerReference garbage collection; it does no schema validation, defaulting or admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # siblings import each other by plain name (tests/operator has no __init__)
    sys.path.insert(0, _HERE)

import kmock  # noqa: E402
import yaml  # noqa: E402
from kube_emulator import FixedKubernetesEmulator  # noqa: E402
from kube_store import Res  # noqa: E402
from kubelet_sim import TestKubelet  # noqa: E402

from finetune_api import contract  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
KUBE_SERVER_ENV = "FINETUNE_KUBE_SERVER"
T = TypeVar("T")
log = logging.getLogger("harness")


def finetunejob_resource(crd_path: Path = CRD_PATH) -> tuple[Res, dict[str, Any] | None]:
    """The FineTuneJob resource as the CRD file declares it (and the CRD), or a built-in fallback."""
    if crd_path.is_file():
        crd = next(
            d
            for d in yaml.safe_load_all(crd_path.read_text())
            if d and d.get("kind") == "CustomResourceDefinition"
        )
        spec = crd["spec"]
        served = next(v for v in spec["versions"] if v.get("storage", v.get("served", True)))
        res = Res(
            spec["group"], served["name"], spec["names"]["plural"], spec["names"]["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            status_subresource="status" in (served.get("subresources") or {}),
            singular=spec["names"].get("singular", ""), short_names=tuple(spec["names"].get("shortNames", [])),
        )  # fmt: skip
        return res, crd
    return Res(contract.GROUP, contract.VERSION, contract.PLURAL, contract.KIND, short_names=("ftj",)), None


class Cluster:
    """The emulated API server and test kubelet, running in a background thread (see module docstring)."""

    def __init__(
        self, root: Path, *, kubelet: bool = True, bin_dir: Path | None = None, crd_path: Path = CRD_PATH
    ) -> None:
        self.root = Path(root)
        self._want_kubelet = kubelet
        self._bin_dir = bin_dir
        self._crd_path = crd_path
        self.loop = asyncio.new_event_loop()
        self.emulator: FixedKubernetesEmulator | None = None
        self.kubelet: TestKubelet | None = None
        self._server: kmock.Server | None = None
        self._thread = threading.Thread(target=self._run_loop, name="kube-emulator", daemon=True)
        self.url = ""
        self.jobs_res: Res | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> Cluster:
        self._thread.start()
        self._run(self._astart(), timeout=30)
        return self

    async def _astart(self) -> None:
        self.emulator = FixedKubernetesEmulator()
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator)
        await self._server.__aenter__()
        self.url = str(self._server.url).rstrip("/")
        res, crd = finetunejob_resource(self._crd_path)
        self.emulator.register(res)
        self.jobs_res = res
        if crd is not None:
            self.emulator.put_object(
                self.emulator.resource("apiextensions.k8s.io/v1", "customresourcedefinitions"), crd
            )
        if self._want_kubelet:
            self.kubelet = TestKubelet(self.emulator, self.root / "kubelet", self.loop, bin_dir=self._bin_dir)

    def stop(self) -> None:
        """Kill the pods, close the watches and the server, stop the loop and its thread."""
        if not self._thread.is_alive():
            return
        if self.kubelet is not None:
            self.kubelet.close()
        with contextlib.suppress(Exception):
            self._run(self._astop(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    async def _astop(self) -> None:
        assert self.emulator is not None and self._server is not None
        self.emulator.close_watches()
        await asyncio.sleep(0)
        await self._server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)
        await self.loop.shutdown_default_executor()  # aiohttp's resolver threads

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- calling into the loop -------------------------------------------------------------------

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` in the emulator's loop (where the store lives) and return its result."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as e:
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=30)

    @property
    def api(self) -> FixedKubernetesEmulator:
        assert self.emulator is not None, "the cluster is not started"
        return self.emulator

    # -- the API, synchronously (same code paths as HTTP requests, minus HTTP) -------------------

    def _res(self, api_version: str, plural: str) -> Res:
        return self.api.resource(api_version, plural)

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create `obj` (its apiVersion/kind pick the resource); raises kmock.KubernetesError like the API."""
        res = next(
            (
                r
                for r in self.api._res.values()
                if r.api_version == obj.get("apiVersion") and r.kind == obj.get("kind")
            ),
            None,
        )
        if res is None:
            raise ValueError(f"unknown resource {obj.get('apiVersion')}/{obj.get('kind')}")
        ns = namespace or obj.get("metadata", {}).get("namespace") or ("default" if res.namespaced else None)
        return self.call(self.api.create_object, res, ns, obj)

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return self.call(self.api.get_object, self._res(api_version, plural), namespace, name)

    def list(
        self, api_version: str, plural: str, namespace: str | None = None,
        label_selector: str | None = None, field_selector: str | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        return self.call(
            self.api.list_objects, self._res(api_version, plural), namespace, label_selector, field_selector
        )

    def patch(
        self, api_version: str, plural: str, namespace: str | None, name: str, patch: Any, *,
        subresource: str | None = None, content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:  # fmt: skip
        return self.call(
            self.api.patch_object,
            self._res(api_version, plural),
            namespace,
            name,
            patch,
            content_type,
            subresource,
        )

    def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        grace_period_seconds: float | None = None,
    ) -> dict[str, Any]:
        return self.call(
            self.api.delete_object, self._res(api_version, plural), namespace, name, grace_period_seconds
        )

    def history(
        self, api_version: str, plural: str, namespace: str | None, name: str
    ) -> list[dict[str, Any]]:
        """Every version the object went through (a deleted one ends with `deleted: True`)."""
        return self.call(self.api.history, self._res(api_version, plural), namespace, name)

    def events(self, namespace: str = "default", involved_name: str | None = None) -> list[dict[str, Any]]:
        """Core v1 events in `namespace`, oldest first, optionally for one involved object."""
        events = [
            e for e in self.list("v1", "events", namespace)
            if involved_name is None or e.get("involvedObject", {}).get("name") == involved_name
        ]  # fmt: skip
        return sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))

    # FineTuneJob shortcuts.
    def job(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.get(contract.API_VERSION, contract.PLURAL, namespace, name)

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.get("v1", "pods", namespace, name)

    def pods(
        self, namespace: str | None = "default", label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        return self.list("v1", "pods", namespace, label_selector)

    def requests(self, since: float = 0.0) -> list[tuple[float, str, str, str]]:
        """HTTP requests served since `since` (time.monotonic()): (time, method, path?query, User-Agent).
        Only operators talk HTTP here; the kubelet and these helpers use the store directly."""
        return self.call(lambda: [r for r in self.api.served if r[0] >= since])

    def log_outage(self, code: int | None) -> None:
        """Make pods/log answer `code` (e.g. 500: kubelet unreachable) until called with None."""
        self.call(setattr, self.api, "log_outage", code)

    def watches_opened(self, api_version: str, plural: str) -> int:
        """How many watch streams on the resource were opened so far (to know an operator is watching)."""
        return self.call(lambda: self.api.watches_opened[self._res(api_version, plural).key])

    @staticmethod
    def wait_for(
        predicate: Callable[[], T], timeout: float = 30, interval: float = 0.05, what: str = ""
    ) -> T:
        """Poll `predicate` until it returns something truthy and return that; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate!r}")
            time.sleep(interval)


# The fake worker (fake_worker.py) and the operator settings that make tier-3 runs fast: the
# `fake_bin`, `cluster` and `operator` fixtures of conftest.py use them.
FAST_ENV = {"FINETUNE_RESYNC_SECONDS": "0.5", "FINETUNE_BACKOFF_SECONDS": "1", "FINETUNE_BACKOFF_MAX_SECONDS": "2",
            "FINETUNE_GRACE_SECONDS": "10"}  # fmt: skip


# -- the operator -----------------------------------------------------------------------------------

_LOGIN_URLS: dict[int, list[str]] = {}  # id(registry) -> [url]: one login handler per registry


def _ensure_login(registry: Any, url: str) -> None:
    import kopf

    cell = _LOGIN_URLS.get(id(registry))
    if cell is None:
        cell = _LOGIN_URLS[id(registry)] = [url]

        @kopf.on.login(registry=registry, id="harness-emulator-login")
        async def _login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=cell[0], insecure=True, default_namespace="default")

    cell[0] = url


def fast_settings(settings: Any) -> None:
    """kopf settings that keep tests fast and deterministic (retries in tenths of seconds)."""
    settings.peering.standalone = True
    settings.posting.level = logging.INFO
    settings.networking.error_backoffs = [0.1, 0.2, 0.5, 1]
    settings.networking.request_timeout = 30
    settings.watching.reconnect_backoff = 0.1
    settings.watching.connect_timeout = 5
    settings.batching.idle_timeout = 1
    settings.batching.exit_timeout = 2
    settings.process.ultimate_exiting_timeout = 10


class OperatorRunner:
    """The real kopf operator in its own thread and event loop, against the emulator (see module docstring).

    Args:
        url: the emulator's URL.
        registry: kopf registry to run (default: import `finetune_operator.cluster.handlers`, use kopf's default).
        namespaces: namespaces to serve; `clusterwide=True` serves them all.
        configure: called with the OperatorSettings after `fast_settings` (tests tune timers here).
        memo: kopf's memo object (handlers get it as `memo`).
        cluster: when given, `start()` also waits until the new operator watches FineTuneJobs (kopf's own
            ready flag comes before its watch streams open), so a test's next create is seen as an event.
    """

    def __init__(
        self, url: str, *, registry: Any = None, namespaces: tuple[str, ...] = ("default",), clusterwide: bool = False,
        configure: Callable[[Any], None] | None = None, memo: Any = None, cluster: Cluster | None = None,
    ) -> None:  # fmt: skip
        self.url = url
        self._cluster = cluster
        self._registry = registry
        self._namespaces = () if clusterwide else namespaces
        self._clusterwide = clusterwide
        self._configure = configure
        self._memo = memo
        self._thread: threading.Thread | None = None
        self._stop_flag: threading.Event | None = None
        self.error: BaseException | None = None
        self.starts = 0

    def _resolve_registry(self) -> Any:
        import kopf

        if self._registry is None:
            import finetune_operator.cluster.handlers  # noqa: F401  (registers its handlers at import)

            self._registry = kopf.get_default_registry()
        return self._registry

    def start(self, timeout: float = 30) -> OperatorRunner:
        """Start kopf and wait until it is ready (raises if it fails to start)."""
        import kopf

        if self.alive:
            raise RuntimeError("the operator is already running")
        registry = self._resolve_registry()
        _ensure_login(registry, self.url)
        watched_before = (
            self._cluster.watches_opened(contract.API_VERSION, contract.PLURAL) if self._cluster else 0
        )
        os.environ[KUBE_SERVER_ENV] = self.url
        settings = kopf.OperatorSettings()
        fast_settings(settings)
        if self._configure is not None:
            self._configure(settings)
        ready, self._stop_flag, self.error = threading.Event(), threading.Event(), None
        stop_flag = self._stop_flag

        def main() -> None:
            try:
                asyncio.run(kopf.operator(
                    registry=registry, settings=settings, standalone=True, clusterwide=self._clusterwide,
                    namespaces=self._namespaces, stop_flag=stop_flag, ready_flag=ready, memo=self._memo,
                ))  # fmt: skip
            except BaseException as e:
                self.error = e
                log.exception("the operator crashed")
            finally:
                settings.execution.executor.shutdown(wait=True)  # kopf leaves its sync-handler pool running
                ready.set()

        self._thread = threading.Thread(target=main, name=f"kopf-operator-{self.starts}", daemon=True)
        self.starts += 1
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the operator was not ready within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"the operator failed to start: {self.error!r}") from self.error
        if self._cluster is not None:
            cluster = self._cluster
            cluster.wait_for(
                lambda: self.error is not None
                or cluster.watches_opened(contract.API_VERSION, contract.PLURAL) > watched_before,
                timeout, what="the operator to watch FineTuneJobs",
            )  # fmt: skip
            if self.error is not None:
                raise RuntimeError(f"the operator crashed while starting: {self.error!r}") from self.error
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        """Ask kopf to stop and wait for its thread to end; raises if it does not within `timeout`."""
        if self._thread is None:
            return
        assert self._stop_flag is not None
        self._stop_flag.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            import faulthandler

            faulthandler.dump_traceback(sys.stderr, all_threads=True)  # where it hangs, for the report
            raise TimeoutError(f"the operator did not stop within {timeout}s")
        self._thread = None
        if os.environ.get(KUBE_SERVER_ENV) == self.url:
            del os.environ[KUBE_SERVER_ENV]

    def restart(self, timeout: float = 30) -> OperatorRunner:
        self.stop(timeout)
        return self.start(timeout)


@contextlib.contextmanager
def run_operator(cluster: Cluster, **kwargs: Any) -> Iterator[OperatorRunner]:
    """The real operator against `cluster` for the duration of the block (kwargs: see OperatorRunner)."""
    runner = OperatorRunner(cluster.url, cluster=cluster, **kwargs).start()
    try:
        yield runner
    finally:
        runner.stop()


def start_cluster_and_operator(
    root: Path, *, kubelet: bool = True, operator: bool = True, **operator_kwargs: Any
) -> tuple[Cluster, OperatorRunner | None, Callable[[], None]]:
    """For benchmarks and scripts: a started Cluster, a started OperatorRunner, and a stop-all callable."""
    cluster = Cluster(root, kubelet=kubelet).start()
    runner = None
    try:
        runner = OperatorRunner(cluster.url, cluster=cluster, **operator_kwargs).start() if operator else None
    except BaseException:
        cluster.stop()
        raise

    def stop() -> None:
        try:
            if runner is not None:
                runner.stop()
        finally:
            cluster.stop()

    return cluster, runner, stop


def make_bin_dir(path: Path, scripts: dict[str, Path]) -> Path:
    """A directory of executables for `Cluster(bin_dir=...)`: each name runs its Python script with this venv.

    E.g. `make_bin_dir(tmp / "bin", {"finetune-worker": Path("tests/operator/fake_worker.py")})` makes the
    kubelet run a stand-in worker wherever a pod's command says `finetune-worker`.
    """
    path.mkdir(parents=True, exist_ok=True)
    for name, script in scripts.items():
        shim = path / name
        shim.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = {str(script)!r}\n"
                        f"runpy.run_path({str(Path(script).resolve())!r}, run_name='__main__')\n")  # fmt: skip
        shim.chmod(0o755)
    return path


def finetune_job(name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """A FineTuneJob manifest."""
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
