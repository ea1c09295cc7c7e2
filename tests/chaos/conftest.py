"""The chaos suite: seeded trials, a ledger of what was tried, and the summary printed at the end.

Every test here is marked `chaos`. Trials draw from one master seed (env CHAOS_SEED, printed in
the summary) mixed with the test's id and trial number, so any failing trial reruns exactly with
`CHAOS_SEED=<seed> pytest tests/chaos -k '<test id>'`. CHAOS_TRIALS sets the number of trials per
randomized test. CHAOS_REPORT names a JSON file that receives the ledger.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

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


LEDGER = Ledger()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed and "tests/chaos/" in report.nodeid.replace("\\", "/"):
        LEDGER.failures.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not LEDGER.trials and not LEDGER.failures:
        return
    tr = terminalreporter
    tr.section("chaos summary")
    d = LEDGER.as_dict()
    tr.write_line(f"master seed {MASTER_SEED} (CHAOS_SEED), {TRIALS} trials per randomized test (CHAOS_TRIALS)")
    tr.write_line(f"trials run: {sum(LEDGER.trials.values())}  " + ", ".join(f"{k}={v}" for k, v in sorted(LEDGER.trials.items())))
    tr.write_line(f"worker processes started: {LEDGER.runs}")
    tr.write_line(f"kill/fault points covered ({len(LEDGER.points)} kinds, {sum(LEDGER.points.values())} hits):")
    for name, n in sorted(LEDGER.points.items()):
        tr.write_line(f"  {name:<44} {n}")
    if LEDGER.missed:
        tr.write_line("aimed at but not reached (the run finished first): "
                      + ", ".join(f"{k}={v}" for k, v in sorted(LEDGER.missed.items())))
    if LEDGER.corruptions:
        tr.write_line("checkpoints corrupted on purpose: " + ", ".join(f"{k}={v}" for k, v in sorted(LEDGER.corruptions.items())))
    tr.write_line(f"failures found: {len(LEDGER.failures)}" + (": " + ", ".join(LEDGER.failures) if LEDGER.failures else ""))
    report = os.environ.get("CHAOS_REPORT")
    if report:
        Path(report).write_text(json.dumps(d, indent=2))


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def trial_rng(nodeid: str, trial: int) -> random.Random:
    return random.Random(f"{MASTER_SEED}:{nodeid.split('[')[0]}:{trial}")


@pytest.fixture(scope="session")
def chaos_model(_tiny_model_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private, read-only-by-convention copy of the tiny sentence-transformers model."""
    dst = tmp_path_factory.mktemp("chaos-model") / "tiny-bert"
    shutil.copytree(_tiny_model_master, dst)
    return dst


class Baseline:
    """An uninterrupted training run: its spec, its workspace (a template to copy) and its weights."""

    def __init__(self, spec: dict[str, Any], ws: Path, lora: bool, charged: int, saves: int) -> None:
        self.spec, self.ws, self.lora = spec, ws, lora
        self.bytes_per_checkpoint = charged // max(1, saves)

    def weights(self) -> dict[str, Any]:
        from workerkit import final_weights

        return final_weights(self.ws, self.lora)


@pytest.fixture(scope="session")
def baselines(chaos_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Baseline]:
    """Uninterrupted full and LoRA training runs (keyed by lora), measured through the ENOSPC shim in
    count-only mode so the disk-full tests can size a budget in checkpoints."""
    from workerkit import FAULTINJECT, Worker, checkpoints, train_spec

    out = {}
    for lora in (False, True):
        root = tmp_path_factory.mktemp(f"baseline-{'lora' if lora else 'full'}")
        spec = train_spec(chaos_model, lora=lora)
        report = root / "charged.json"
        w = Worker("train", spec, root / "ws", env={"PYTHONPATH": str(FAULTINJECT), "FAULT_ENOSPC_PATHS": "/checkpoints/",
                                                     "FAULT_ENOSPC_REPORT": str(report)})  # fmt: skip
        LEDGER.runs += 1
        code = w.wait()
        assert code == 0, w.stderr()
        saves = len(w.event("checkpoint"))
        assert saves == 8 and len(checkpoints(root / "ws")) == 2, (saves, checkpoints(root / "ws"))
        out[lora] = Baseline(spec, root / "ws", lora, json.loads(report.read_text())["charged"], saves)
    return out


@pytest.fixture(scope="session")
def export_baseline(baselines: dict[bool, Baseline], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted export of the LoRA training result: (workspace, merged weights)."""
    from workerkit import Worker, export_fault, export_weights

    ws = tmp_path_factory.mktemp("export-baseline") / "ws"
    shutil.copytree(baselines[True].ws, ws)
    w = Worker("export", baselines[True].spec, ws)
    LEDGER.runs += 1
    assert w.wait() == 0, w.stderr()
    assert export_fault(ws) is None
    return ws, export_weights(ws)
