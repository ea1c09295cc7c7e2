#!/usr/bin/env bash
# `make images`: builds one image, images/NAME/Dockerfile, from a build context staged in a
# temporary directory: what the Dockerfile copies, plus the site inputs the variables below name
# (images/inputs/README.md), so neither the working tree nor the other image's context carries
# them (a directory of CUDA wheels is gigabytes). The stage is removed afterwards.
#   images/build.sh operator|worker TAG
# Environment (the Makefile passes its variables of the same names; empty = the Dockerfile's default):
#   PYTHON_IMAGE          the base image (python:3.11.11-slim-bookworm; `make base-image`: finetune-base:dev)
#   PIP_INDEX_URL         the package index (https://pypi.org/simple), PIP_EXTRA_INDEX_URL another one
#   EXTRA_CA_CERTS        a PEM file of CA certificates pip trusts in the build (a TLS-inspecting proxy)
#   TORCH_VARIANT         worker: cpu, cu126, cu128 ... (PyTorch's index for it); TORCH_INDEX_URL: another index
#   TORCH_WHEEL_DIR       worker: a directory of wheels; its torch-*.whl is installed instead of
#                         one from an index, the rest are preferred to the index's
#   DOCKER_BUILD_FLAGS    more `docker build` flags (e.g. --build-arg HTTPS_PROXY, --no-cache)
#   DOCKER=docker         the Docker CLI
# Works with the classic builder of dockerd 20.10 (no BuildKit, no registry but the base's).
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:?usage: images/build.sh operator|worker TAG}
tag=${2:?usage: images/build.sh operator|worker TAG}
[[ -f images/$name/Dockerfile ]] || { echo "no images/$name/Dockerfile" >&2; exit 2; }
DOCKER=${DOCKER:-docker}
fail() { echo "images/build.sh: $*" >&2; exit 2; }

ctx=$(mktemp -d "${TMPDIR:-/tmp}/finetune-image-context.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/images/inputs/ca-certificates" "$ctx/images/inputs/wheels"
# The repository's files as .dockerignore admits them (a hand-filled images/inputs/ included).
tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' --exclude=.gitignore \
  .dockerignore pyproject.toml README.md operator images/trust-build-ca.sh images/inputs "images/$name" \
  | tar -xf - -C "$ctx"

if [[ -n ${EXTRA_CA_CERTS:-} ]]; then
  [[ -r $EXTRA_CA_CERTS ]] || fail "EXTRA_CA_CERTS=$EXTRA_CA_CERTS is not a readable file"
  grep -q 'BEGIN CERTIFICATE' "$EXTRA_CA_CERTS" || fail "EXTRA_CA_CERTS=$EXTRA_CA_CERTS holds no PEM certificate"
  cp "$EXTRA_CA_CERTS" "$ctx/images/inputs/ca-certificates/extra-ca-certs.pem"
fi
if [[ $name == worker && -n ${TORCH_WHEEL_DIR:-} ]]; then
  [[ -d $TORCH_WHEEL_DIR ]] || fail "TORCH_WHEEL_DIR=$TORCH_WHEEL_DIR is not a directory"
  compgen -G "$TORCH_WHEEL_DIR/torch-*.whl" >/dev/null || fail "TORCH_WHEEL_DIR=$TORCH_WHEEL_DIR has no torch-*.whl"
  # Hard links where the filesystem allows (no copy of a 200 MB wheel), else copies.
  cp -l "$TORCH_WHEEL_DIR"/*.whl "$ctx/images/inputs/wheels/" 2>/dev/null \
    || cp "$TORCH_WHEEL_DIR"/*.whl "$ctx/images/inputs/wheels/"
elif [[ $name != worker ]]; then
  rm -f "$ctx"/images/inputs/wheels/*  # only the worker installs wheels
fi

args=()
for var in PYTHON_IMAGE PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  [[ -z ${!var:-} ]] || args+=(--build-arg "$var=${!var}")
done
if [[ $name == worker ]]; then
  for var in TORCH_VARIANT TORCH_INDEX_URL; do
    [[ -z ${!var:-} ]] || args+=(--build-arg "$var=${!var}")
  done
fi
# shellcheck disable=SC2206  # DOCKER_BUILD_FLAGS is a list of words by design
extra=(${DOCKER_BUILD_FLAGS:-})

echo "building $tag from images/$name/Dockerfile (build context: $(du -sh "$ctx" | cut -f1))"
start=$SECONDS
"$DOCKER" build -t "$tag" -f "$ctx/images/$name/Dockerfile" "${args[@]}" "${extra[@]}" "$ctx"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$tag")
echo "built $tag in $((SECONDS - start)) s ($((size / 1000000)) MB)"
