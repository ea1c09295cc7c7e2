"""The worker image as the operator's pods run it (builders.build_pod): uid 1000, a read-only root,
no capabilities, no privilege escalation, the job's volume at /workspace, the termination message
file the kubelet reads. The LoRA sample on the bundled MiniLM trains; `docker stop` (SIGTERM, as a
kubelet sends it) checkpoints and exits 75 with the summary in /dev/termination-log; a new
container resumes from that checkpoint and finishes; an export container publishes a verified
export, which loads on the host."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerkit import LOCKED_DOWN, Container, container, inspect, run, wait_for

from finetune_api import contract
from finetune_operator.decisions.builders import WORKER_UID

pytestmark = pytest.mark.images
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "finetune_v1alpha1_finetunejob_lora.yaml"
MAX_STEPS, EVERY = 12, 3  # the sample's 20 steps, checkpoint every 5, cut short: about a minute on 2 cores


def test_it_runs_as_the_pods_uid_and_carries_no_control_plane(worker_image: str) -> None:
    assert inspect(worker_image, "{{.Config.User}}") == f"{WORKER_UID}:{WORKER_UID}"
    probe = ("import importlib.util as u; print(sorted(m for m in ('kopf', 'kubernetes_asyncio', 'kubernetes', "
             "'prometheus_client', 'torch', 'sentence_transformers', 'peft') if u.find_spec(m)))")  # fmt: skip
    res = run(worker_image, "-c", probe, flags=["--entrypoint", "python"])
    assert res.stdout.strip() == "['peft', 'sentence_transformers', 'torch']", res
    # the console script is there (one distribution), and says which extra it lacks
    res = run(worker_image, "run", flags=[*LOCKED_DOWN, "--entrypoint", "finetune-operator"])
    assert res.returncode == 1, res
    assert "kopf is not installed: pip install 'finetune-operator[operator]'" in res.stderr, res.stderr[-2000:]


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    """The sample (fewer steps) as a config file, an empty workspace volume owned by the pods' uid,
    and a termination-log file: what a pod gets from its PVC, FINETUNE_CONFIG and the kubelet."""
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["spec"]["training"]["maxSteps"] = MAX_STEPS
    doc["spec"]["training"]["checkpoint"] = {"everySteps": EVERY, "keep": 2}
    paths = {"config": tmp_path / "job.yaml", "workspace": tmp_path / "workspace", "termination": tmp_path / "termination-log"}
    paths["config"].write_text(yaml.safe_dump(doc))
    paths["config"].chmod(0o644)
    paths["workspace"].mkdir()
    os.chown(paths["workspace"], WORKER_UID, WORKER_UID)
    return paths


def _worker(job: dict[str, Path], role: str) -> tuple[list[str], list[str]]:
    """`docker run` flags and arguments of a `role` pod (train/export) on the job's volume."""
    job["termination"].write_text("")
    job["termination"].chmod(0o666)
    flags = [*LOCKED_DOWN, "--user", f"{WORKER_UID}:{WORKER_UID}",
             "-v", f"{job['workspace']}:{contract.DEFAULT_WORKSPACE}",
             "-v", f"{job['config']}:{contract.CONFIG_MOUNT}:ro",
             "-v", f"{job['termination']}:{contract.TERMINATION_LOG}",
             "-e", f"HOME={contract.DEFAULT_WORKSPACE}/.home", "-e", "HF_HUB_OFFLINE=1"]  # fmt: skip
    return flags, [role, "--config", contract.CONFIG_MOUNT, "--workspace", contract.DEFAULT_WORKSPACE]


def _summary(job: dict[str, Path]) -> dict[str, Any]:
    text = job["termination"].read_text()
    assert text, "nothing in /dev/termination-log"
    assert len(text.encode()) <= contract.TERMINATION_SUMMARY_MAX_BYTES
    return dict(json.loads(text))


def _events(box: Container, name: str) -> list[dict[str, Any]]:
    return [d for d in box.lines() if d.get(contract.PROGRESS_KEY) == name]


@pytest.mark.timeout(900)
def test_the_lora_sample_trains_stops_on_sigterm_resumes_and_exports(worker_image: str, job: dict[str, Path]) -> None:
    # 1. train until the first checkpoint, then `docker stop`: SIGTERM -> a checkpoint -> exit 75
    flags, args = _worker(job, "train")
    with container(worker_image, *args, flags=flags, prefix="finetune-train-1") as train:
        wait_for(lambda: _events(train, "checkpoint"), 300, f"checkpoint-{EVERY}", train)
        sigterm = time.monotonic()
        code = train.stop(grace=120)  # past the grace docker sends SIGKILL: exit 137
        to_exit = time.monotonic() - sigterm
        assert code == contract.EXIT_PREEMPTED, f"exit code {code} after docker stop"
        assert _events(train, "preemption"), "no preemption line in the log"
    stopped = _summary(job)
    assert stopped["result"] == "preempted" and stopped["checkpoint"].startswith("checkpoint-"), stopped
    step = int(stopped["checkpoint"].removeprefix("checkpoint-"))
    assert EVERY <= step < MAX_STEPS and stopped["step"] == step, stopped
    assert (job["workspace"] / "checkpoints" / stopped["checkpoint"] / "trainer_state.json").is_file()

    # 2. a new container on the same volume resumes from that checkpoint and finishes
    flags, args = _worker(job, "train")
    with container(worker_image, *args, flags=flags, prefix="finetune-train-2") as resumed:
        code = resumed.wait(timeout=600)
        assert code == contract.EXIT_COMPLETED, f"exit code {code}"
        assert [(e["checkpoint"], e["step"]) for e in _events(resumed, "resume")] == [(stopped["checkpoint"], step)]
    done = _summary(job)
    assert done["result"] == "completed" and done["step"] == MAX_STEPS and done["resumedFrom"] == stopped["checkpoint"], done
    assert (job["workspace"] / "final").is_dir()

    # 3. the export pod: merge, verify, publish
    flags, args = _worker(job, "export")
    with container(worker_image, *args, flags=flags, prefix="finetune-export-1") as export:
        code = export.wait(timeout=600)
        assert code == contract.EXIT_COMPLETED, f"exit code {code}"
    exported = _summary(job)
    assert exported["result"] == "completed", exported
    meta = json.loads((job["workspace"] / "export" / "metadata.json").read_text())
    tolerance = yaml.safe_load(SAMPLE.read_text())["spec"].get("export", {}).get("verify", {}).get("tolerance", 1e-5)
    assert meta["maxDeviation"] is not None and meta["maxDeviation"] <= tolerance, meta

    # 4. what the user deploys: the export loads with sentence-transformers outside any container
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(job["workspace"] / "export" / "sentence-transformers"), device="cpu")
    vectors = model.encode(["How do I reset my password?", "Do you ship internationally?"])
    assert vectors.shape == (2, 384)
    assert abs(float((vectors[0] ** 2).sum()) - 1.0) < 1e-4  # export.normalize: true
    print(f"container run: SIGTERM to exit {to_exit:.1f}s, stopped at {stopped['checkpoint']}, resumed to step "
          f"{done['step']}, export max deviation {meta['maxDeviation']:.2g}")
