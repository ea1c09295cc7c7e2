#!/usr/bin/env bash
# kind e2e (`make e2e-kind`): create a cluster, build and load both images, install the operator,
# run the LoRA sample, delete its training pod mid-run and see the next attempt resume from the
# checkpoint, suspend and resume it, wait for condition Succeeded, check the printer columns.
# Dumps status, pods, logs and events on any failure.
#
# Without a Docker engine, kind or kubectl it prints "SKIPPED: <reason>" and exits 0 (after the
# offline part: rendering the kind overlay). Environment:
#   KIND_CLUSTER=finetune-e2e   cluster name (an existing one is reused)
#   KEEP_CLUSTER=1              keep the cluster afterwards (default: delete it if this run created it)
#   SKIP_BUILD=1                use finetune-operator:dev / finetune-worker:dev already built
#   PYTHON_IMAGE, TORCH_WHEEL_DIR, ...   make images' variables (README: restricted sites)
#   E2E_MAX_STEPS=200           training steps (long enough to interrupt the run twice)
#   E2E_TIMEOUT=900             seconds for the whole job to succeed
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-finetune-e2e}
NS=finetune-e2e
JOB=faq-minilm-lora
SAMPLE=manifests/samples/finetune_v1alpha1_finetunejob_lora.yaml
IMG_OPERATOR=finetune-operator:dev
IMG_WORKER=finetune-worker:dev
MAX_STEPS=${E2E_MAX_STEPS:-200}
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

k() { "$KUBECTL" --context "kind-$CLUSTER" "$@"; }
jp() { k -n "$NS" get finetunejob "$JOB" -o "jsonpath=$1" 2>/dev/null || true; }

# Poll until `$@` succeeds, up to $1 seconds: wait_for SECONDS WHAT CMD...
wait_for() {
  local limit=$1 what=$2 start=$SECONDS
  shift 2
  until "$@"; do
    (( SECONDS - start < limit )) || fail "timed out after ${limit}s waiting for $what"
    sleep 2
  done
  log "ok: $what ($((SECONDS - start))s)"
}

created=0
dump() {
  echo "==================== diagnostics ====================" >&2
  k -n "$NS" get finetunejobs -o wide >&2 || true
  k -n "$NS" get finetunejob "$JOB" -o yaml >&2 || true
  k -n "$NS" get pods,pvc -o wide >&2 || true
  k -n "$NS" describe finetunejob "$JOB" >&2 || true
  for p in $(k -n "$NS" get pods -l "finetune.dev/job=$JOB" -o name 2>/dev/null); do
    echo "---- logs $p" >&2
    k -n "$NS" logs "$p" --tail=80 >&2 || true
  done
  echo "---- operator logs" >&2
  k -n finetune-system logs deploy/finetune-operator --tail=200 >&2 || true
  echo "---- events" >&2
  k get events -A --sort-by=.lastTimestamp >&2 || true
}
on_exit() {
  local rc=$?
  rm -f "$RENDERED"
  (( rc == 0 )) || dump
  if (( created )) && [[ ${KEEP_CLUSTER:-0} != 1 ]]; then
    log "deleting cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap on_exit EXIT

# ---------------------------------------------------------------- cluster, images, install
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

log "installing the operator"
k apply --server-side -f "$RENDERED"
k wait --for=condition=Established crd/finetunejobs.finetune.dev --timeout=60s
k -n finetune-system rollout status deploy/finetune-operator --timeout=180s

# ---------------------------------------------------------------- the LoRA sample
k create namespace "$NS" --dry-run=client -o yaml | k apply -f -
k -n "$NS" delete finetunejob "$JOB" --ignore-not-found --wait=true
log "applying the LoRA sample with maxSteps $MAX_STEPS"
sed "s/^    maxSteps: .*/    maxSteps: $MAX_STEPS/" "$SAMPLE" | k -n "$NS" apply --server-side -f -
[[ $(jp '{.spec.training.maxSteps}') == "$MAX_STEPS" ]] || fail "spec.training.maxSteps was not set to $MAX_STEPS"
[[ $(jp '{.spec.training.seed}') == 42 ]] || fail "the CRD did not fill the default training.seed"

has_checkpoint() { [[ $(jp '{.status.checkpoint.name}') == checkpoint-* ]]; }
phase_is() { [[ $(jp '{.status.phase}') == "$1" ]]; }
restarts_at_least() { local r; r=$(jp '{.status.restarts}'); (( ${r:-0} >= $1 )); }
running_train_pod() {
  k -n "$NS" get pods -l "finetune.dev/job=$JOB,finetune.dev/role=train" \
    --field-selector=status.phase=Running -o name 2>/dev/null | tail -n1
}
new_train_pod() { local p; p=$(running_train_pod); [[ -n $p && $p != "$1" ]]; }
not_suspended() { ! phase_is Suspended; }

wait_for 600 "phase Training" phase_is Training
wait_for 600 "a first checkpoint" has_checkpoint

# ---------------------------------------------------------------- interruption: delete the training pod
pod=$(running_train_pod)
[[ -n $pod ]] || fail "no running training pod"
ckpt=$(jp '{.status.checkpoint.name}')
log "deleting $pod mid-run (latest checkpoint $ckpt)"
k -n "$NS" delete "$pod" --wait=false
wait_for 300 "status.restarts >= 1" restarts_at_least 1
wait_for 300 "a new training pod running" new_train_pod "$pod"
attempts=$(jp '{.status.attempts[*].pod}')
log "attempts: $attempts"
[[ $attempts == *"$JOB-train-1"* ]] || fail "attempt 1 missing from status.attempts"

# ---------------------------------------------------------------- suspend and resume
if phase_is Training; then
  log "suspending"
  k -n "$NS" patch finetunejob "$JOB" --type=merge -p '{"spec":{"suspend":true}}'
  wait_for 300 "phase Suspended" phase_is Suspended
  k wait -n "$NS" --for=condition=Suspended "finetunejob/$JOB" --timeout=30s
  [[ -z $(running_train_pod) ]] || fail "a training pod still runs while Suspended"
  log "resuming"
  k -n "$NS" patch finetunejob "$JOB" --type=merge -p '{"spec":{"suspend":false}}'
  wait_for 300 "out of Suspended after resume" not_suspended
else
  fail "the job left Training before it could be suspended (raise E2E_MAX_STEPS); phase $(jp '{.status.phase}')"
fi

# ---------------------------------------------------------------- to the end
log "waiting for condition Succeeded (up to ${TIMEOUT}s)"
k wait -n "$NS" --for=condition=Succeeded "finetunejob/$JOB" --timeout="${TIMEOUT}s"
phase_is Succeeded || fail "condition Succeeded but phase $(jp '{.status.phase}')"

resumed=$(jp '{.status.attempts[*].resumedFrom}')
[[ $resumed == *checkpoint-* ]] || fail "no attempt resumed from a checkpoint (resumedFrom: '$resumed')"
restarts_at_least 1 || fail "status.restarts is $(jp '{.status.restarts}')"
export_path=$(jp '{.status.export.path}')
[[ -n $export_path ]] || fail "status.export.path is empty"
log "resumed from: $resumed; export: $export_path; maxDeviation: $(jp '{.status.export.maxDeviation}')"

# ---------------------------------------------------------------- printer columns and short name
table=$(k -n "$NS" get ftj "$JOB")
echo "$table"
head -n1 <<<"$table" | grep -Eq '^NAME +PHASE +PROGRESS +CHECKPOINT +RESTARTS +AGE +ETA *$' \
  || fail "printer columns: $(head -n1 <<<"$table")"
row=$(tail -n1 <<<"$table")
read -r name phase progress checkpoint restarts _ <<<"$row"
[[ $name == "$JOB" && $phase == Succeeded && $progress == 100* && ($checkpoint == final || $checkpoint == checkpoint-*) \
   && $restarts -ge 1 ]] \
  || fail "printer row: $row"

if compgen -G "$HOST_DIR/*$JOB*/export/sentence-transformers" >/dev/null; then
  log "exported model on the host: $(compgen -G "$HOST_DIR/*$JOB*/export/sentence-transformers")"
fi
echo "PASSED: kind e2e ($JOB: interrupted, resumed, suspended, resumed, Succeeded)"
