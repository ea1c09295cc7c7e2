"""Progress on the local runner's screen.

On a terminal: one live line under the status table, redrawn in place: a progress bar while training
(step/total, loss, samples/s, ETA) and the stage while exporting or starting. Anywhere else (CI, a
file, a pod log): the same text as plain lines, at most one per job every `interval` seconds and only
when it changed, so a log stays readable.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO

from finetune_operator.decisions.status import PHASE_EXPORTING, PHASE_PENDING, PHASE_TRAINING

CLEAR = "\r\033[K"
BAR_WIDTH = 20


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_text(status: dict[str, Any]) -> str | None:
    """What a job is doing now, in one line (None when there is nothing to show: waiting or done)."""
    phase = status.get("phase")
    prog = status.get("progress") or {}
    step, total = prog.get("step"), prog.get("totalSteps")
    if phase == PHASE_TRAINING and isinstance(step, int) and isinstance(total, int) and total > 0:
        done = min(BAR_WIDTH, round(BAR_WIDTH * step / total))
        parts = [f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {step}/{total}"]
        if isinstance(prog.get("loss"), (int, float)):
            parts.append(f"loss {prog['loss']:.4f}")
        if isinstance(prog.get("samplesPerSecond"), (int, float)):
            parts.append(f"{prog['samplesPerSecond']:.1f} samples/s")
        if isinstance(prog.get("etaSeconds"), (int, float)):
            parts.append(f"ETA {duration(prog['etaSeconds'])}")
        return "  ".join(parts)
    if phase == PHASE_TRAINING:
        return "training: loading the model and data"
    if phase == PHASE_EXPORTING:
        return f"exporting: {status.get('message') or 'starting'}"
    if phase == PHASE_PENDING and status.get("reason") == "PodStarting":
        return "starting the training pod"
    return None


class LiveScreen:
    """A text stream with one live line kept under what is written (see the module docstring)."""

    def __init__(self, out: TextIO, *, tty: bool | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.out = out
        isatty = getattr(out, "isatty", None)
        self.tty = bool(isatty()) if tty is None and callable(isatty) else bool(tty)
        self.interval = interval
        self.clock = clock
        self._live = ""
        self._plain: dict[str, tuple[str, float]] = {}

    def write(self, text: str) -> int:
        if self.tty and self._live:
            self.out.write(CLEAR)
        n = self.out.write(text)
        if self.tty and self._live and text.endswith("\n"):
            self.out.write(self._live)
        return n

    def flush(self) -> None:
        self.out.flush()

    def show(self, lines: dict[str, str]) -> None:
        """The live state of each job (name -> text)."""
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            text = "  |  ".join(f"{name}  {t}" for name, t in lines.items())[:width]
            if text != self._live:
                self.out.write(CLEAR + text)
                self._live = text
                self.out.flush()
            return
        now = self.clock()
        for name, text in lines.items():
            last, at = self._plain.get(name, ("", -1e9))
            if text != last and now - at >= self.interval:
                self.out.write(f"  {name}: {text}\n")
                self._plain[name] = (text, now)
        self.out.flush()

    def end(self) -> None:
        """Remove the live line (before the last words, and at exit)."""
        if self.tty and self._live:
            self.out.write(CLEAR)
            self.out.flush()
        self._live = ""
