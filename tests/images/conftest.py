"""Container tests of the built images (`make test-images`, after `make images`).

They run only when selected with `-m images` (make test-images does): plain `make test` collects
them and skips them with that reason, so the suite does not build or run containers by surprise.
Selected, they skip with the reason when the Docker CLI or engine (DOCKER_HOST) is missing or an
image is not built; with FINETUNE_REQUIRE_IMAGES=1 (CI, after it built the images) those reasons
are failures instead, so a CI run cannot pass by skipping everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from dockerkit import IMG_OPERATOR, IMG_WORKER

REQUIRE_ENV = "FINETUNE_REQUIRE_IMAGES"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_engine(request: pytest.FixtureRequest) -> None:
    if "images" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("container tests of the built images: run them with `make test-images` (after `make images`)")
    if not shutil.which("docker"):
        _unavailable("docker not found (the Docker CLI; Debian: apt-get install docker.io)")
    res = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        _unavailable(f"no Docker engine reachable ('docker info' failed; DOCKER_HOST={os.environ.get('DOCKER_HOST', '')!r}): "
                     f"{res.stderr.strip()[:300]}")  # fmt: skip


def _image(name: str) -> str:
    res = subprocess.run(["docker", "image", "inspect", name], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        _unavailable(f"image {name} is not built: run `make images` (IMG_OPERATOR / IMG_WORKER name others)")
    return name


@pytest.fixture(scope="session")
def operator_image(docker_engine: None) -> str:
    return _image(IMG_OPERATOR)


@pytest.fixture(scope="session")
def worker_image(docker_engine: None) -> str:
    return _image(IMG_WORKER)
