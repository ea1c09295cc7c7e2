"""Where tier 4's cluster comes from: one function for the tests (conftest.py) and the benchmark.

- `FINETUNE_E2E_CONTEXT` names a kubeconfig context (`FINETUNE_E2E_KUBECONFIG`, default
  ~/.kube/config) of a cluster that already runs the images (tests/e2e/run-kind.sh: kind, after
  `kind load docker-image`); `FINETUNE_E2E_VOLUMES=NODE_DIR=HOST_DIR[,...]` says where the node's
  volume directories are on this host (kind: /var/local-path-provisioner=/tmp/finetune-operator-kind);
- otherwise the tier-4 harness (nodecluster.py) assembles a one-node cluster on this machine from
  `KUBEBUILDER_ASSETS`, Debian's containerd, runc and CNI plugins, `FINETUNE_NODE_PAUSE` (a static
  pause binary) and `FINETUNE_NODE_IMAGES` (`docker save` archives of the two images).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kube import IMAGES, Cluster

CONTEXT_ENV = "FINETUNE_E2E_CONTEXT"
KUBECONFIG_ENV = "FINETUNE_E2E_KUBECONFIG"
VOLUMES_ENV = "FINETUNE_E2E_VOLUMES"


def source() -> tuple[str, str]:
    """("context" | "harness", "") or ("", the reason tier 4 cannot run here). Cheap: no archive is
    opened and nothing is started."""
    if os.environ.get(CONTEXT_ENV):
        return "context", ""
    from nodecluster import node_assets

    found, reason = node_assets(IMAGES)
    return ("harness", "") if found else ("", f"{reason}; or set {CONTEXT_ENV} to a cluster's context")


def volume_map(raw: str) -> dict[str, Path]:
    pairs = [p.split("=", 1) for p in raw.split(",") if "=" in p]
    return {node: Path(host) for node, host in pairs}


@contextlib.contextmanager
def open_cluster(summary: dict[str, Any] | None = None) -> Iterator[Cluster]:
    """The cluster `source()` names; the harness's is torn down on exit, whatever happened.
    `summary` receives what to report (where, versions, start-up times)."""
    summary = summary if summary is not None else {}
    kind, reason = source()
    if reason:
        raise LookupError(reason)
    if kind == "context":
        kubeconfig = Path(os.environ.get(KUBECONFIG_ENV) or Path.home() / ".kube" / "config")
        ctx = os.environ[CONTEXT_ENV]
        summary["cluster"] = f"context {ctx} ({kubeconfig})"
        cluster = Cluster(kubeconfig, ctx, ctx, volume_map(os.environ.get(VOLUMES_ENV, "")))
        version = cluster.kubectl("version", "-o", "json", check=False).stdout
        with contextlib.suppress(ValueError, KeyError):
            import json

            summary["versions"] = {"kubernetes": json.loads(version)["serverVersion"]["gitVersion"]}
        yield cluster
        return
    from nodecluster import NodeCluster, node_assets

    found, _ = node_assets(IMAGES)
    assert found is not None
    node = NodeCluster(found, IMAGES)
    started = time.monotonic()
    try:
        node.start(timeout=120)
        summary["cluster"] = (
            f"tier-4 harness: node {node.context} at {node.host_ip}, API server {node.server}"
        )
        summary["versions"] = {"kubernetes": node.version, **node.versions}
        summary["startup"] = {**node.timings, "total": round(time.monotonic() - started, 1)}
        yield Cluster(node.kubeconfig_path("admin"), node.context, "tier-4 harness",
                      {str(node.volume_root): node.volume_root}, node, summary["versions"])  # fmt: skip
    finally:
        node.stop()
        summary["teardown"] = {
            k.removeprefix("stop "): v for k, v in node.timings.items() if k.startswith("stop ")
        }
