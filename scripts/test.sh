#!/usr/bin/env bash
# The whole test suite. Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m pytest -q tests "$@"
