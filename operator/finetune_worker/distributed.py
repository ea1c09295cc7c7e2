"""Inside one rank of a torchrun launch: who am I, the process group, and the few agreements ranks make.

torchrun (torch.distributed.run, see launch.py) starts the processes and sets RANK / LOCAL_RANK /
WORLD_SIZE; this module only reads them. The process group is PyTorch's (`init_process_group`,
gloo or nccl); DDP itself comes through the HF Trainer (accelerate), which reuses the group.

Agreements (collective: every rank makes the same calls in the same order):
- `agree_stop(flag)`: one all_reduce(MAX) of a one-element tensor; true when any rank asks to stop
  (a SIGTERM reached it). Called once per step by StopOnPreemption, and before training begins.
- `barrier()`: rank 0 decides or publishes (checkpoints, final/), the others wait for it.

World-size changes between attempts (checkpoint.json in each checkpoint records the world size
and gradient accumulation): `accumulation_for` keeps the global batch (batchSize x worldSize x
gradient accumulation) by raising gradient accumulation when the world shrank by a factor that
divides; where it does not divide, the global batch changes and the worker says so.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

WORLD_FILE = "world.json"  # in checkpoint-N/: {"worldSize": W, "gradientAccumulationSteps": G}
TIMEOUT_ENV = "FINETUNE_DDP_TIMEOUT"  # seconds a collective may wait for a missing rank (default 300)
DEFAULT_TIMEOUT_S = 300


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def distributed() -> bool:
    return world_size() > 1


def timeout_s() -> int:
    return int(os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S)) or DEFAULT_TIMEOUT_S)


def init(backend: str) -> None:
    """Join the process group torchrun set up (env://), once; a no-op with one process."""
    if not distributed():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()))


def _device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree_stop(flag: bool) -> bool:
    """True when any rank's flag is set (all_reduce MAX of one element); the flag itself alone."""
    if not distributed():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if distributed():
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def shutdown() -> None:
    if distributed():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def write_world(checkpoint: Path, world: int, accumulation: int) -> None:
    (Path(checkpoint) / WORLD_FILE).write_text(
        json.dumps({"worldSize": world, "gradientAccumulationSteps": accumulation}), encoding="utf-8")


def read_world(checkpoint: Path | None) -> tuple[int, int] | None:
    """(worldSize, gradientAccumulationSteps) a checkpoint was written with; None when unrecorded."""
    if checkpoint is None:
        return None
    try:
        info = json.loads((Path(checkpoint) / WORLD_FILE).read_text(encoding="utf-8"))
        return int(info["worldSize"]), int(info["gradientAccumulationSteps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def accumulation_for(previous: tuple[int, int] | None, world: int) -> tuple[int, bool]:
    """Gradient accumulation that keeps the previous global batch on `world` processes, and whether
    it could (False: the previous world x accumulation is not a multiple of `world`; 1 is used)."""
    if previous is None:
        return 1, True
    old_world, old_acc = previous
    micro = old_world * old_acc
    if micro % world == 0:
        return micro // world, True
    return 1, False
