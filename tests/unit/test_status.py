"""Conditions and the minimal status patch."""

from __future__ import annotations

from finetune_operator.decisions import status as S


def test_transition_time_moves_only_when_status_flips() -> None:
    conds = S.set_condition([], "Training", True, "Training", "step 1", "t1")
    conds = S.set_condition(conds, "Training", True, "Training", "step 2", "t2")
    assert conds == [{"type": "Training", "status": "True", "reason": "Training", "message": "step 2",
                      "lastTransitionTime": "t1"}]  # fmt: skip
    conds = S.set_condition(conds, "Training", False, "Finished", "", "t3")
    assert conds[0]["lastTransitionTime"] == "t3" and conds[0]["status"] == "False"


def test_phase_sets_every_condition_coherently() -> None:
    st: dict = {}
    S.set_phase(st, S.PHASE_SUCCEEDED, S.REASON_EXPORTED, "exported to /workspace/export", "t")
    by_type = {c["type"]: c for c in st["conditions"]}
    assert [c["type"] for c in st["conditions"]] == ["Training", "Suspended", "Succeeded", "Failed"]
    assert by_type["Succeeded"]["status"] == "True" and by_type["Succeeded"]["reason"] == "Exported"
    assert {by_type[t]["status"] for t in ("Training", "Suspended", "Failed")} == {"False"}
    S.set_phase(st, S.PHASE_FAILED, S.REASON_BACKOFF_LIMIT, "failed 4 times", "t")
    by_type = {c["type"]: c for c in st["conditions"]}
    assert by_type["Failed"]["status"] == "True" and by_type["Succeeded"]["status"] == "False"


def test_patch_only_when_changed() -> None:
    old = {"phase": "Training", "progress": {"step": 3, "updatedAt": "t1"}, "nextAttemptAfter": "x"}
    assert (
        S.status_patch(
            old, {"phase": "Training", "progress": {"step": 3, "updatedAt": "t2"}, "nextAttemptAfter": "x"}
        )
        is None
    )
    assert S.status_patch(old, {"phase": "Training", "progress": {"step": 4, "updatedAt": "t2"}}) == {
        "progress": {"step": 4, "updatedAt": "t2"},
        "nextAttemptAfter": None,
    }
