#!/usr/bin/env bash
# Install (scripts/setup.sh), then the whole test suite. Without CUDA the Triton kernels run under TRITON_INTERPRET=1
# (tests/conftest.py). Then, with or without a GPU: every Triton kernel AOT-compiled for sm_80/sm_90 (fails on
# compile errors, spills, narrow loads), and csrc/ compiled by nvcc for sm_80/sm_90 where nvcc exists.
#   bash scripts/test.sh                                all of the above
#   bash scripts/test.sh tests/generic/test_amp.py -x   install, then pytest with these arguments only (no compile
#                                                       checks)
set -euo pipefail
. "$(dirname "$0")/setup.sh"  # install; leaves this shell at the repository root with $PY set
# two workers: the interpreter-bound kernel tests dominate and parallelize cleanly
if [ $# -gt 0 ]; then
    exec "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
fi
"$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal --durations=40 tests
env -u TRITON_INTERPRET "$PY" -m fused_optim.tools.aot --check --json build/aot-report.json | tail -n 3
if command -v nvcc >/dev/null 2>&1; then
    bash scripts/build_csrc.sh --cuda-check
else
    echo "nvcc not found: skipping the CUDA compile check of csrc/"
fi
