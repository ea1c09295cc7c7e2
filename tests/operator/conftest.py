"""Fixtures for tier 3: the emulated API (`kube`), the test kubelet (`kubelet`) and `run_operator`.

See harness.py for what each piece does; everything is torn down even when a test fails, and a
test that leaves a kopf thread or a pod process behind fails at teardown.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness
import psutil
import pytest
from harness import Cluster, OperatorRunner
from kubelet_sim import TestKubelet

from fakeworker import fake_worker_bin


@pytest.fixture
def kube_options() -> dict[str, Any]:
    """Keyword arguments for `Cluster` (override in a module, e.g. `{"bin_dir": shim_dir}` for a fake worker)."""
    return {}


@pytest.fixture
def kube(tmp_path: Path, kube_options: dict[str, Any]) -> Iterator[Cluster]:
    """A running emulated API server with the FineTuneJob resource, namespace `default` and a test kubelet."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster = Cluster(tmp_path / "cluster", **kube_options).start()
    try:
        yield cluster
    finally:
        cluster.stop()
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    assert not left, f"pod processes left running: {[p.cmdline() for p in left]}"


@pytest.fixture
def kubelet(kube: Cluster) -> TestKubelet:
    """The test kubelet running `kube`'s pods as local processes (kill/evict/workspace helpers)."""
    assert kube.kubelet is not None
    return kube.kubelet


@pytest.fixture
def run_operator(kube: Cluster) -> Iterator[Callable[..., contextlib.AbstractContextManager[OperatorRunner]]]:
    """`with run_operator(**kwargs) as op:` runs the real kopf operator against `kube` (op.restart() works).

    Every operator started through this fixture is stopped at teardown and must leave no kopf thread behind.
    """
    runners: list[OperatorRunner] = []

    @contextlib.contextmanager
    def start(**kwargs: Any) -> Iterator[OperatorRunner]:
        runner = OperatorRunner(kube.url, cluster=kube, **kwargs)
        runners.append(runner)
        runner.start()
        try:
            yield runner
        finally:
            runner.stop()

    yield start
    for runner in runners:
        runner.stop()
    leftovers = [t.name for t in threading.enumerate() if t.name.startswith("kopf-operator")]
    assert not leftovers, f"operator threads left running: {leftovers}"


__all__ = ["harness", "kube", "kube_options", "kubelet", "run_operator"]


# -- a cluster whose pods run the fake worker, at FAST_ENV settings (a module may define its own
# `cluster`, as test_operator_cli and test_operator_scale do) ---------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A bin directory whose `finetune-worker` is the fake worker."""
    return fake_worker_bin(tmp_path / "bin")


@pytest.fixture
def cluster(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    for k, v in harness.FAST_ENV.items():
        monkeypatch.setenv(k, v)
    c = Cluster(tmp_path / "cluster", bin_dir=fake_bin).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[OperatorRunner]:
    """The real operator (kopf, in a thread) against `cluster`, watching before the test starts."""
    runner = OperatorRunner(cluster.url, cluster=cluster).start()
    try:
        yield runner
    finally:
        runner.stop()
