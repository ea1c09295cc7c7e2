#!/usr/bin/env bash
# kind e2e (`make e2e-kind`): create a cluster, build and load both images, then run tier 4's
# scenario suite (tests/node: the same one the real-node harness runs) against its context: the
# operator installed from manifests/kind, the LoRA sample with its training pod deleted mid-run
# (exit 75, resume from that checkpoint), suspend and resume, the active operator replica deleted,
# `kubectl drain`, printer columns, `kubectl logs` and Events; each export loaded on the host.
# The suite dumps status, pods, logs and events of a failed scenario; this script dumps the
# cluster's if anything before it fails.
#
# Without a Docker engine, kind or kubectl it prints "SKIPPED: <reason>" and exits 0 (after the
# offline part: rendering the kind overlay). Environment:
#   KIND_CLUSTER=finetune-e2e   cluster name (an existing one is reused)
#   KEEP_CLUSTER=1              keep the cluster afterwards (default: delete it if this run created it)
#   SKIP_BUILD=1                use finetune-operator:dev / finetune-worker:dev already built
#   PYTHON_IMAGE, TORCH_WHEEL_DIR, ...   make images' variables (README: restricted sites)
#   E2E_MAX_STEPS=40            training steps of each scenario (FINETUNE_E2E_MAX_STEPS of the suite)
#   E2E_TIMEOUT=900             seconds for each job to succeed
#   PYTEST_ARGS                 more pytest arguments (e.g. -k drain)
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-finetune-e2e}
IMG_OPERATOR=finetune-operator:dev
IMG_WORKER=finetune-worker:dev
MAX_STEPS=${E2E_MAX_STEPS:-40}
TIMEOUT=${E2E_TIMEOUT:-900}
HOST_DIR=/tmp/finetune-operator-kind  # manifests/kind/cluster.yaml mounts it for the volumes

log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() { echo "SKIPPED: $*"; exit 0; }
fail() { echo "FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- preflight (offline part first)
if [[ -x .venv/bin/kubectl ]]; then KUBECTL=.venv/bin/kubectl
elif command -v kubectl >/dev/null 2>&1; then KUBECTL=$(command -v kubectl)
else skip "kubectl not found (run 'make dev', or install kubectl)"
fi
RENDERED=$(mktemp)
trap 'rm -f "$RENDERED"' EXIT
"$KUBECTL" kustomize manifests/kind >"$RENDERED" || fail "manifests/kind does not render"
log "rendered manifests/kind ($(grep -c '^kind:' "$RENDERED") objects)"

command -v docker >/dev/null 2>&1 || skip "docker not found"
docker info >/dev/null 2>&1 || skip "no Docker engine reachable ('docker info' failed)"
command -v kind >/dev/null 2>&1 || skip "kind not found (https://kind.sigs.k8s.io/docs/user/quick-start/)"
[[ -x .venv/bin/python ]] || skip "no .venv: run 'make dev' (the scenarios are tests/node, run by its pytest)"

KIND_KUBECONFIG=$(mktemp)
k() { "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" --context "kind-$CLUSTER" "$@"; }

created=0
dump() {
  echo "==================== diagnostics ====================" >&2
  k get finetunejobs -A -o wide >&2 || true
  k get pods,pvc -A -o wide >&2 || true
  echo "---- operator logs" >&2
  k -n finetune-system logs deploy/finetune-operator --tail=200 >&2 || true
  echo "---- events" >&2
  k get events -A --sort-by=.lastTimestamp >&2 || true
}
on_exit() {
  local rc=$?
  (( rc == 0 )) || dump
  rm -f "$RENDERED" "$KIND_KUBECONFIG"
  if (( created )) && [[ ${KEEP_CLUSTER:-0} != 1 ]]; then
    log "deleting cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap on_exit EXIT

# ---------------------------------------------------------------- cluster, images
mkdir -p "$HOST_DIR"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing cluster $CLUSTER"
else
  log "creating cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config manifests/kind/cluster.yaml --wait 180s
  created=1
fi

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building $IMG_OPERATOR and $IMG_WORKER"
  # make images: a restricted site's variables (PYTHON_IMAGE, TORCH_WHEEL_DIR, ...) apply from the environment
  make images IMG_OPERATOR="$IMG_OPERATOR" IMG_WORKER="$IMG_WORKER"
fi
kind load docker-image "$IMG_OPERATOR" "$IMG_WORKER" --name "$CLUSTER"
kind get kubeconfig --name "$CLUSTER" >"$KIND_KUBECONFIG"

# ---------------------------------------------------------------- the scenarios: tier 4's suite
# The suite installs the operator as README says (kubectl apply --server-side -k manifests/kind) and
# reads the volumes through the cluster.yaml mount of $HOST_DIR.
log "running tests/node against kind-$CLUSTER (maxSteps $MAX_STEPS)"
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words by design
FINETUNE_E2E_CONTEXT="kind-$CLUSTER" FINETUNE_E2E_KUBECONFIG="$KIND_KUBECONFIG" \
  FINETUNE_E2E_VOLUMES="/var/local-path-provisioner=$HOST_DIR" \
  FINETUNE_E2E_MAX_STEPS="$MAX_STEPS" FINETUNE_E2E_TIMEOUT="$TIMEOUT" \
  bash scripts/pytest.sh tests/node -m node -p no:cacheprovider ${PYTEST_ARGS:-} \
  || fail "the tier-4 scenarios failed on kind-$CLUSTER (each failure's report has its namespace's story)"
echo "PASSED: kind e2e (tests/node on kind-$CLUSTER)"
