"""Progress people can watch: the worker's etaSeconds reaches status.progress (integer, as the CRD says)
and the ETA printer column; the local runner draws a live bar on a terminal and plain periodic lines
elsewhere."""

from __future__ import annotations

import io

from crdkit import version
from test_reconcile import job, pod, started, step

from finetune_operator.decisions.observe import parse_log_tail
from finetune_operator.local.progress import CLEAR, LiveScreen, progress_text

TRAINING = {"phase": "Training", "progress": {"step": 12, "totalSteps": 20, "loss": 0.43217, "samplesPerSecond": 23.46,
                                              "etaSeconds": 72}}  # fmt: skip


def test_worker_eta_reaches_status_progress_as_an_integer() -> None:
    line = '{"event": "progress", "step": 30, "totalSteps": 120, "loss": 0.8, "samplesPerSecond": 40.0, "etaSeconds": 41.6}'
    prog, _ = parse_log_tail(line)
    assert prog is not None and prog["etaSeconds"] == 41.6
    j, _ = step(started(job()), [pod("faq-train-1", progress=prog)])
    assert j["status"]["progress"]["etaSeconds"] == 42


def test_a_nonsense_eta_is_dropped_not_written() -> None:
    j, _ = step(started(job()), [pod("faq-train-1", progress={"step": 3, "totalSteps": 9, "etaSeconds": -5})])
    assert "etaSeconds" not in j["status"]["progress"]


def test_completed_training_has_no_time_left() -> None:
    j, _ = step(started(job()), [pod("faq-train-1", progress={"step": 3, "totalSteps": 9, "etaSeconds": 12})])
    done = pod("faq-train-1", "Succeeded", "completed", exit_code=0,
               summary={"result": "completed", "step": 9, "checkpoint": "final"})  # fmt: skip
    j, _ = step(j, [done])
    assert j["status"]["progress"]["etaSeconds"] == 0


def test_kubectl_get_has_an_eta_column() -> None:
    cols = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    assert cols["ETA"]["jsonPath"] == ".status.progress.etaSeconds" and cols["ETA"]["type"] == "integer"


def test_progress_text_shows_bar_step_loss_rate_and_eta() -> None:
    text = progress_text(TRAINING)
    assert text == "[############........] 12/20  loss 0.4322  23.5 samples/s  ETA 1:12"
    assert progress_text({"phase": "Training"}) == "training: loading the model and data"
    assert progress_text({"phase": "Exporting", "message": "export pod x-export-1 stage formatted"}) == \
        "exporting: export pod x-export-1 stage formatted"
    assert progress_text({"phase": "Succeeded"}) is None


def test_terminal_keeps_one_live_line_under_the_table() -> None:
    out = io.StringIO()
    screen = LiveScreen(out, tty=True)
    screen.show({"job": "[#...] 1/20"})
    screen.write("job   Training   5%\n")
    screen.show({"job": "[##..] 2/20"})
    screen.end()
    assert out.getvalue() == (f"{CLEAR}job  [#...] 1/20" + f"{CLEAR}job   Training   5%\n" + "job  [#...] 1/20"
                              + f"{CLEAR}job  [##..] 2/20" + CLEAR)  # fmt: skip


def test_not_a_terminal_prints_plain_lines_at_most_every_interval() -> None:
    out, now = io.StringIO(), [0.0]
    screen = LiveScreen(out, tty=False, interval=10, clock=lambda: now[0])
    for t, text in ((0, "1/20"), (4, "2/20"), (11, "5/20"), (12, "5/20"), (25, "5/20"), (26, "9/20")):
        now[0] = t
        screen.show({"job": text})
    assert out.getvalue() == "  job: 1/20\n  job: 5/20\n  job: 9/20\n"
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()


def test_rerun_reloads_a_status_carries_on_and_starts_afresh_after_a_failure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from finetune_operator.local.story import newest_checkpoint, reload_status

    f = tmp_path / "status.json"
    assert reload_status(f) == (None, None)
    f.write_text(json.dumps({"phase": "Pending", "restarts": 1, "attempts": [{"pod": "a-train-1", "result": "preempted"}]}))
    st, line = reload_status(f)
    assert st is not None and st["restarts"] == 1 and line == "carrying on from status.json: 1 earlier attempt, restarts 1"
    f.write_text(json.dumps({"phase": "Failed", "reason": "InvalidConfigOrData", "attempts": []}))
    st, line = reload_status(f)
    assert st is None and "previous run failed (InvalidConfigOrData); starting again" in (line or "")
    assert not f.exists() and (tmp_path / "status.previous.json").is_file()
    f.write_text("{not json")
    assert reload_status(f)[0] is None and "ignoring" in (reload_status(f)[1] or "")
    for n in (3, 12, 9):
        (tmp_path / "ws" / "checkpoints" / f"checkpoint-{n}").mkdir(parents=True)
        (tmp_path / "ws" / "checkpoints" / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "ws" / "checkpoints" / "checkpoint-40").mkdir()  # no trainer state: not a checkpoint
    assert newest_checkpoint(tmp_path / "ws") == {"name": "checkpoint-12", "step": 12}
