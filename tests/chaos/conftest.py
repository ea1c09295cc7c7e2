"""The chaos suite: seeded trials, a ledger of what was tried, and the summary printed at the end.

Every test here is marked `chaos`. Trials draw from one master seed (env CHAOS_SEED, printed in
the summary) mixed with the test's id and trial number, so any failing trial reruns exactly with
`CHAOS_SEED=<seed> pytest tests/chaos -k '<test id>'`. CHAOS_TRIALS sets the number of trials per
randomized test. CHAOS_REPORT names a JSON file that receives the ledger.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from chaosledger import LEDGER, MASTER_SEED, TRIALS, Ledger  # noqa: F401 (tests import them from here)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)
        if "baselines" in getattr(
            item, "fixturenames", ()
        ):  # one process computes them (pytest-xdist --dist loadgroup)
            item.add_marker(pytest.mark.xdist_group("chaos-baselines"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if (
        report.failed
        and "tests/chaos/" in report.nodeid.replace("\\", "/")
        and report.nodeid not in LEDGER.failures
    ):
        LEDGER.failures.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist the trials run in worker processes: each hands its ledger to the
    controller, where tests/conftest.py merges them and prints the summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["chaos_ledger"] = json.dumps(LEDGER.as_dict())


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
def export_baseline(
    baselines: dict[bool, Baseline], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted export of the LoRA training result: (workspace, merged weights)."""
    from workerkit import Worker, export_fault, export_weights

    ws = tmp_path_factory.mktemp("export-baseline") / "ws"
    shutil.copytree(baselines[True].ws, ws)
    w = Worker("export", baselines[True].spec, ws)
    LEDGER.runs += 1
    assert w.wait() == 0, w.stderr()
    assert export_fault(ws) is None
    return ws, export_weights(ws)
