"""Tier 3b fixtures: a real kube-apiserver + etcd (+ kube-controller-manager) for the session.

With env KUBEBUILDER_ASSETS naming a directory with kube-apiserver and etcd, the session starts
them on loopback (controlplane.py), a test kubelet that binds and runs pods (kubelet.py) and gives
each test its own namespace (`ns`), a handle on everything (`env`) and the real operator as a
process (`operator`, operator_proc.py). Without the assets every test here is skipped, at
collection, with the reason; nothing is started.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # siblings import each other by plain name (tests/realapi has no __init__)
    sys.path.insert(0, _HERE)

from controlplane import ControlPlane, assets_dir  # noqa: E402
from kubelet import RealApiKubelet  # noqa: E402
from operator_proc import OperatorProcess  # noqa: E402
from realenv import Env  # noqa: E402

from fakeworker import fake_worker_bin  # noqa: E402

FAST_ENV = {"FINETUNE_RESYNC_SECONDS": "1", "FINETUNE_BACKOFF_SECONDS": "1", "FINETUNE_BACKOFF_MAX_SECONDS": "2",
            "FINETUNE_GRACE_SECONDS": "10"}  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(_HERE)
    ours = [i for i in items if here in Path(str(i.fspath)).parents]
    for item in ours:
        item.add_marker(pytest.mark.realapi)
    _, reason = assets_dir()
    if reason:
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    assets, reason = assets_dir()
    if assets is None:
        pytest.skip(reason)
    cp = ControlPlane(assets, tmp_path_factory.mktemp("realapi")).start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubelet(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApiKubelet]:
    bin_dir = fake_worker_bin(tmp_path_factory.mktemp("realapi-bin"))
    k = RealApiKubelet(control_plane.client(user_agent="realapi-kubelet"), tmp_path_factory.mktemp("kubelet"),
                       control_plane.root / "pki", bin_dir=bin_dir).start()  # fmt: skip
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def ns(control_plane: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    yield name
    # leave it: deleting namespaces (with the namespace controller) costs time nobody waits for


@pytest.fixture
def env(control_plane: ControlPlane, kubelet: RealApiKubelet, ns: str) -> Env:
    kubelet.logs_available = True
    return Env(control_plane, kubelet, ns)


@pytest.fixture
def operator(control_plane: ControlPlane, ns: str) -> Iterator[Callable[..., OperatorProcess]]:
    """`operator(**env_overrides)` starts `finetune-operator run -n <ns>`; all are stopped at teardown."""
    procs: list[OperatorProcess] = []

    def start(namespaces: list[str] | None = None, **env: str) -> OperatorProcess:
        proc = OperatorProcess(control_plane, namespaces or [ns], {**FAST_ENV, **env})
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.kill()
