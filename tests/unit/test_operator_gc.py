"""`finetune-operator run` tunes CPython's collector before kopf starts (cli.tune_gc): what it has
imported is frozen out of every collection, and young collections wait for YOUNG_GC_THRESHOLD
allocations (bench_apiserver.py (b) measures the effect; this checks that the process does it)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json, kopf
from finetune_operator import cli
seen = {}
def run(**kwargs):  # kopf.run, as `finetune-operator run` calls it: what the collector looks like then
    seen.update(frozen=gc.get_freeze_count(), threshold=gc.get_threshold()[0])
kopf.run = run
before = gc.get_freeze_count()
cli.run_operator([], liveness_port=0, metrics_port=0, verbose=False)
print(json.dumps({"before": before, **seen, "goal": cli.YOUNG_GC_THRESHOLD}))
"""


def test_the_operator_process_freezes_its_imports_and_collects_young_objects_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == 0
    assert seen["frozen"] > 50_000  # kopf, kubernetes_asyncio and the operator's modules, frozen
    assert seen["threshold"] == seen["goal"] == 20_000
