"""What `finetune-operator local` shows: a row per job each time its row changes (as
`kubectl get ftj -w` prints them), the Events that say why (as `kubectl describe` shows them), the
checkpoint a training pod resumes from, the live progress line, and at the end how each job ended
(the exported model's path, or the reason and the worker's log)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finetune_api.contract import EXPORT_DIR
from finetune_operator.decisions.status import PHASE_FAILED, PHASE_SUCCEEDED
from finetune_operator.local.progress import LiveScreen, progress_text
from finetune_operator.local.story import newest_checkpoint, resume_line
from finetune_operator.local.world import LocalWorld

COLUMNS = ("NAME", "PHASE", "PROGRESS", "CHECKPOINT", "RESTARTS", "AGE")
SHOWN_EVENTS = ("Resumed", "AttemptPreempted", "AttemptEvicted", "WaitingForSourceJob")  # besides Warnings


def age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s < 600 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60}m"


def _format(cols: tuple[str, ...]) -> str:
    widths = (24, 11, 9, 18, 9, 6)
    return "".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)).rstrip() + "\n"


class StatusDisplay:
    """The story of `world`'s jobs on `screen` (see the module docstring)."""

    def __init__(self, world: LocalWorld, screen: LiveScreen) -> None:
        self.world = world
        self.screen = screen
        self.started = time.monotonic()
        self._last_rows: dict[str, tuple[str, ...]] = {}
        self._told_resume: set[str] = set()

    def who(self, name: str) -> str:
        """The prefix naming the job on a line: none when there is only one."""
        return "" if self.world.single else f"{name}: "

    def say(self, text: str) -> None:
        self.screen.write(text)
        self.screen.flush()

    def tell_resume(self, name: str, pod: str) -> None:
        """Say once where a training pod picks up, as soon as its worker has said it."""
        if pod in self._told_resume or "-train-" not in pod:
            return
        log = self.world.executor.logs(pod)
        line = resume_line(log)
        if line is not None or '"event": "start"' in log or '"event":"start"' in log:
            self._told_resume.add(pod)
        if line is not None:
            self.say(f"  {self.who(name)}{pod}: {line}\n")

    def tell_events(self, name: str, events: list[dict[str, Any]]) -> None:
        for ev in events:  # what `kubectl describe` would show: why a row changed
            if ev["type"] == "Warning" or ev["reason"] in SHOWN_EVENTS:
                self.screen.write(f"  {self.who(name)}{ev['type']} {ev['reason']}: {ev['message']}\n")

    def print_row(self, name: str) -> None:
        st = self.world.jobs[name]["status"]
        pct = (st.get("progress") or {}).get("percent")
        checkpoint = (st.get("checkpoint") or {}).get("name")
        if not checkpoint and st.get("phase") not in (PHASE_SUCCEEDED, PHASE_FAILED):
            ws = self.world.workspace(name)  # nothing reported yet: what the workspace holds
            checkpoint = (newest_checkpoint(ws) or {}).get("name") if ws else None
        row = (name, str(st.get("phase") or ""), f"{pct:.0f}%" if isinstance(pct, (int, float)) else "",
               str(checkpoint or ""), str(st.get("restarts", 0)))  # fmt: skip
        if row != self._last_rows.get(name):
            if not self._last_rows:
                self.screen.write(_format(COLUMNS))
            self.say(_format((*row, age(time.monotonic() - self.started))))
            self._last_rows[name] = row

    def show_progress(self) -> None:
        lines = {}
        for name, job in self.world.jobs.items():
            text = progress_text(job["status"])
            if text:
                lines[name] = text
        self.screen.show(lines)

    def report(self) -> int:
        """Say how each job ended; 0 when all Succeeded."""
        codes = [self._report(name) for name in self.world.jobs]
        self.screen.flush()
        return max(codes)

    def _report(self, name: str) -> int:
        st = self.world.jobs[name]["status"]
        if st.get("phase") == PHASE_FAILED:
            self.screen.write(f"{name} failed ({st.get('reason')}): {st.get('message')}\n")
            last = [a for a in st.get("attempts") or [] if a.get("pod")][-1:]
            if last:
                self.screen.write(f"worker log: {self.world.executor.pod_dir(last[0]['pod']) / 'log'}\n")
            return 1
        path = (st.get("export") or {}).get("path")
        local = Path(path) if path and Path(path).is_absolute() and Path(path).exists() else (
            self.world.claim_dir(name) / EXPORT_DIR)  # fmt: skip
        self.screen.write(f"{name} succeeded; exported model: {local}\n")
        for fmt in (st.get("export") or {}).get("formats") or []:
            if (local / fmt).is_dir():
                self.screen.write(f"  {fmt}: {local / fmt}\n")
        return 0
