"""Tier 4 fixtures: a real cluster (clusters.py says which) with the operator installed from
manifests/kind, and a restricted namespace per scenario.

Without a cluster, every test here is skipped at collection with the reason, in well under a
second: no archive is opened and nothing is started. On a failure, the namespace's status, pods,
logs and Events and the operator's log are added to the report.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # siblings import each other by plain name (tests/node has no __init__)
    sys.path.insert(0, _HERE)

from clusters import open_cluster, source  # noqa: E402
from kube import Cluster  # noqa: E402

SUMMARY: dict[str, Any] = {"scenarios": []}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(_HERE)
    ours = [i for i in items if here in Path(str(i.fspath)).parents]
    if not ours:
        return
    for item in ours:
        item.add_marker(pytest.mark.node)
    _, reason = source()
    if reason:
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed scenario's report carries its namespace's story (Cluster.dump)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    funcargs = getattr(item, "funcargs", {})
    if report.failed and report.when == "call" and "ns" in funcargs and "installed" in funcargs:
        try:
            report.sections.append(("cluster diagnostics", funcargs["installed"].dump(funcargs["ns"])))
        except Exception as e:  # the cluster may be what broke
            report.sections.append(("cluster diagnostics", f"could not be read: {e}"))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY.get("cluster"):
        return
    tr = terminalreporter
    tr.section("tier 4: the real node")
    tr.write_line(f"cluster: {SUMMARY['cluster']}")
    for key in ("versions", "startup", "teardown"):
        if SUMMARY.get(key):
            tr.write_line(f"{key}: " + ", ".join(f"{k} {v}" for k, v in SUMMARY[key].items()))
    for name, outcome, seconds in SUMMARY["scenarios"]:
        tr.write_line(f"  {outcome:7} {seconds:6.0f} s  {name}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    _, reason = source()
    if reason:
        pytest.skip(reason)
    with open_cluster(SUMMARY) as c:
        yield c


@pytest.fixture(scope="session")
def installed(cluster: Cluster) -> Cluster:
    """The operator from manifests/kind, both replicas rolled out."""
    started = time.monotonic()
    cluster.install()
    SUMMARY.setdefault("startup", {})["install"] = round(time.monotonic() - started, 1)
    return cluster


@pytest.fixture
def ns(installed: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own that enforces PodSecurity `restricted` (as a careful site's
    would); on failure its story and the operator's log go into the report."""
    name = f"ftj-{uuid.uuid4().hex[:6]}"
    installed.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                 "pod-security.kubernetes.io/enforce-version": "latest"}}})  # fmt: skip
    started = time.monotonic()
    yield name
    call = getattr(request.node, "rep_call", None)
    outcome = "FAILED" if call is None or call.failed else "skipped" if call.skipped else "passed"
    SUMMARY["scenarios"].append((request.node.name, outcome, time.monotonic() - started))
    # leave the namespace: its claim's volume is the scenario's evidence, and deleting costs time
