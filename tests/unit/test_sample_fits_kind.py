"""The laptop demo schedules on a small kind node with the operator installed (issue 22).

The LoRA sample asked for `cpu: "2"`: on a 2-CPU node it could never be scheduled beside the
operator's replicas (seen on a real node: "0/1 nodes are available: 1 Insufficient cpu"). A kind
node is also its own control plane; these are the CPU requests of the pods kind v0.2x starts on
it (kubeadm's static pods, CoreDNS, kindnet; kube-proxy and the local-path provisioner request none).
"""

from __future__ import annotations

from pathlib import Path

import yaml

KIND_NODE_MILLICPU = 2000
KIND_SYSTEM_MILLICPU = {
    "etcd": 100,
    "kube-apiserver": 250,
    "kube-controller-manager": 200,
    "kube-scheduler": 100,
    "coredns (2 replicas)": 200,
    "kindnet": 100,
}


def millicpu(quantity: str | int | float) -> int:
    text = str(quantity)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def test_the_lora_sample_fits_a_two_cpu_kind_node_beside_the_operator() -> None:
    sample = yaml.safe_load(Path("manifests/samples/finetune_v1alpha1_finetunejob_lora.yaml").read_text())
    deployment = yaml.safe_load(Path("manifests/manager/deployment.yaml").read_text())
    operator = deployment["spec"]["replicas"] * millicpu(
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    surge = millicpu(deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    used = sum(KIND_SYSTEM_MILLICPU.values()) + operator + surge  # a rolling update runs one more replica
    training = millicpu(sample["spec"]["resources"]["cpu"])
    assert used + training <= KIND_NODE_MILLICPU, (
        f"the sample asks for {training}m CPU; a 2-CPU kind node has {KIND_NODE_MILLICPU - used}m left")
