"""Shared fixtures. No test may reach a hub: offline mode is forced for the whole session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Several test processes share the cores: each worker subprocess they start (and torch in the
    # test process itself) gets its share of OpenMP threads, not one per core each. Oversubscribed,
    # two trainings of the tiny models spin-wait on each other's cores (a test's own env wins).
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

REPO = Path(__file__).resolve().parent.parent


def _has_worker_deps() -> bool:
    try:
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def _tiny_model_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _has_worker_deps():
        pytest.skip("needs the [worker] extra (torch, sentence-transformers): pip install -e '.[worker]'")
    from tinymodel import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-master") / "tiny-bert")


@pytest.fixture
def tiny_model(_tiny_model_master: Path, tmp_path: Path) -> Path:
    """A private copy of a 2-layer BERT sentence-transformers model built offline (one build per session)."""
    dst = tmp_path / "tiny-bert"
    shutil.copytree(_tiny_model_master, dst)
    return dst


# -- the order of a run in several processes ------------------------------------------------------
# pytest-xdist hands out tests in collection order, a few at a time, and the run lasts until the
# busiest process is done. In path order the heaviest tiers (chaos first, worker last) leave one
# process alone with the last long tests while the other has nothing: heaviest first, and the
# ~900 short tests fill the gaps at the end. A stable sort, so a module's tests stay together.
HEAVY_FIRST = ("slow", "chaos", "worker", "operator")


@pytest.hookimpl(trylast=True)  # after tests/chaos/conftest.py has marked its tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order does not change how long it takes

    def weight(item: pytest.Item) -> int:
        return next((i for i, m in enumerate(HEAVY_FIRST) if item.get_closest_marker(m)), len(HEAVY_FIRST))

    items.sort(key=weight)


# -- the chaos summary ----------------------------------------------------------------------------
# Printed from here, the one conftest every process loads: in one process the chaos tests fill
# chaosledger.LEDGER themselves; under pytest-xdist the controller (which does not collect, so
# may not load tests/chaos/conftest.py) merges the ledgers its workers hand over (workeroutput).


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    raw = getattr(node, "workeroutput", {}).get("chaos_ledger")
    if raw:
        from chaosledger import LEDGER

        LEDGER.merge(json.loads(raw))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from chaosledger import LEDGER, write_summary

    write_summary(terminalreporter, LEDGER)
