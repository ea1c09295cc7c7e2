"""CLI conventions a new user expects: errors on stderr naming the file, --version, close-match
suggestions for misspelt fields and values, worker help that lists exit codes and the resume
behaviour, no silent /workspace outside a pod, a warning when GPUs are asked for and absent."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from finetune_api.spec import SpecError, parse_spec
from finetune_operator import cli as operator_cli
from finetune_operator.local import runner as local
from finetune_worker import cli as worker_cli


@pytest.mark.parametrize(("spec", "message"), [
    ({"training": {"learningrate": 1e-4}}, "spec.training.learningrate: unknown field; did you mean learningRate?"),
    ({"training": {"batchsize": 8}}, "did you mean batchSize?"),
    ({"lora": {"alfa": 16}}, "spec.lora.alfa: unknown field; did you mean alpha?"),
    ({"training": {"precision": "FP16"}}, "(did you mean fp16?)"),
    ({"training": {"loss": "MultipleNegativeRankingLoss"}}, "(did you mean MultipleNegativesRankingLoss?)"),
    ({"export": {"formats": ["sentence_transformers"]}}, "(did you mean sentence-transformers?)"),
])  # fmt: skip
def test_misspelt_fields_and_values_get_a_suggestion(spec: dict, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"dataset": {"inline": [{"anchor": "a", "positive": "b"}]}, **spec})
    assert message in str(e.value)


def test_nothing_close_suggests_nothing() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"training": {"zzzz": 1}})
    assert "did you mean" not in str(e.value)


def test_local_yaml_error_goes_to_stderr_and_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("spec:\n  training: {learningRate: 1\n")
    out, err = io.StringIO(), io.StringIO()
    assert local.main([str(bad)], str(tmp_path / "w"), out=out, err=err) == 2
    assert out.getvalue() == ""
    assert f"in {bad}, line 2" in err.getvalue() and "<unicode string>" not in err.getvalue()


def test_worker_yaml_error_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("spec:\n  training: {learningRate: 1\n")
    assert worker_cli.main(["train", "--config", str(bad), "--workspace", str(tmp_path / "ws")]) == 2
    cap = capsys.readouterr()
    assert str(bad) in cap.err and "<unicode string>" not in cap.err and cap.out == ""


@pytest.mark.parametrize("main", [operator_cli.main, worker_cli.main])
def test_version(main, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.split()[1][0].isdigit()


def test_worker_help_lists_exit_codes_and_resume_and_no_missing_file() -> None:
    text = worker_cli._parser().format_help()
    for code in ("0 ", "75", "2 ", "1 "):
        assert f"  {code}" in text
    assert "transient" in text and "resume" in text and "newest valid checkpoint" in text
    assert "DESIGN.md" not in text and ".md" not in text


def test_worker_outside_a_pod_refuses_without_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cfg = tmp_path / "job.yaml"
    cfg.write_text("spec:\n  dataset: {inline: [{anchor: a, positive: b}]}\n")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert worker_cli.main(["train", "--config", str(cfg)]) == 2
    assert "--workspace: required outside a pod (not in a Kubernetes pod): pass --workspace DIR" in capsys.readouterr().err
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # "in a pod", but no /workspace volume
    if not Path("/workspace").is_dir():
        assert worker_cli.main(["train", "--config", str(cfg)]) == 2
        assert "no /workspace here" in capsys.readouterr().err


def test_local_warns_when_a_job_asks_for_gpus_and_none_is_present(tmp_path: Path) -> None:
    jobs = [{"metadata": {"name": "gpu-job"}, "spec": {"resources": {"gpus": 1}}},
            {"metadata": {"name": "cpu-job"}, "spec": {"resources": {"gpus": 0}}}]  # fmt: skip
    warnings = local.gpu_warnings(jobs, device=str(tmp_path / "no-such-device"))
    assert warnings == ["gpu-job asks for 1 GPU (spec.resources.gpus) but this machine has none: "
                        "it trains on CPU, much more slowly"]  # fmt: skip
    (tmp_path / "nvidia0").touch()
    assert local.gpu_warnings(jobs, device=str(tmp_path / "nvidia0")) == []


def test_worker_warns_when_gpus_are_asked_for_and_absent(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = {"inline": [{"anchor": "a", "positive": "b"}]}
    worker_cli._warn_without_gpu(parse_spec({"dataset": data, "resources": {"gpus": 2}}))
    assert "spec.resources.gpus is 2 but no GPU is available" in capsys.readouterr().err
    worker_cli._warn_without_gpu(parse_spec({"dataset": data, "resources": {"gpus": 0}}))
    assert capsys.readouterr().err == ""
