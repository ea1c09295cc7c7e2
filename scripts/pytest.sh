#!/usr/bin/env bash
# Runs pytest from the project venv. pytest's exit 5 ("no tests collected") is a failure
# here, with a message saying so: a suite that ran nothing has shown nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure (check the paths and markers given)" >&2
  exit 1
fi
exit "$rc"
