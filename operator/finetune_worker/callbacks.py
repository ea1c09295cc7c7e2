"""Trainer callbacks: JSON progress lines, checkpoint-on-SIGTERM (see preemption.py), test-only fault injection."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from transformers import TrainerCallback

from .distributed import agree_stop
from .preemption import PreemptionWatch
from .summary import emit

FAULT_ENV = "FINETUNE_FAULT"  # test hook: "kill-at-step:N", "sigterm-at-step:N", "kill-in-save:N"


def fault(kind: str, step: int) -> bool:
    """True when the test hook asks for `kind` at this step (never set in production)."""
    spec = os.environ.get(FAULT_ENV, "")
    for item in spec.split(","):
        name, _, at = item.partition(":")
        if name == kind and at.isdigit() and int(at) == step:
            return True
    return False


class StopOnPreemption(TrainerCallback):
    """At the first step boundary after SIGTERM: save a checkpoint (if enabled) and stop.

    Distributed: a SIGTERM may reach one rank (its pod evicted) or all; every step the ranks agree
    through one all_reduce(MAX) of a one-element flag, so all stop at the same step and save one
    checkpoint together."""

    def __init__(self, watch: PreemptionWatch, checkpoint: bool) -> None:
        self.watch = watch
        self.checkpoint = checkpoint
        self.stopped_at_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if fault("sigterm-at-step", state.global_step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.stopped_at_step is None and agree_stop(self.watch.requested):
            self.stopped_at_step = state.global_step
            emit("preemption", signal=self.watch.signal_name or "SIGTERM (another rank)", step=state.global_step,
                 saving=self.checkpoint)
            control.should_save = self.checkpoint
            control.should_training_stop = True
        return control


class KillAtStep(TrainerCallback):
    """Test hook: SIGKILL this process at the end of a step (after any save of that step)."""

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if fault("kill-at-step", state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        return control


PROGRESS_SECONDS_ENV = "FINETUNE_PROGRESS_SECONDS"  # the longest silence between progress lines (default 5)


class Progress(TrainerCallback):
    """JSON progress lines: the first step of this process, every logging step, and at least every
    FINETUNE_PROGRESS_SECONDS between them (so a slow step cadence still shows step, rate and ETA).
    Each carries step/totalSteps, epoch, the last logged loss, samplesPerSecond and etaSeconds (from
    this process's own step rate)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.first_step: int | None = None
        self.last_loss: float | None = None
        self._t0 = time.monotonic()
        self._s0 = 0
        self._last = 0.0
        try:
            self.every = max(0.5, float(os.environ.get(PROGRESS_SECONDS_ENV, "5")))
        except ValueError:
            self.every = 5.0

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._t0, self._s0 = time.monotonic(), state.global_step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            self._emit(state)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.first_step is None:
            self.first_step = state.global_step
            self._emit(state)
        elif time.monotonic() - self._last >= self.every:
            self._emit(state)
        return control

    def _emit(self, state: Any) -> None:
        now = time.monotonic()
        steps = state.global_step - self._s0
        rate = steps * self.batch_size / (now - self._t0) if now > self._t0 and steps > 0 else None
        left = max(0, int(state.max_steps or 0) - int(state.global_step))
        eta = round(left * (now - self._t0) / steps) if steps > 0 and state.max_steps else None
        self._last = now
        emit("progress", step=state.global_step, totalSteps=state.max_steps, epoch=round(float(state.epoch or 0), 4),
             loss=self.last_loss, samplesPerSecond=round(rate, 2) if rate else None, etaSeconds=eta)
