"""The chaos suite's ledger (what was tried, what was hit, what failed) and its summary.

A plain module, not the chaos conftest, so that tests/conftest.py prints the summary in every
layout: in one process the chaos tests fill LEDGER themselves; under pytest-xdist each worker hands
its ledger to the controller (tests/chaos/conftest.py, pytest_sessionfinish), which does not
collect, may not load that conftest, and merges them (tests/conftest.py, pytest_testnodedown).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

MASTER_SEED = int(os.environ.get("CHAOS_SEED", "6062026"))
TRIALS = int(os.environ.get("CHAOS_TRIALS", "4"))


class Ledger:
    """What the chaos tests tried and found, across the session."""

    def __init__(self) -> None:
        self.trials: Counter[str] = Counter()
        self.points: Counter[str] = Counter()  # kill/fault point -> times it was hit
        self.missed: Counter[str] = Counter()  # kill points aimed at but not reached (the run ended first)
        self.corruptions: Counter[str] = Counter()
        self.failures: list[str] = []
        self.runs = 0

    def point(self, suite: str, name: str) -> None:
        self.points[f"{suite}:{name}"] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"seed": MASTER_SEED, "trialsPerTest": TRIALS, "trials": dict(self.trials), "workerRuns": self.runs,
                "killPoints": dict(sorted(self.points.items())), "missed": dict(sorted(self.missed.items())),
                "corruptions": dict(self.corruptions), "failures": self.failures}  # fmt: skip

    def merge(self, d: dict[str, Any]) -> None:
        """Add a ledger of another process (`as_dict`): a pytest-xdist worker's, at its end."""
        self.trials.update(d["trials"])
        self.points.update(d["killPoints"])
        self.missed.update(d["missed"])
        self.corruptions.update(d["corruptions"])
        self.failures += [f for f in d["failures"] if f not in self.failures]
        self.runs += d["workerRuns"]


LEDGER = Ledger()  # this process's


def write_summary(tr: Any, ledger: Ledger) -> None:
    """The "chaos summary" section of pytest's terminal report (nothing when no chaos test ran)."""
    if not ledger.trials and not ledger.failures:
        return
    tr.section("chaos summary")
    d = ledger.as_dict()
    tr.write_line(
        f"master seed {MASTER_SEED} (CHAOS_SEED), {TRIALS} trials per randomized test (CHAOS_TRIALS)"
    )
    tr.write_line(
        f"trials run: {sum(ledger.trials.values())}  "
        + ", ".join(f"{k}={v}" for k, v in sorted(ledger.trials.items()))
    )
    tr.write_line(f"worker processes started: {ledger.runs}")
    tr.write_line(
        f"kill/fault points covered ({len(ledger.points)} kinds, {sum(ledger.points.values())} hits):"
    )
    for name, n in sorted(ledger.points.items()):
        tr.write_line(f"  {name:<44} {n}")
    if ledger.missed:
        tr.write_line(
            "aimed at but not reached (the run finished first): "
            + ", ".join(f"{k}={v}" for k, v in sorted(ledger.missed.items()))
        )
    if ledger.corruptions:
        tr.write_line(
            "checkpoints corrupted on purpose: "
            + ", ".join(f"{k}={v}" for k, v in sorted(ledger.corruptions.items()))
        )
    tr.write_line(
        f"failures found: {len(ledger.failures)}"
        + (": " + ", ".join(ledger.failures) if ledger.failures else "")
    )
    report = os.environ.get("CHAOS_REPORT")
    if report:
        Path(report).write_text(json.dumps(d, indent=2))
