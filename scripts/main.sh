#!/usr/bin/env bash
# The main job: install, then train a small model with fused_optim.AdamW (fused kernels; on CPU in Triton's
# interpreter) vs torch.optim.AdamW. Any optimizer: --optimizer NAME (factory names and aliases) or --optimizer all.
set -euo pipefail
. "$(dirname "$0")/setup.sh"  # install; leaves this shell at the repository root with $PY set
"$PY" examples/demo.py "$@"
