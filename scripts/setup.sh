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
$PY -m pip install -q --no-deps --no-build-isolation -e .
