"""How a pod running torchrun turns its ranks' summaries into one exit code and one summary (launch.py)."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api.spec import parse_spec
from finetune_worker.launch import pod_outcome, torchrun_args


def _s(result: str, **kw: Any) -> dict[str, Any]:
    return {"result": result, "step": kw.pop("step", 7), "checkpoint": kw.pop("checkpoint", None),
            "message": kw.pop("message", result), **kw}


@pytest.mark.parametrize(("summaries", "codes", "exit_code", "result"), [
    ({0: _s("completed"), 1: _s("completed")}, {}, 0, "completed"),
    ({0: _s("preempted"), 1: _s("preempted")}, {0: 75, 1: 75}, 75, "preempted"),
    ({0: _s("preempted")}, {0: 75, 1: -15}, 75, "preempted"),       # rank 1 stopped by the agent before reporting
    ({0: _s("failed"), 1: _s("preempted")}, {0: 1, 1: 75}, 1, "failed"),
    ({0: _s("preempted"), 1: _s("invalid")}, {0: 75, 1: 2}, 2, "invalid"),
    ({0: _s("completed")}, {1: -9}, 1, "failed"),                    # a rank killed: never "completed"
    ({}, {0: -9, 1: -9}, 1, "failed"),
])  # fmt: skip
def test_exit_code_follows_the_worst_rank(summaries: dict[int, dict[str, Any]], codes: dict[int, int],
                                          exit_code: int, result: str) -> None:
    code, summary = pod_outcome(summaries, 2, codes)
    assert (code, summary["result"]) == (exit_code, result)


def test_a_failed_rank_is_named_and_a_silent_rank_is_reported() -> None:
    code, summary = pod_outcome({0: _s("preempted"), 1: _s("failed", message="CUDA out of memory")}, 3, {1: 1, 2: -9})
    assert code == 1 and summary["failedRank"] == 1
    assert summary["message"].startswith("rank 1: CUDA out of memory") and "ranks [2] left no summary" in summary["message"]


def test_torchrun_arguments_one_pod_is_standalone_several_need_the_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from finetune_worker.errors import InvalidInput

    one = parse_spec({"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}, "resources": {"gpus": 0},
                      "distributed": {"procsPerNode": 2}})
    args = torchrun_args(one, "/cfg.yaml", Path("/ws"))
    assert args[:3] == ["--nproc-per-node=2", "--max-restarts=0", "--standalone"]
    assert args[3:] == ["-m", "finetune_worker.cli", "train", "--workspace", "/ws", "--config", "/cfg.yaml"]
    two = parse_spec({"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}, "resources": {"gpus": 0},
                      "distributed": {"nodes": 2}})
    monkeypatch.delenv("PET_RDZV_ENDPOINT", raising=False)
    with pytest.raises(InvalidInput, match="PET_RDZV_ENDPOINT"):
        torchrun_args(two, None, Path("/ws"))
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "job-train-0-0.job:29400")
    monkeypatch.setenv("PET_RDZV_ID", "job-0")
    assert torchrun_args(two, None, Path("/ws"))[:4] == ["--nproc-per-node=1", "--max-restarts=0", "--nnodes=2",
                                                          "--rdzv-backend=c10d"]
