"""The operator ⇄ worker contract's names."""

from __future__ import annotations

import pytest

from finetune_api.contract import checkpoint_name, checkpoint_step


@pytest.mark.parametrize("step", [0, 1, 200, 10**9])
def test_checkpoint_names_round_trip(step: int) -> None:
    assert checkpoint_step(checkpoint_name(step)) == step


@pytest.mark.parametrize(
    "name",
    ["checkpoint-", "checkpoint-1a", "checkpoint--1", "checkpoint-1.5", "ckpt-1", "checkpoint-\uff11\uff12", "checkpoint-\u00b2",
     ".staging-checkpoint-5", "checkpoint-5 "],
)  # fmt: skip
def test_anything_else_is_not_a_checkpoint(name: str) -> None:
    assert checkpoint_step(name) is None
