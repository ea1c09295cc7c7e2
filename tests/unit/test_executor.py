"""LocalPodExecutor runs real subprocesses: exit codes, termination log, signals, logs, volumes."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.local.executor import LocalPodExecutor, wait_until
from finetune_operator.local.executor.podspec import parse_memory_quantity

PY = Path(sys.executable).name  # resolved in bin_dir (the venv's bin), like finetune-worker


def pod(name: str, script: str, *, env: dict[str, str] | None = None, args: list[str] | None = None,
        volumes: list[dict[str, Any]] | None = None, mounts: list[dict[str, Any]] | None = None,
        **container: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "worker",
                "command": [PY, "-c", textwrap.dedent(script)],
                "args": args or [],
                "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                "volumeMounts": mounts or [],
                **container,
            }],
            "volumes": volumes or [],
        },
    }  # fmt: skip


@pytest.fixture
def executor(tmp_path: Path):
    ex = LocalPodExecutor(tmp_path / "root")
    yield ex
    ex.close()


def finished(ex: LocalPodExecutor, name: str, timeout: float = 20) -> dict[str, Any]:
    assert ex.wait(name, timeout), f"pod {name} still running; log:\n{ex.logs(name)}"
    status = ex.status(name)
    assert status is not None
    return status


def terminated(status: dict[str, Any]) -> dict[str, Any]:
    return status["containerStatuses"][0]["state"]["terminated"]


def test_success_reports_completed_with_termination_message(executor: LocalPodExecutor) -> None:
    script = """
        import json, os
        print("hello from the pod")
        open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write(json.dumps({"result": "completed", "step": 7}))
    """
    executor.start(pod("ok", script))
    status = finished(executor, "ok")
    assert status["phase"] == "Succeeded"
    term = terminated(status)
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert json.loads(term["message"]) == {"result": "completed", "step": 7}
    assert term["startedAt"].endswith("Z") and term["finishedAt"] >= term["startedAt"]
    assert status["containerStatuses"][0]["restartCount"] == 0
    assert executor.logs("ok") == "hello from the pod\n"


def test_failure_exit_code_and_log_tail_fallback(executor: LocalPodExecutor) -> None:
    script = """
        import sys
        for i in range(100):
            print(f"line {i}")
        print("Traceback: boom", file=sys.stderr)
        sys.exit(3)
    """
    executor.start(pod("bad", script))
    status = finished(executor, "bad")
    assert status["phase"] == "Failed"
    term = terminated(status)
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert term["message"].endswith(
        "Traceback: boom"
    )  # stderr is in the log, and the log tail is the message
    assert "line 99" in term["message"] and "line 0\n" not in term["message"]  # only the tail


def test_termination_log_wins_over_log_tail_and_is_capped(executor: LocalPodExecutor) -> None:
    script = """
        import os, sys
        print("noise")
        open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write("x" * 10000)
        sys.exit(75)
    """
    executor.start(pod("pre", script))
    term = terminated(finished(executor, "pre"))
    assert term["exitCode"] == 75
    assert term["message"] == "x" * 4096


def test_file_policy_gives_no_fallback_message(executor: LocalPodExecutor) -> None:
    executor.start(pod("quiet", "print('x'); raise SystemExit(1)", terminationMessagePolicy="File"))
    assert "message" not in terminated(finished(executor, "quiet"))


def test_running_status_then_sigkill_reports_137(executor: LocalPodExecutor) -> None:
    executor.start(pod("sleeper", "import time; print('up', flush=True); time.sleep(60)"))
    assert wait_until(lambda: executor.logs("sleeper") == "up\n", 20)
    status = executor.status("sleeper")
    assert status is not None and status["phase"] == "Running"
    assert "running" in status["containerStatuses"][0]["state"]
    executor.signal("sleeper", signal.SIGKILL)
    term = terminated(finished(executor, "sleeper"))
    assert term["exitCode"] == 137 and term["reason"] == "Error"


def test_sigterm_is_delivered_to_the_main_process(executor: LocalPodExecutor) -> None:
    script = """
        import os, signal, sys, time
        def stop(*_):
            open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write('{"result": "preempted"}')
            sys.exit(75)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """
    executor.start(pod("graceful", script))
    assert wait_until(lambda: "ready" in executor.logs("graceful"), 20)
    executor.signal("graceful", signal.SIGTERM)
    term = terminated(finished(executor, "graceful"))
    assert term["exitCode"] == 75 and json.loads(term["message"]) == {"result": "preempted"}


def test_delete_waits_grace_then_kills_and_forgets(executor: LocalPodExecutor) -> None:
    script = """
        import signal, time
        signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """
    executor.start(pod("stubborn", script))
    assert wait_until(lambda: "ready" in executor.logs("stubborn"), 20)
    t0 = time.monotonic()
    executor.delete("stubborn", grace_seconds=0.5)
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 10  # waited for the grace period, then SIGKILL
    assert executor.status("stubborn") is None
    assert "stubborn" not in executor.names()
    assert "ignoring SIGTERM" in (executor.pod_dir("stubborn") / "log").read_text()


def test_delete_returns_as_soon_as_the_pod_exits_on_sigterm(executor: LocalPodExecutor) -> None:
    executor.start(pod("polite", "import time; print('ready', flush=True); time.sleep(60)"))
    assert wait_until(lambda: "ready" in executor.logs("polite"), 20)
    t0 = time.monotonic()
    executor.delete("polite", grace_seconds=30)
    assert time.monotonic() - t0 < 10


def test_log_tail(executor: LocalPodExecutor) -> None:
    executor.start(pod("chatty", "for i in range(10): print(i)"))
    finished(executor, "chatty")
    assert executor.logs("chatty", tail_lines=3) == "7\n8\n9\n"
    assert executor.logs("chatty", tail_lines=0) == ""
    assert executor.logs("chatty").count("\n") == 10
    with pytest.raises(KeyError):
        executor.logs("nope")


def test_volume_paths_rewritten_in_args_env_and_working_dir(executor: LocalPodExecutor) -> None:
    script = """
        import json, os, sys
        ws = sys.argv[2]
        open(os.path.join(ws, "marker"), "w").write("kept")
        print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "data": os.environ["DATA"],
                          "name": os.environ["POD_NAME"], "scratch": os.environ["SCRATCH"]}))
    """
    spec = pod(
        "mapped",
        script,
        args=["--workspace", "/workspace", "--out=/workspace/export", "/elsewhere"],
        env={"DATA": "/workspace/data/train.jsonl", "SCRATCH": "/tmp/scratch"},
        volumes=[{"name": "ws", "persistentVolumeClaim": {"claimName": "job-a-ws"}},
                 {"name": "tmp", "emptyDir": {}}],
        mounts=[{"name": "ws", "mountPath": "/workspace"}, {"name": "tmp", "mountPath": "/tmp/scratch"}],
        workingDir="/workspace",
    )  # fmt: skip
    spec["spec"]["containers"][0]["env"].append(
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    )
    executor.start(spec)
    status = finished(executor, "mapped")
    assert status["phase"] == "Succeeded", executor.logs("mapped")
    seen = json.loads(executor.logs("mapped"))
    pvc = executor.pvc_dir("job-a-ws")
    assert seen["argv"] == ["--workspace", str(pvc), f"--out={pvc}/export", "/elsewhere"]
    assert Path(seen["cwd"]) == pvc
    assert seen["data"] == f"{pvc}/data/train.jsonl"
    assert seen["name"] == "mapped"
    assert Path(seen["scratch"]).is_dir() and not Path(seen["scratch"]).is_relative_to(pvc)
    assert (pvc / "marker").read_text() == "kept"


def test_pvc_survives_pods_so_a_second_pod_sees_the_first_ones_files(executor: LocalPodExecutor) -> None:
    vols = [{"name": "ws", "persistentVolumeClaim": {"claimName": "shared"}}]
    mounts = [{"name": "ws", "mountPath": "/workspace"}]
    executor.start(pod("writer", "import sys; open(sys.argv[1] + '/ckpt', 'w').write('step-5')",
                       args=["/workspace"], volumes=vols, mounts=mounts))  # fmt: skip
    finished(executor, "writer")
    executor.delete("writer", grace_seconds=0)
    executor.start(pod("reader", "import sys; print(open(sys.argv[1] + '/ckpt').read())",
                       args=["/workspace"], volumes=vols, mounts=mounts))  # fmt: skip
    assert finished(executor, "reader")["phase"] == "Succeeded"
    assert executor.logs("reader") == "step-5\n"


def test_start_is_idempotent_by_name(executor: LocalPodExecutor, tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    script = f"open({str(counter)!r}, 'a').write('x')"
    executor.start(pod("once", script))
    executor.start(pod("once", script))
    finished(executor, "once")
    executor.start(pod("once", script))
    assert counter.read_text() == "x"
    assert executor.names() == ["once"]


def test_missing_executable_fails_the_pod_with_a_clear_message(executor: LocalPodExecutor) -> None:
    spec = pod("ghost", "")
    spec["spec"]["containers"][0]["command"] = ["no-such-worker-binary", "train"]
    executor.start(spec)
    status = finished(executor, "ghost", timeout=1)
    assert status["phase"] == "Failed"
    term = terminated(status)
    assert term["reason"] == "StartError" and term["exitCode"] == 128
    assert "no-such-worker-binary" in term["message"]


def test_memory_limit_is_enforced_as_oomkilled(executor: LocalPodExecutor) -> None:
    script = """
        import time
        hog = bytearray(200 * 1024 * 1024)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
        time.sleep(30)
    """
    executor.start(pod("hog", script, resources={"limits": {"memory": "64Mi"}}))
    term = terminated(finished(executor, "hog"))
    assert term["reason"] == "OOMKilled" and term["exitCode"] == 137


def test_on_exit_callback_and_close_kills_everything(tmp_path: Path) -> None:
    ended: list[str] = []
    ex = LocalPodExecutor(tmp_path / "root", on_exit=ended.append)
    ex.start(pod("quick", "pass"))
    ex.start(pod("forever", "import time; time.sleep(600)"))
    assert wait_until(lambda: "quick" in ended, 20)
    ex.close()
    assert ex.wait("forever", 5)
    assert sorted(ended) == ["forever", "quick"]
    with pytest.raises(RuntimeError):
        ex.start(pod("late", "pass"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16Gi", 16 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1G", 10**9),
        ("1e9", 10**9),
        ("1048576", 2**20),
        ("1.5Gi", 3 * 2**29),
    ],
)
def test_parse_memory_quantity(text: str, expected: int) -> None:
    assert parse_memory_quantity(text) == expected


def test_parse_memory_quantity_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        parse_memory_quantity("lots")


def test_image_entrypoint_and_var_expansion(tmp_path: Path) -> None:
    script = "import sys; print(' '.join(sys.argv[1:]))"
    ex = LocalPodExecutor(tmp_path / "root", default_command=[PY, "-c", script])
    try:
        spec = pod(
            "entry", "", env={"STEPS": "7"}, args=["train", "--steps", "$(STEPS)", "$$(STEPS)", "$(NOPE)"]
        )
        del spec["spec"]["containers"][0]["command"]
        ex.start(spec)
        assert finished(ex, "entry")["phase"] == "Succeeded"
        assert ex.logs("entry") == "train --steps 7 $(STEPS) $(NOPE)\n"
    finally:
        ex.close()
