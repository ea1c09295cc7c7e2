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
