#!/usr/bin/env bash
# Install fused_optim and its test dependencies on a fresh machine (CPU or GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch: keep an installed build (CUDA images ship their own); else the CPU build (a file on the CI image).
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q "triton>=3.0" pytest pytest-xdist ninja pybind11
# timm is an anchor for tests only; its __init__ needs torchvision, so install without deps (tests/anchors.py)
$PY -m pip install -q --no-deps timm
# Editable install; setup.py also builds csrc/'s extensions (scripts/build_csrc.sh: the host module, plus the CUDA
# module where nvcc is found, ~25 s on 2 cores; FUSED_OPTIM_CUDA=0 skips it). A failed build does not fail the install.
$PY -m pip install -q --no-deps --no-build-isolation -e .
built=$(cd fused_optim && ls _fused_optim_*.so 2>/dev/null | sed 's/\..*//' | paste -sd' ' -)
echo "fused_optim csrc extensions: ${built:-none} (pip install -v --no-build-isolation -e . shows the build log)"
