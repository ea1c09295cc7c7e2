"""`finetune-worker train` with a world size > 1: torchrun, run in this process, and the pod's one summary.

The launcher is PyTorch's own: `torch.distributed.run.run(args)` (what the `torchrun` command
calls), with the elastic agent and c10d rendezvous. This module only chooses its arguments from
the spec, and turns what the ranks reported into the pod's exit code and termination summary:

- One pod (`distributed.nodes: 1`): `--standalone` (a local c10d store, a fresh run id),
  `--nproc-per-node` from the spec.
- Several pods: the rendezvous comes from torchrun's own environment variables, which the operator
  (or the local runner) sets on every member: PET_NNODES, PET_RDZV_BACKEND=c10d,
  PET_RDZV_ENDPOINT (the rank-0 pod's DNS name), PET_RDZV_ID (one per attempt).
- `--max-restarts 0`: a failed rank ends the launch; the operator relaunches the attempt, and the
  new attempt resumes from the last complete checkpoint.

Exit codes. torchrun reports any worker exit other than 0 as a ChildFailedError (its `torchrun`
command then exits 1), and a SIGTERM to the agent as a SignalException after forwarding the signal
to the workers and waiting TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds. Neither says "preempted", so
every rank writes its own summary (rank-<RANK>.json in a directory this launcher owns) and the pod's
summary and exit code come from them: any rank invalid -> 2; any failed -> 1; every rank completed
-> 0; otherwise any preempted -> 75 (every rank stopped at the same step and one checkpoint was
written; a rank without a summary was stopped by the agent); nothing reported -> 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from finetune_api.contract import (
    CONFIG_ENV,
    EXIT_COMPLETED,
    EXIT_INVALID,
    EXIT_PREEMPTED,
    RESULT_COMPLETED,
    RESULT_FAILED,
    RESULT_INVALID,
    RESULT_PREEMPTED,
)
from finetune_api.spec import FineTuneSpec

from .errors import EXIT_FAILED, InvalidInput
from .preemption import PreemptionWatch
from .summary import RANK_SUMMARIES_ENV, emit, write_summary

SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torch's: seconds the agent waits for workers after SIGTERM
DEFAULT_SHUTDOWN_TIMEOUT_S = "120"  # a step and a checkpoint; the pod's grace period must exceed it
RDZV_ENV = ("PET_RDZV_ENDPOINT", "PET_RDZV_ID")


def under_torchrun() -> bool:
    """True inside a worker process that torchrun started (it sets TORCHELASTIC_RUN_ID and LOCAL_RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_args(spec: FineTuneSpec, config: str | None, workspace: Path) -> list[str]:
    """torchrun's arguments for this job; the rendezvous of a multi-pod job comes from PET_* variables."""
    d = spec.distributed
    args = [f"--nproc-per-node={d.procs(spec.resources.gpus)}", "--max-restarts=0"]
    if d.nodes == 1:
        args.append("--standalone")
    else:
        missing = [k for k in RDZV_ENV if not os.environ.get(k)]
        if missing:
            raise InvalidInput(f"spec.distributed.nodes is {d.nodes}: this pod needs torchrun's rendezvous "
                               f"({', '.join(missing)} unset; the operator and `finetune-operator local` set them)")
        args += [f"--nnodes={d.nodes}", f"--rdzv-backend={os.environ.get('PET_RDZV_BACKEND', 'c10d')}"]
    args += ["-m", "finetune_worker.cli", "train", "--workspace", str(workspace)]
    if config not in (None, "", "-"):
        args += ["--config", str(config)]
    return args


def pod_outcome(summaries: dict[int, dict[str, Any]], procs: int, exit_codes: dict[int, int]) -> tuple[int, dict[str, Any]]:
    """The pod's exit code and summary from its ranks' summaries (see the module docstring)."""
    by = {r: summaries[r] for r in sorted(summaries)}

    def first(result: str) -> tuple[int, dict[str, Any]] | None:
        hit = [(r, s) for r, s in by.items() if s.get("result") == result]
        return hit[0] if hit else None

    silent = sorted(r for r in exit_codes if r not in by)
    note = f" (ranks {silent} left no summary: exit codes {[exit_codes[r] for r in silent]})" if silent else ""
    for result, code in ((RESULT_INVALID, EXIT_INVALID), (RESULT_FAILED, EXIT_FAILED)):
        hit = first(result)
        if hit:
            rank, s = hit
            return code, {**s, "message": f"rank {rank}: {s.get('message', '')}{note}", "failedRank": rank}
    if by and len(by) >= procs and all(s.get("result") == RESULT_COMPLETED for s in by.values()):
        return EXIT_COMPLETED, dict(next(iter(by.values())))
    hit = first(RESULT_PREEMPTED)
    if hit:
        return EXIT_PREEMPTED, {**hit[1], "message": f"{hit[1].get('message', '')}{note}"}
    codes = exit_codes or {}
    return EXIT_FAILED, {"result": RESULT_FAILED, "message": "the ranks exited without a summary "
                         f"(exit codes by rank: {dict(sorted(codes.items()))})", "step": None, "checkpoint": None}


def launch(spec: FineTuneSpec, config_arg: str | None, config_text: str, workspace: Path, watch: PreemptionWatch) -> int:
    """Run `finetune-worker train` on spec.distributed's processes under torch.distributed.run; the exit code."""
    world = spec.world_size
    procs = spec.distributed.procs(spec.resources.gpus)
    if watch.requested:  # SIGTERM before any rank started: nothing to stop
        summary = {"result": RESULT_PREEMPTED, "step": None, "checkpoint": None, "worldSize": world,
                   "message": "stopped by SIGTERM before training began"}
        write_summary(summary)
        emit("result", **summary)
        return EXIT_PREEMPTED
    try:
        args = torchrun_args(spec, config_arg, workspace)
    except InvalidInput as e:
        summary = {"result": RESULT_INVALID, "step": None, "checkpoint": None, "worldSize": world, "message": str(e)}
        write_summary(summary)
        emit("result", **summary)
        return EXIT_INVALID
    ranks_dir = Path(tempfile.mkdtemp(prefix="finetune-ranks-"))
    saved = {k: os.environ.get(k) for k in (RANK_SUMMARIES_ENV, CONFIG_ENV, SHUTDOWN_TIMEOUT_ENV)}
    os.environ[RANK_SUMMARIES_ENV] = str(ranks_dir)
    os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, DEFAULT_SHUTDOWN_TIMEOUT_S)
    if config_arg in (None, "", "-"):
        os.environ[CONFIG_ENV] = config_text  # the ranks read it from the environment
    try:
        exit_codes = _run_torchrun(args, watch)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summaries = _read_summaries(ranks_dir)
    shutil.rmtree(ranks_dir, ignore_errors=True)
    code, summary = pod_outcome(summaries, procs, exit_codes)
    summary = {**summary, "worldSize": world, "ranks": {str(r): s.get("result") for r, s in sorted(summaries.items())}}
    if exit_codes:  # what torchrun's agent saw each failed rank exit with (75: preempted)
        summary["rankExitCodes"] = {str(r): c for r, c in sorted(exit_codes.items())}
    summary.pop("rank", None)
    write_summary(summary)
    if code != EXIT_COMPLETED:
        emit("launch", exitCode=code, ranks=summary["ranks"], rankExitCodes=summary.get("rankExitCodes"), worldSize=world)
    return code


def _run_torchrun(args: list[str], watch: PreemptionWatch) -> dict[int, int]:
    """torch.distributed.run in this process; the failed ranks' exit codes ({} when all exited 0)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException, _terminate_process_handler
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # From here a SIGTERM is torch's: the agent forwards it to the ranks and waits for them (the
    # agent installs the same handler when it starts the workers; this covers the rendezvous).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _terminate_process_handler)
    try:
        if watch.requested:  # a SIGTERM in the moment before: still honoured
            raise SignalException("SIGTERM before the launch", sigval=signal.SIGTERM)
        run(parse_args(args))
        return {}
    except ChildFailedError as e:
        return {int(r): int(f.exitcode) for r, f in e.failures.items()}
    except SignalException as e:
        emit("preemption", signal=signal.Signals(e.sigval).name, step=None, saving=True, forwardedToRanks=True)
        return {}
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, watch._handle)


def _read_summaries(root: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for p in root.glob("rank-*.json"):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            out[int(p.stem.split("-", 1)[1])] = data
        except (OSError, ValueError):
            continue
    return out
