"""The project's own rules, checked with the suite: the control plane stays free of torch and the
worker (import-linter), the control plane type-checks strictly (mypy), and ruff is clean.

These run the same tools as `make lint`, so a layering break fails CI, not only a local lint run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed; `make dev` installs it with the [dev] extra")
        return found
    return str(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["lint-imports"],
        ["mypy", "operator/finetune_api", "operator/finetune_operator"],
        ["ruff", "check", "operator", "tests", "bench"],
    ],
    ids=["import-layers", "mypy-strict-control-plane", "ruff"],
)
def test_lint(argv: list[str]) -> None:
    proc = subprocess.run([_tool(argv[0]), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
