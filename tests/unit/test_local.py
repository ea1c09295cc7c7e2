"""`finetune-operator local`: the same reconcile driving local processes (with the contract-keeping
fake worker from tests/operator; tests/worker/test_local_runner.py runs the real one)."""

from __future__ import annotations

import io
import json
import signal
import threading
from pathlib import Path

import pytest
import yaml

from fakeworker import fake_worker_bin
from finetune_operator.decisions.reconcile import Settings
from finetune_operator.local.executor import wait_until
from finetune_operator.local.jobfiles import load_job
from finetune_operator.local.runner import LocalRunner, main

FAST = Settings(worker_image="local", grace_seconds=10, backoff_base=0.1, backoff_max=0.2,
                progress_interval=0.1, pending_interval=0.1)  # fmt: skip
JOB = {
    "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo"},
    "spec": {"dataset": {"inline": [{"question": "q", "answer": "a"}]}, "resources": {"gpus": 0, "memory": "1Gi"},
             "training": {"maxSteps": 12, "checkpoint": {"everySteps": 4}}, "backoffLimit": 1},
}  # fmt: skip


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    return fake_worker_bin(tmp_path / "bin")


def runner(tmp_path: Path, fake_bin: Path, cfg: dict | None = None) -> tuple[LocalRunner, io.StringIO]:
    f = tmp_path / "demo.yaml"
    f.write_text(yaml.safe_dump(JOB))
    out = io.StringIO()
    work = tmp_path / "work"
    if cfg is not None:
        (work / "pvcs" / "demo-workspace").mkdir(parents=True)
        (work / "pvcs" / "demo-workspace" / "fake-worker.json").write_text(json.dumps(cfg))
    return LocalRunner(load_job(f), work, out=out, settings=FAST, bin_dir=fake_bin), out


def test_runs_to_succeeded_printing_transitions_and_the_export_path(tmp_path: Path, fake_bin: Path) -> None:
    r, out = runner(tmp_path, fake_bin)
    assert r.run(timeout=60) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "CHECKPOINT", "RESTARTS", "AGE"]
    phases = [ln.split()[1] for ln in lines[1:] if ln.startswith("demo ") and not ln.split()[1].endswith(";")]
    assert phases[0] == "Pending" and "Exporting" in phases and phases[-1] == "Succeeded"
    assert "Training" in phases
    export = tmp_path / "work" / "pvcs" / "demo-workspace" / "export"
    assert f"exported model: {export}" in text and (export / "sentence-transformers").is_dir()
    st = json.loads((tmp_path / "work" / "status.json").read_text())
    assert st["phase"] == "Succeeded" and st["checkpoint"]["name"] == "checkpoint-12"


def test_killed_worker_is_relaunched_and_resumes(tmp_path: Path, fake_bin: Path) -> None:
    r, out = runner(tmp_path, fake_bin, {"steps": 40, "stepSeconds": 0.05})
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(r.run(timeout=60)))
    t.start()
    assert wait_until(lambda: (r.job["status"].get("checkpoint") or {}).get("step", 0) >= 8, 30)
    r.executor.signal("demo-train-1", signal.SIGKILL)
    t.join(60)
    assert result == [0]
    attempts = r.job["status"]["attempts"]
    assert attempts[0]["result"] == "failed" and attempts[1]["resumedFrom"].startswith("checkpoint-")
    assert r.job["status"]["restarts"] == 1
    text = out.getvalue()
    assert "Warning AttemptFailed: demo-train-1 failed (exit 137)" in text and "Normal Resumed:" in text


def test_failure_exits_1_with_the_reason(tmp_path: Path, fake_bin: Path) -> None:
    r, out = runner(tmp_path, fake_bin, {"train": "fail"})
    assert r.run(timeout=60) == 1
    assert "BackoffLimitExceeded" in out.getvalue() and "injected failure" in out.getvalue()


def test_invalid_file_is_refused_with_the_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({**JOB, "spec": {**JOB["spec"], "backoffLimit": -1}}))
    out = io.StringIO()
    assert main(str(f), str(tmp_path / "w"), timeout=30, out=out) == 1
    assert "spec.backoffLimit" in out.getvalue()
    f.write_text("- just a list")
    assert main(str(f), str(tmp_path / "w"), out=out) == 2


def test_data_next_to_the_yaml_is_staged_into_the_workspace(tmp_path: Path, fake_bin: Path) -> None:
    from finetune_operator.local.jobfiles import stage_inputs

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    job = {"spec": {"dataset": {"path": "data/train.jsonl"}, "model": {"base": "builtin:all-MiniLM-L6-v2"}}}
    ws = tmp_path / "ws"
    assert stage_inputs(job, [tmp_path], ws) == ["data/train.jsonl"]
    assert (ws / "data" / "train.jsonl").read_text().startswith('{"question"')
    assert stage_inputs(job, [tmp_path], ws) == []  # the workspace copy wins on a rerun


def test_ctrl_c_stops_gracefully_and_a_rerun_resumes(tmp_path: Path, fake_bin: Path) -> None:
    import _thread

    r, out = runner(tmp_path, fake_bin, {"steps": 60, "stepSeconds": 0.05})
    ckpts = tmp_path / "work" / "pvcs" / "demo-workspace" / "checkpoints"

    def interrupt() -> None:
        if wait_until(lambda: ckpts.is_dir() and any(ckpts.iterdir()), 30):
            _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    assert r.run(timeout=60) == 130
    assert "rerun to resume" in out.getvalue()
    summary = json.loads((tmp_path / "work" / "pods" / "demo-train-1" / "termination-log").read_text())
    assert summary["result"] == "preempted"  # SIGTERM reached the worker, which checkpointed
    again, _ = runner(tmp_path, fake_bin)
    assert again.run(timeout=60) == 0
    assert again.job["status"]["attempts"][0]["resumedFrom"] == summary["checkpoint"]


# -- several jobs in one local world: spec.model.fromJob ------------------------------------------

PREV = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "prev"},
        "spec": {**JOB["spec"], "training": {"maxSteps": 8, "checkpoint": {"everySteps": 4}}}}  # fmt: skip
NEXT = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "next"},
        "spec": {**JOB["spec"], "model": {"fromJob": "prev"}, "lora": {"r": 4}}}  # fmt: skip


def test_a_from_job_continuation_waits_for_its_source_and_reads_its_export(tmp_path: Path, fake_bin: Path) -> None:
    shown = tmp_path / "bin2"  # the fake worker, after listing what FINETUNE_SOURCE_EXPORT shows
    shown.mkdir()
    (shown / "finetune-worker").write_text(
        '#!/bin/sh\n[ -n "$FINETUNE_SOURCE_EXPORT" ] && echo "src=$FINETUNE_SOURCE_EXPORT" && ls "$FINETUNE_SOURCE_EXPORT"\n'
        f'exec "{fake_bin / "finetune-worker"}" "$@"\n'
    )
    (shown / "finetune-worker").chmod(0o755)
    f = tmp_path / "both.yaml"  # the continuation first: order does not matter
    f.write_text(yaml.safe_dump_all([NEXT, PREV]))
    from finetune_operator.local.jobfiles import load_jobs

    out = io.StringIO()
    r = LocalRunner(load_jobs(f), tmp_path / "work", out=out, settings=FAST, bin_dir=shown)
    assert r.run(timeout=60) == 0, out.getvalue()
    text = out.getvalue()
    assert "  next: Normal WaitingForSourceJob: waiting for FineTuneJob prev (spec.model.fromJob)" in text
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(("prev ", "next ")) and "succeeded;" not in ln]
    last = {row[0]: row[1] for row in rows}
    assert last == {"prev": "Succeeded", "next": "Succeeded"}
    first_next_training = next(i for i, row in enumerate(rows) if row[0] == "next" and row[1] == "Training")
    assert [row[1] for row in rows[:first_next_training] if row[0] == "prev"][-1] == "Succeeded"
    log = r.executor.logs("next-train-1")
    src = log.split("src=", 1)[1].splitlines()[0]
    assert Path(src) == tmp_path / "work" / "pvcs" / "prev-workspace" / "export"  # the mount, mapped here
    assert "metadata.json" in log and "sentence-transformers" in log
    assert "metadata.json" in r.executor.logs("next-export-1")  # a LoRA export merges onto the source
    for name in ("prev", "next"):
        assert json.loads((tmp_path / "work" / "status" / f"{name}.json").read_text())["phase"] == "Succeeded"
    assert f"next succeeded; exported model: {tmp_path / 'work' / 'pvcs' / 'next-workspace' / 'export'}" in text


def test_a_failed_source_fails_its_continuation(tmp_path: Path, fake_bin: Path) -> None:
    (tmp_path / "work" / "pvcs" / "prev-workspace").mkdir(parents=True)
    (tmp_path / "work" / "pvcs" / "prev-workspace" / "fake-worker.json").write_text('{"train": "invalid"}')
    jobs = [load_job_from(tmp_path, PREV), load_job_from(tmp_path, NEXT)]
    out = io.StringIO()
    assert LocalRunner(jobs, tmp_path / "work", out=out, settings=FAST, bin_dir=fake_bin).run(timeout=60) == 1
    text = out.getvalue()
    assert "prev failed (InvalidConfigOrData)" in text and "next failed (SourceJobFailed): source job prev" in text


def load_job_from(tmp_path: Path, doc: dict) -> dict:
    f = tmp_path / f"{doc['metadata']['name']}.yaml"
    f.write_text(yaml.safe_dump(doc))
    return load_job(f)


@pytest.mark.parametrize(("docs", "said"), [
    ([NEXT], "next: spec.model.fromJob names FineTuneJob prev, which is not among the files given"),
    ([{**NEXT, "spec": {**NEXT["spec"], "model": {"fromJob": "other"}}},
      {**NEXT, "metadata": {"name": "other"}, "spec": {**NEXT["spec"], "model": {"fromJob": "next"}}}],
     "spec.model.fromJob cycle: next -> other -> next"),
    ([PREV, PREV], "two jobs are named prev"),
    ([PREV, {**NEXT, "metadata": {}}], "document 2: each of several jobs in one file needs metadata.name"),
])  # fmt: skip
def test_jobs_that_cannot_run_together_are_refused_before_anything_starts(
    tmp_path: Path, docs: list[dict], said: str
) -> None:
    f = tmp_path / "jobs.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    out, err = io.StringIO(), io.StringIO()
    assert main([str(f)], str(tmp_path / "w"), timeout=5, out=out, err=err) == 2
    assert said in err.getvalue() and out.getvalue() == "" and not (tmp_path / "w" / "pods").exists()


def test_a_read_only_sub_path_mount_of_another_claim_is_reachable_through_its_env_var(tmp_path: Path) -> None:
    from finetune_operator.local.executor import LocalPodExecutor

    with LocalPodExecutor(tmp_path) as ex:
        (ex.pvc_dir("prev-workspace") / "export").mkdir()
        (ex.pvc_dir("prev-workspace") / "export" / "model.txt").write_text("weights")
        ex.start({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "command": ["sh", "-c", "cat $(SRC)/model.txt"],
                            "env": [{"name": "SRC", "value": "/finetune/jobs/prev/export"}],
                            "volumeMounts": [{"name": "src", "mountPath": "/finetune/jobs/prev/export",
                                              "subPath": "export", "readOnly": True}]}],
            "volumes": [{"name": "src", "persistentVolumeClaim": {"claimName": "prev-workspace", "readOnly": True}}],
        }})  # fmt: skip
        assert ex.wait("p", 10)
        assert ex.status("p")["phase"] == "Succeeded" and ex.logs("p") == "weights"


def test_a_relative_workdir_holds_the_workspace(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` passes `--workdir runs/demo`: the workers run in their pod directories, so a
    relative workspace path once landed under runs/demo/pods/<pod>/runs/demo/ and export found nothing."""
    f = tmp_path / "demo.yaml"
    f.write_text(yaml.safe_dump(JOB))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert LocalRunner(load_job(f), Path("rel/work"), out=out, settings=FAST, bin_dir=fake_bin).run(timeout=60) == 0, out.getvalue()
    assert (tmp_path / "rel/work/pvcs/demo-workspace/export/sentence-transformers").is_dir()
    assert not list((tmp_path / "rel/work/pods").glob("*/rel"))
