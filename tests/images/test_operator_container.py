"""The operator image as the Deployment runs it: its non-root user, a read-only root, no
capabilities; logged in to an API server (the tier-3 emulator, served on loopback and reached
with --network host through FINETUNE_KUBE_SERVER), with kopf's peering on: the liveness endpoint
answers (kopf serves it only to an operator that has logged in and started), the replica joins
the peering under a name it could find (issue 22: a uid without a passwd entry crashed it), and a
FineTuneJob gets its training pod."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerkit import LOCKED_DOWN, container, inspect, run, wait_for

from remotekit import fetch, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # the tier-3 harness
from harness import Cluster, finetune_job
from kube_store import Res

pytestmark = pytest.mark.images
ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = yaml.safe_load((ROOT / "manifests" / "manager" / "deployment.yaml").read_text())
POD_SECURITY = DEPLOYMENT["spec"]["template"]["spec"]["securityContext"]
PEERING = "finetune-operator"  # the Deployment's --peering


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The emulated API server on 127.0.0.1, with kopf's ClusterKopfPeering resource (manifests/peering)."""
    c = Cluster(tmp_path / "cluster", kubelet=False).start()
    c.call(c.api.register, Res("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering",
                               namespaced=False, status_subresource=False))  # fmt: skip
    try:
        yield c
    finally:
        c.stop()


def _peers(cluster: Cluster) -> list[str]:
    obj = cluster.get("kopf.dev/v1", "clusterkopfpeerings", None, PEERING) or {}
    return [k for k, v in (obj.get("status") or {}).items() if v]


def test_it_runs_as_the_deployments_user_with_a_passwd_entry_and_answers_version(operator_image: str) -> None:
    assert inspect(operator_image, "{{.Config.User}}") == f"{POD_SECURITY['runAsUser']}:{POD_SECURITY['runAsGroup']}"
    res = run(operator_image, "--version", flags=LOCKED_DOWN)
    assert res.returncode == 0 and res.stdout.strip() == f"finetune-operator {version('finetune-operator')}", res
    # kopf names a peering replica with getpass.getuser(); for 65532 without a passwd entry it raised KeyError
    probe = "import getpass, os; print(os.getuid(), os.getgid(), getpass.getuser(), os.environ['HOME'])"
    res = run(operator_image, "-c", probe, flags=[*LOCKED_DOWN, "--entrypoint", "python"])
    assert res.stdout.split() == ["65532", "65532", "nonroot", "/nonexistent"], res


def test_it_carries_the_control_plane_and_no_torch(operator_image: str) -> None:
    probe = ("import importlib.util as u; print(sorted(m for m in ('kopf', 'kubernetes_asyncio', 'prometheus_client', "
             "'torch', 'transformers', 'sentence_transformers', 'peft') if u.find_spec(m)))")  # fmt: skip
    res = run(operator_image, "-c", probe, flags=["--entrypoint", "python"])
    assert res.stdout.strip() == "['kopf', 'kubernetes_asyncio', 'prometheus_client']", res


# (docker --user, extra env, what the replica is called in the peering)
IDENTITIES = {
    "image-user": (None, {}, "nonroot@"),  # the Deployment without POD_ID: the name from /etc/passwd
    "pod-name": (None, {"POD_ID": "finetune-operator-5d8f7-xk2lp"}, "finetune-operator-5d8f7-xk2lp"),
    "arbitrary-uid": ("1000650000:0", {}, "uid-1000650000@"),  # OpenShift's restricted SCC: no passwd entry
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(IDENTITIES))
def test_with_peering_it_logs_in_serves_healthz_and_launches_a_training_pod(
    operator_image: str, cluster: Cluster, case: str
) -> None:
    user, env, peer_name = IDENTITIES[case]
    live, prom = free_port(), free_port()
    flags = [*LOCKED_DOWN, "--tmpfs", "/tmp", "--network", "host", "-e", f"FINETUNE_KUBE_SERVER={cluster.url}",
             *(["--user", user] if user else []), *(a for k, v in env.items() for a in ("-e", f"{k}={v}"))]  # fmt: skip
    args = ["run", "--namespace", "default", f"--peering={PEERING}", f"--liveness-port={live}", f"--metrics-port={prom}"]
    with container(operator_image, *args, flags=flags, prefix="finetune-operator-test") as op:
        wait_for(lambda: fetch(f"http://127.0.0.1:{live}/healthz")[0] == 200, 90, "the liveness endpoint", op)
        peers = wait_for(lambda: _peers(cluster), 30, f"a replica in ClusterKopfPeering {PEERING}", op)
        assert len(peers) == 1 and peers[0].startswith(peer_name), peers
        cluster.create(finetune_job("in-a-container", {"dataset": {"inline": [{"anchor": "q", "positive": "a"}]}}))
        pod: dict[str, Any] = wait_for(lambda: cluster.pod("in-a-container-train-1"), 60, "the training pod", op)
        assert pod["spec"]["containers"][0]["command"][:2] == ["finetune-worker", "train"]
        metrics = wait_for(lambda: fetch(f"http://127.0.0.1:{prom}/metrics")[1], 30, "the metrics endpoint", op)
        assert "finetune_operator_active 1.0" in metrics
        code = op.stop(grace=30)
        log = op.logs()
        assert code == 0, f"exit code {code} after SIGTERM"
        assert "Traceback" not in log and "KeyError" not in log, log[-3000:]
