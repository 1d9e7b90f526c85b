#!/usr/bin/env bash
# The main job: install, then train a small model with fused_optim.AdamW vs torch.optim.AdamW.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY examples/demo.py "$@"
