"""The export worker stopped part-way: SIGTERM (exit 75, the published export untouched) and a kill
between the two renames of a publish that cannot swap directories in one step (nothing lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from exportkit import lora_workspace, spec

pytestmark = pytest.mark.worker
REPO = Path(__file__).resolve().parents[2]
ST_ONLY = {"formats": ["sentence-transformers"]}
# The real CLI, with the one-step directory swap switched off: the two-rename fallback that NFS gets.
FALLBACK_CLI = (
    "import sys\n"
    "try:\n"
    "    import finetune_worker.atomic as a; a._renameat2 = None\n"
    "except ImportError:\n"
    "    pass\n"
    "from finetune_worker.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _run(spec_dict: dict[str, Any], ws: Path) -> int:
    from finetune_api.spec import parse_spec
    from finetune_worker.export import run_export

    return run_export(parse_spec(spec_dict), ws)


class ExportProcess:
    """`finetune-worker export` as a real process, paused by the worker's test hook after `pause`."""

    def __init__(self, tmp: Path, spec_dict: dict[str, Any], ws: Path, pause: str, *, fallback: bool = False):
        cfg = tmp / "job.json"
        cfg.write_text(json.dumps({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                   "metadata": {"name": "faq"}, "spec": spec_dict}))  # fmt: skip
        self.termlog = tmp / "termination-log"
        self.termlog.unlink(missing_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_TERMINATION_LOG": str(self.termlog),
               "FINETUNE_EXPORT_PAUSE_AFTER": pause}  # fmt: skip
        entry = ["-c", FALLBACK_CLI] if fallback else ["-m", "finetune_worker.cli"]
        cmd = [sys.executable, *entry, "export", "--config", str(cfg), "--workspace", str(ws)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env, cwd=REPO)  # fmt: skip
        self.lines: list[str] = []

    def wait_paused(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            if '"stage":"paused"' in line:
                return
            assert time.monotonic() < deadline, "export never reached the pause point"
        raise AssertionError(f"export ended (exit {self.proc.wait()}) before the pause point: {self.lines[-3:]}")

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=60)
        self.lines += out.splitlines()
        return self.proc.returncode

    def summary(self) -> dict[str, Any]:
        return json.loads(self.termlog.read_text())


def _staging(ws: Path) -> list[str]:
    return sorted(p.name for p in ws.iterdir() if p.name.startswith(".staging-"))


def _complete(ws: Path) -> bool:
    from finetune_worker.export.publish import export_problem

    return export_problem(ws / "export") is None


def test_sigterm_mid_export_exits_75_and_keeps_the_published_export(tiny_model: Path, tmp_path: Path) -> None:
    ws = lora_workspace(tmp_path / "ws", tiny_model)
    assert _run(spec(tiny_model, export=ST_ONLY), ws) == 0
    published = (ws / "export" / "metadata.json").read_bytes()

    newer = spec(tiny_model, export={**ST_ONLY, "normalize": False})  # other settings: a new export is due
    w = ExportProcess(tmp_path, newer, ws, pause="merged")
    w.wait_paused()
    assert _staging(ws)  # the new export is half built
    code = w.stop(signal.SIGTERM)
    assert code == 75, f"SIGTERM mid-export: exit {code} (75 = preempted, retried without using backoff)"
    summary = w.summary()
    assert summary["result"] == "preempted"
    assert "'merged'" in summary["message"] and "untouched" in summary["message"]
    assert any('"stage":"preempted"' in line for line in w.lines)
    assert (ws / "export" / "metadata.json").read_bytes() == published and _complete(ws)
    assert _staging(ws) == []


def test_publish_killed_between_renames_loses_no_export(tiny_model: Path, tmp_path: Path) -> None:
    """Without a one-step swap the older export is parked aside for an instant; a kill right then
    must not cost it: the next run (any run) first puts it back, and only a complete export is used."""
    from finetune_worker.export.publish import clean_stale

    ws = lora_workspace(tmp_path / "ws", tiny_model)
    assert _run(spec(tiny_model, export=ST_ONLY), ws) == 0
    published = (ws / "export" / "metadata.json").read_bytes()

    newer = spec(tiny_model, export={**ST_ONLY, "normalize": False})
    w = ExportProcess(tmp_path, newer, ws, pause="aside", fallback=True)
    w.wait_paused()  # the older export is parked, the new one not yet renamed in
    assert w.stop(signal.SIGKILL) == -9
    parked = [n for n in _staging(ws) if n.startswith(".staging-export-retired-")]
    assert not (ws / "export").exists() and len(parked) == 1

    clean_stale(ws)  # what every export run does first
    assert (ws / "export" / "metadata.json").read_bytes() == published and _complete(ws)
    assert _staging(ws) == []  # the new export's staging went; the older one is published again

    assert _run(newer, ws) == 0
    assert json.loads((ws / "export" / "metadata.json").read_text())["normalize"] is False and _complete(ws)
    assert _staging(ws) == []


def test_replacing_an_export_never_shows_a_gap(tmp_path: Path) -> None:
    """Where the kernel can swap two directories in one step, a reader polling `export/` while it is
    replaced again and again always finds one complete export."""
    import threading

    from finetune_worker import atomic
    from finetune_worker.export.publish import export_problem, new_staging, publish

    probe = tmp_path / "probe"
    (probe / "a").mkdir(parents=True)
    (probe / "b").mkdir()
    if not atomic.exchange(probe / "a", probe / "b"):
        pytest.skip("this kernel or filesystem cannot swap directories (the fallback is tested above)")

    ws = tmp_path / "ws"

    def build(n: int) -> Path:
        s = new_staging(ws)
        (s / "weights.bin").write_bytes(n.to_bytes(4, "little"))
        meta = {"n": n, "files": {"weights.bin": 4}}
        (s / "metadata.json").write_text(json.dumps(meta))
        return s

    publish(build(0), ws)
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            why = export_problem(ws / "export")
            if why is not None:
                seen.append(why)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 150):
            publish(build(n), ws)
    finally:
        done.set()
        reader.join()
    assert seen == []
    assert json.loads((ws / "export" / "metadata.json").read_text())["n"] == 149
    assert _staging(ws) == []
