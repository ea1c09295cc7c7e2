"""`spec.distributed` and `spec.storage.accessModes`: parsing, the world size, and what cannot run distributed.

Pure (no I/O, no torch): the operator, the local runner and the worker all read a job's scale-out
from here, so the three agree on the world size, the backend and the refusals.

Semantics (README "Multi-GPU and multi-node"):
- `nodes` pods per attempt; `procsPerNode` processes in each (auto: one per GPU, 1 on CPU);
  world size = nodes x procsPerNode. torchrun (torch.distributed.run) starts the processes.
- `training.batchSize` is per process: the global batch is batchSize x world size
  (x gradient accumulation after a resume on fewer processes, see finetune_worker.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_api.fields import SpecError, _kind, _Obj, _show

BACKENDS = ("auto", "nccl", "gloo")
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany")
MAX_NODES = 64
MAX_PROCS_PER_NODE = 64
# Losses with in-batch negatives: sentence-transformers' gather_across_devices applies to them.
GATHER_LOSSES = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss")
# Why a loss cannot train under DDP (refused at apply time when the world size is > 1).
NOT_DISTRIBUTED = {
    "DenoisingAutoEncoderLoss": "its decoder lives in the loss, outside the DistributedDataParallel "
                                "model, so its gradients would not be averaged across processes and "
                                "every rank would train a different decoder",
    "CachedMultipleNegativesRankingLoss": "its cached mini-batches run several forward and backward "
                                          "passes per step, which DistributedDataParallel's gradient "
                                          "hooks do not allow; use MultipleNegativesRankingLoss "
                                          "(with gatherAcrossDevices for a large global batch)",
}


@dataclass(frozen=True)
class DistributedSpec:
    nodes: int = 1
    procs_per_node: int | None = None  # None: auto (one per GPU, 1 on CPU)
    backend: str = "auto"

    def procs(self, gpus: int) -> int:
        """Processes per pod: the integer given, or one per GPU (1 on CPU)."""
        return self.procs_per_node if self.procs_per_node is not None else max(1, gpus)

    def world_size(self, gpus: int) -> int:
        return self.nodes * self.procs(gpus)

    def resolved_backend(self, gpus: int) -> str:
        """auto = nccl with GPUs, gloo on CPU."""
        return self.backend if self.backend != "auto" else ("nccl" if gpus > 0 else "gloo")


def parse_distributed(o: _Obj) -> DistributedSpec:
    procs = o.get("procsPerNode")
    if procs is None or procs == "auto":
        n_procs = None
    elif isinstance(procs, bool) or not isinstance(procs, int):
        got = _show(procs) if isinstance(procs, str) else _kind(procs)
        raise SpecError(o.at("procsPerNode"), f"must be 'auto' or an integer, got {got}")
    elif not 1 <= procs <= MAX_PROCS_PER_NODE:
        raise SpecError(o.at("procsPerNode"), f"must be between 1 and {MAX_PROCS_PER_NODE}, got {procs}")
    else:
        n_procs = procs
    d = DistributedSpec(nodes=o.int("nodes", 1, lo=1, hi=MAX_NODES) or 1, procs_per_node=n_procs,
                        backend=o.str("backend", "auto", choices=BACKENDS) or "auto")
    o.done()
    return d


def parse_access_modes(v: Any, path: str, nodes: int) -> tuple[str, ...]:
    """storage.accessModes; default ReadWriteOnce for one node, ReadWriteMany for several."""
    if v is None:
        return ("ReadWriteOnce",) if nodes == 1 else ("ReadWriteMany",)
    if not isinstance(v, list) or not v:
        raise SpecError(path, f"must be a non-empty list of: {', '.join(ACCESS_MODES)}")
    for i, m in enumerate(v):
        if m not in ACCESS_MODES:
            raise SpecError(f"{path}[{i}]", f"unknown access mode {_show(m)}; expected one of: {', '.join(ACCESS_MODES)}")
    if len(set(v)) != len(v):
        raise SpecError(path, "access modes must be distinct")
    if "ReadOnlyMany" in v and len(v) == 1:
        raise SpecError(path, "the workspace is written to (checkpoints, exports); ReadOnlyMany alone cannot hold it")
    return tuple(v)


def check_distributed(d: DistributedSpec, *, gpus: int, loss: str, inner_loss: str, access_modes: tuple[str, ...],
                      loss_params: dict[str, Any], path: str) -> None:
    """Refuse combinations that cannot run, naming the field and the reason."""
    if d.backend == "nccl" and gpus == 0:
        raise SpecError(f"{path}.distributed.backend", "nccl needs GPUs (resources.gpus >= 1); use gloo or auto on CPU")
    if d.procs_per_node is not None and gpus > 0 and d.procs_per_node > gpus:
        raise SpecError(f"{path}.distributed.procsPerNode",
                        f"{d.procs_per_node} processes but {gpus} GPUs per pod: one process per GPU (use auto)")
    if d.nodes > 1 and "ReadWriteMany" not in access_modes:
        raise SpecError(f"{path}.storage.accessModes",
                        f"{d.nodes} nodes share one workspace: every pod mounts it, so it must be ReadWriteMany "
                        f"(got {', '.join(access_modes)})")
    world = d.world_size(gpus)
    if world > 1:
        for name in dict.fromkeys((loss, inner_loss)):
            if name in NOT_DISTRIBUTED:
                raise SpecError(f"{path}.training.loss",
                                f"{name} cannot train on {world} processes: {NOT_DISTRIBUTED[name]}; "
                                "set distributed.nodes and procsPerNode to 1")
    gather = loss_params.get("gatherAcrossDevices")
    if gather is not None and inner_loss not in GATHER_LOSSES:
        raise SpecError(f"{path}.training.lossParams.gatherAcrossDevices",
                        f"{inner_loss} uses no in-batch negatives; gatherAcrossDevices applies to: {', '.join(GATHER_LOSSES)}")


def gather_across_devices(loss_params: dict[str, Any], world_size: int) -> bool:
    """In-batch negatives from every rank: lossParams.gatherAcrossDevices, default on when world size > 1."""
    v = loss_params.get("gatherAcrossDevices")
    return bool(v) if v is not None else world_size > 1
