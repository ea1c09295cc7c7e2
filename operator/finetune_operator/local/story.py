"""What `finetune-operator local` tells the user across runs: the status kept in status.json and
reloaded on a rerun, the newest checkpoint read from the workspace, the checkpoint an attempt
resumes from, and how a Ctrl-C ended the attempts it interrupted. Pure helpers over plain data and
files; the runner's rooms (runner.py, display.py, interrupt.py) call them.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from finetune_api.contract import (
    CHECKPOINTS_DIR,
    RESULT_COMPLETED,
    RESULT_EVICTED,
    RESULT_FAILED,
    RESULT_INVALID,
    RESULT_OOMKILLED,
    RESULT_PREEMPTED,
)
from finetune_operator.decisions.attempts import record_endings
from finetune_operator.decisions.observe import Observed
from finetune_operator.decisions.plan import Pass, Settings
from finetune_operator.decisions.status import PHASE_FAILED, PHASE_PENDING, PHASE_SUCCEEDED, set_phase

if TYPE_CHECKING:
    from finetune_operator.local.world import LocalWorld

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
REASON_INTERRUPTED = "Interrupted"
FORCED_MESSAGE = "stopped at once by a second Ctrl-C (no new checkpoint; the newest one is kept)"


def newest_checkpoint(workspace: Path) -> dict[str, Any] | None:
    """The newest `checkpoints/checkpoint-N` with a trainer state in `workspace`, as status.checkpoint."""
    best: tuple[int, str] | None = None
    try:
        entries = list((Path(workspace) / CHECKPOINTS_DIR).iterdir())
    except OSError:
        return None
    for entry in entries:
        m = _CHECKPOINT.match(entry.name)
        if m and (entry / "trainer_state.json").is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), entry.name)
    return {"name": best[1], "step": best[0]} if best else None


def reload_status(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the status a previous run left in `path` to carry on from, a line saying what was reloaded).

    A Failed status is not carried on (a rerun after fixing the input starts afresh; reconcile would
    fail it again at once): it is kept beside, as `<name>.previous.json`. A status.json that does not
    parse is ignored, and said so."""
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"ignoring {path} ({e}); starting afresh"
    if not isinstance(st, dict) or not st.get("phase"):
        return None, None
    attempts = [a for a in st.get("attempts") or [] if isinstance(a, dict)]
    if st.get("phase") == PHASE_FAILED:
        kept = path.with_name(f"{path.stem}.previous.json")
        path.replace(kept)
        return None, f"the previous run failed ({st.get('reason')}); starting again (its status: {kept})"
    if st.get("phase") == PHASE_SUCCEEDED:
        return st, None
    n = len(attempts)
    return st, f"carrying on from {path.name}: {n} earlier attempt{'s' if n != 1 else ''}, restarts {st.get('restarts', 0)}"


def resume_line(log: str) -> str | None:
    """'resuming from checkpoint-12 (step 12 of 20)' from a training worker's log, or None."""
    for line in log.splitlines():
        if '"resume"' not in line or not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") == "resume" and ev.get("checkpoint"):
            total = f" of {ev['totalSteps']}" if isinstance(ev.get("totalSteps"), int) and ev["totalSteps"] > 0 else ""
            return f"resuming from {ev['checkpoint']} (step {ev.get('step')}{total})"
    return None


def close_interrupted(job: dict[str, Any], observed: Observed, now: dt.datetime, settings: Settings,
                      *, forced: bool) -> dict[str, Any]:
    """The job's status once the pods a Ctrl-C stopped have ended: every attempt closed (a graceful stop
    is `preempted` as the worker reported it; one stopped at once is `preempted` too, saying so), the
    phase Pending/Interrupted with a message saying how to resume, no backoff pending."""
    p = Pass(job, now, settings)
    before = {id(a) for a in p.st["attempts"] if a.get("result")}
    record_endings(p, observed)
    st = p.st
    for rec in st["attempts"]:
        if id(rec) in before or rec.get("result") in (RESULT_COMPLETED, RESULT_PREEMPTED, RESULT_INVALID):
            continue
        if rec.get("result") in (RESULT_FAILED, RESULT_OOMKILLED):  # killed by us, not by its own fault
            counter = "exportFailures" if rec.get("role") == "export" else "failures"
            st[counter] = max(0, st.get(counter, 0) - 1)
        if rec.get("result") != RESULT_EVICTED:  # evicted: already counted
            st["preemptions"] = st.get("preemptions", 0) + 1
        rec["result"], rec["message"] = RESULT_PREEMPTED, FORCED_MESSAGE if forced else (rec.get("message") or "")
    st.pop("nextAttemptAfter", None)
    if st.get("phase") not in (PHASE_SUCCEEDED, PHASE_FAILED):
        cp = (st.get("checkpoint") or {}).get("name")
        where = f" from {cp}" if cp else ""
        set_phase(st, PHASE_PENDING, REASON_INTERRUPTED,
                  f"interrupted by Ctrl-C; run the same command again to resume{where}", p.ts)
    return st


def carry_on(world: LocalWorld, out: TextIO) -> bool:
    """Reload what a previous run with this workdir left (status.json, the workspace's newest
    checkpoint); True when every job is already Succeeded (nothing is redone)."""
    done = []
    for name, job in world.jobs.items():
        st, line = reload_status(world.status_file(name))
        who = "" if world.single else f"{name}: "
        if line:
            out.write(f"{who}{line}\n")
        if st is not None:
            job["status"] = st
        ws = world.workspace(name)
        cp = newest_checkpoint(ws) if ws else None
        if cp and not job["status"].get("checkpoint") and job["status"].get("phase") != PHASE_SUCCEEDED:
            job["status"]["checkpoint"] = cp  # the next training pod resumes from it: say so
        if job["status"].get("phase") == PHASE_SUCCEEDED:
            out.write(f"{name}: already complete (Succeeded at {job['status'].get('completionTime')}); nothing "
                      f"redone. Delete {world.workdir} (or use another --workdir) to train again.\n")
            done.append(name)
    return len(done) == len(world.jobs)
