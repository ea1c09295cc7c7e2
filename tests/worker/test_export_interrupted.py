"""The export worker stopped part-way: SIGTERM (exit 75, the published export untouched)."""

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


def _run(spec_dict: dict[str, Any], ws: Path) -> int:
    from finetune_operator.spec import parse_spec
    from finetune_worker.export import run_export

    return run_export(parse_spec(spec_dict), ws)


class ExportProcess:
    """`finetune-worker export` as a real process, paused by the worker's test hook after `pause`."""

    def __init__(self, tmp: Path, spec_dict: dict[str, Any], ws: Path, pause: str):
        cfg = tmp / "job.json"
        cfg.write_text(json.dumps({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                   "metadata": {"name": "faq"}, "spec": spec_dict}))  # fmt: skip
        self.termlog = tmp / "termination-log"
        self.termlog.unlink(missing_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_TERMINATION_LOG": str(self.termlog),
               "FINETUNE_EXPORT_PAUSE_AFTER": pause}  # fmt: skip
        cmd = [sys.executable, "-m", "finetune_worker.cli", "export", "--config", str(cfg), "--workspace", str(ws)]
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

