# finetune-operator — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE ?= manifests/samples/finetune_v1alpha1_finetunejob_lora.yaml
IMG_OPERATOR ?= finetune-operator:dev
IMG_WORKER ?= finetune-worker:dev
# The torch `make dev` installs: the CPU build (pip takes it from a local wheel where one lies).
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

##@ General
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z0-9_.-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development
dev: $(VENV)/.installed ## Create .venv: CPU torch 2.13.0 first, then the project with [operator,worker,dev]

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, so no dependency pulls a multi-GB CUDA build; and named again beside the
	# project, where pip's resolver (backtracking through versions of s3fs) otherwise replaced it
	# with torch 2.14.1 and 5 GB of CUDA wheels (seen on a fresh venv; 2.13.0 satisfies the range).
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[operator,worker,dev]' $(TORCH)
	touch $@

demo: dev ## Run the LoRA sample end to end on this machine, no cluster (the embedded default)
	HF_HUB_OFFLINE=1 $(VENV)/bin/finetune-operator local $(SAMPLE) --workdir runs/demo

# `make test` runs in TEST_PROCESSES processes (pytest-xdist; 1: one process, as plain pytest). Tests
# that share an expensive session fixture carry an xdist_group, so --dist loadgroup computes it once.
# Two on 2 cores: most of the suite's time is worker subprocesses, which two processes overlap.
TEST_PROCESSES ?= 2

test: dev ## Run every test tier in TEST_PROCESSES=2 processes (1: one; the e2e tier skips without Docker and kind)
	bash scripts/pytest.sh $(if $(filter-out 1,$(TEST_PROCESSES)),-n $(TEST_PROCESSES) --dist loadgroup) $(PYTEST_ARGS)

test-quick: dev ## Unit tests only (seconds)
	bash scripts/pytest.sh tests/unit

test-realapi: dev ## Tier 3b against a real kube-apiserver + etcd: KUBEBUILDER_ASSETS=/dir/with/binaries make test-realapi
	@test -n "$$KUBEBUILDER_ASSETS" || { echo "KUBEBUILDER_ASSETS is not set: point it at a directory with kube-apiserver and etcd (and optionally kube-controller-manager, kubectl); see README, Development and tests" >&2; exit 2; }
	bash scripts/pytest.sh tests/realapi -m realapi $(PYTEST_ARGS)

bench-apiserver: dev ## The operator's cost to a real API server (needs KUBEBUILDER_ASSETS, ~5 min)
	@test -n "$$KUBEBUILDER_ASSETS" || { echo "KUBEBUILDER_ASSETS is not set (see make test-realapi)" >&2; exit 2; }
	HF_HUB_OFFLINE=1 $(PY) bench/bench_apiserver.py

test-node: dev ## Tier 4 on a real node (root; KUBEBUILDER_ASSETS, FINETUNE_NODE_PAUSE, FINETUNE_NODE_IMAGES; README), ~6 min
	@test -n "$$KUBEBUILDER_ASSETS$$FINETUNE_E2E_CONTEXT" || { echo "KUBEBUILDER_ASSETS is not set: point it at a directory with kube-apiserver, etcd, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (or set FINETUNE_E2E_CONTEXT to a cluster's context); see README, Development and tests" >&2; exit 2; }
	bash scripts/pytest.sh tests/node -m node $(PYTEST_ARGS)

bench-node: dev ## The LoRA sample on a real node / finetune-operator local; SIGTERM-to-exit; steps lost (as test-node)
	@test -n "$$KUBEBUILDER_ASSETS$$FINETUNE_E2E_CONTEXT" || { echo "KUBEBUILDER_ASSETS is not set (see make test-node)" >&2; exit 2; }
	HF_HUB_OFFLINE=1 $(PY) bench/bench_node.py

chaos: dev ## Chaos suite alone: CHAOS_TRIALS=N CHAOS_SEED=S make chaos (ledger in chaos.json)
	CHAOS_REPORT=$${CHAOS_REPORT:-chaos.json} bash scripts/pytest.sh tests/chaos -m chaos $(PYTEST_ARGS)

lint: dev ## ruff, mypy (strict on the control plane), import-linter layering
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/mypy operator/finetune_api operator/finetune_operator
	$(VENV)/bin/lint-imports

bench: dev ## Benchmarks: ratios against baselines measured in the same run
	for b in bench/bench_*.py; do echo "== $$b"; HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

##@ Build and deploy
# What `make images` builds from (README: "Building images on a restricted site"): the defaults are
# the Dockerfiles' own, and a site that cannot reach them changes these variables, nothing else:
#   make base-image && make images PYTHON_IMAGE=finetune-base:dev TORCH_WHEEL_DIR=/srv/wheels
# Base of both images: Debian with python 3.11 and useradd (`make base-image` builds one).
PYTHON_IMAGE ?= python:3.11.11-slim-bookworm
# The package index (empty: PyPI) and another one.
PIP_INDEX_URL ?=
PIP_EXTRA_INDEX_URL ?=
# A PEM file of CA certificates pip trusts while building (a TLS-inspecting proxy, a private index).
EXTRA_CA_CERTS ?=
# The worker's torch: a build of PyTorch's index (cpu, cu126, cu128, ...), or another index...
TORCH_VARIANT ?= cpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/$(TORCH_VARIANT)
# ...or a directory whose torch-*.whl the worker installs instead (its other wheels are preferred too).
TORCH_WHEEL_DIR ?=
# More `docker build` flags, e.g. --build-arg HTTPS_PROXY --no-cache.
DOCKER_BUILD_FLAGS ?=
IMAGE_BUILD_ENV = PYTHON_IMAGE='$(PYTHON_IMAGE)' PIP_INDEX_URL='$(PIP_INDEX_URL)' \
	PIP_EXTRA_INDEX_URL='$(PIP_EXTRA_INDEX_URL)' EXTRA_CA_CERTS='$(EXTRA_CA_CERTS)' \
	TORCH_VARIANT='$(TORCH_VARIANT)' TORCH_INDEX_URL='$(TORCH_INDEX_URL)' TORCH_WHEEL_DIR='$(TORCH_WHEEL_DIR)' \
	DOCKER_BUILD_FLAGS='$(DOCKER_BUILD_FLAGS)'
# `make base-image`: the tag, the Debian mirrors (DEBIAN_SECURITY_MIRROR empty: no security suite)
# and the CA certificates added to Debian's own (only those it lacks; empty: none).
BASE_IMAGE ?= finetune-base:dev
DEBIAN_MIRROR ?= http://deb.debian.org/debian
DEBIAN_SECURITY_MIRROR ?= http://deb.debian.org/debian-security
BASE_CA_CERTS ?= /etc/ssl/certs/ca-certificates.crt

images: ## Build the operator and worker images (needs Docker; PYTHON_IMAGE, PIP_INDEX_URL, EXTRA_CA_CERTS, TORCH_WHEEL_DIR...)
	$(IMAGE_BUILD_ENV) bash images/build.sh operator $(IMG_OPERATOR)
	$(IMAGE_BUILD_ENV) bash images/build.sh worker $(IMG_WORKER)

base-image: ## Build finetune-base:dev (python 3.11) from Debian packages alone (root, mmdebstrap): no registry needed
	BASE_IMAGE='$(BASE_IMAGE)' DEBIAN_MIRROR='$(DEBIAN_MIRROR)' DEBIAN_SECURITY_MIRROR='$(DEBIAN_SECURITY_MIRROR)' \
	  BASE_CA_CERTS='$(BASE_CA_CERTS)' bash images/base/build.sh

test-images: dev ## Container tests of the built images through the Docker CLI (after make images; 1.5-3 min)
	IMG_OPERATOR='$(IMG_OPERATOR)' IMG_WORKER='$(IMG_WORKER)' bash scripts/pytest.sh tests/images -m images $(PYTEST_ARGS)

install.yaml: ## Render dist/install.yaml (CRD, RBAC, operator) with kustomize
	bash scripts/render-install.sh

deploy: install.yaml ## kubectl apply dist/install.yaml
	kubectl apply --server-side -f dist/install.yaml

undeploy: ## Remove the operator (FineTuneJobs and their PVCs with reclaimPolicy Retain stay)
	kubectl delete --ignore-not-found -f dist/install.yaml

e2e-kind: ## The kind e2e (needs Docker and kind; says why and skips where missing)
	bash tests/e2e/run-kind.sh

.PHONY: help dev demo test test-quick test-realapi bench-apiserver test-node bench-node lint bench images base-image test-images install.yaml deploy undeploy e2e-kind
