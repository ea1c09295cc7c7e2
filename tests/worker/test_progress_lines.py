"""The worker's JSON progress lines (what the operator copies into status.progress): they carry
etaSeconds, and come at least every FINETUNE_PROGRESS_SECONDS between logging steps."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.worker


def _lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{") and '"progress"' in ln]


def test_progress_lines_carry_an_eta_and_come_between_logging_steps(monkeypatch, capsys) -> None:
    from finetune_worker.callbacks import Progress

    monkeypatch.setenv("FINETUNE_PROGRESS_SECONDS", "0.5")
    cb = Progress(batch_size=8)
    state = SimpleNamespace(global_step=0, max_steps=20, epoch=0.0)
    cb.on_train_begin(None, state, None)
    for s in (1, 2, 3):  # the first step says so at once; the next two are within 0.5 s: silent
        time.sleep(0.05)
        state.global_step = s
        cb.on_step_end(None, state, None)
    time.sleep(0.55)
    state.global_step = 4
    cb.on_step_end(None, state, None)
    lines = _lines(capsys.readouterr().out)
    assert [ln["step"] for ln in lines] == [1, 4]
    last = lines[-1]
    assert isinstance(last["etaSeconds"], int) and 0 < last["etaSeconds"] < 60
    assert last["totalSteps"] == 20 and last["samplesPerSecond"] > 0
