#!/usr/bin/env bash
# The main job: install, then train a small model with fused_optim.AdamW (fused kernels; on CPU in Triton's
# interpreter) vs torch.optim.AdamW. Any optimizer: --optimizer NAME (factory names and aliases) or --optimizer all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY examples/demo.py "$@"
