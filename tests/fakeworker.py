"""The fake worker on a PATH: a bin directory whose `finetune-worker` runs tests/operator/fake_worker.py
with this interpreter. The local runner's tests, the test kubelets of tiers 3 and 3b, the chaos tier
and bench_apiserver.py run their pods with it."""

from __future__ import annotations

import sys
from pathlib import Path

FAKE_WORKER = Path(__file__).resolve().parent / "operator" / "fake_worker.py"


def fake_worker_bin(bin_dir: Path) -> Path:
    """Write `bin_dir/finetune-worker` (creating `bin_dir`); returns `bin_dir`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "finetune-worker"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_WORKER}" "$@"\n')
    shim.chmod(0o755)
    return bin_dir
